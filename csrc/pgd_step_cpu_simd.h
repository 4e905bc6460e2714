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

L2Sums l2_sums(const float* x_adv, const float* x, const float* grad, int64_t n);

void l2_apply(const float* x_adv, const float* x, const float* grad, float* out, int64_t n,
              L2Coefficients c, float lo, float hi);

}  // namespace avx2
}  // namespace fastabsld
