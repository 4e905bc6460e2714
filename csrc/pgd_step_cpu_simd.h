// fp32 per-sample loops of the CPU PGD step vectorised with at::vec::Vectorized<float>, compiled
// for AVX2+FMA in their own translation unit (pgd_step_cpu_avx2.cpp) and picked at run time.
// This header names no ATen type, so the rest of the extension stays free of AVX2 code.
#pragma once

#include <cstdint>

#include "pgd_step_math.h"

namespace fastabsld {
namespace avx2 {

// True when this build holds the AVX2 loops and the CPU runs them.
bool available();

void linf_sample(const float* x_adv, const float* x, const float* grad, float* out, int64_t n,
                 float alpha, float eps, float lo, float hi);

// Sum of grad^2 over one sample (in double); x_adv and x are prefetched for the next pass.
SumSquares<float> grad_sum_squares(const float* grad, const float* x_adv, const float* x,
                                   int64_t n);

// Sum of delta^2 over one sample, delta as l2_delta computes it (in double); writes delta.
SumSquares<float> delta_sum_squares(const float* x_adv, const float* x, const float* grad,
                                    int64_t n, L2Step<float> step, float* delta);

// delta_out <- clamp(x + factor * delta_out, lo, hi): the output from delta_sum_squares' delta.
void l2_project(const float* x, float* delta_out, int64_t n, float factor, float lo, float hi);

}  // namespace avx2
}  // namespace fastabsld
