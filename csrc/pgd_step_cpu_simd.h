// The fp32 loops of the CPU PGD step, one set per x86 vector ISA, each compiled in its own
// translation unit for its ISA (pgd_step_cpu_avx2.cpp, pgd_step_cpu_avx512.cpp) from the one
// template in pgd_step_cpu_loops.h, and picked at load time. This header names no intrinsic, so
// the rest of the extension stays free of ISA-specific code.
#pragma once

#include <cstdint>

namespace fastabsld {

// Consecutive samples of one fp32 step: sample k holds the n elements at k * n of x_adv, x, grad
// and out, and its radii are alpha[k * alpha_stride] and eps[k * eps_stride] (stride 0: one radius
// for all samples).
struct PgdFp32Samples {
  const float* x_adv;
  const float* x;
  const float* grad;
  float* out;
  int64_t n, count;
  const float* alpha;
  const float* eps;
  int64_t alpha_stride, eps_stride;
  float lo, hi;
};

// The step of every sample of a PgdFp32Samples, in order.
using PgdSamplesLoop = void (*)(const PgdFp32Samples& samples);

struct PgdCpuLoops {
  const char* isa;  // "avx512" or "avx2"
  PgdSamplesLoop linf_samples, l2_samples;
};

// The loops of an ISA when this build holds them and the CPU runs them, else nullptr.
const PgdCpuLoops* avx512_loops();
const PgdCpuLoops* avx2_loops();

// The ISA of the loops fp32 pgd_step runs on this machine: "avx512", "avx2" or "scalar".
const char* pgd_step_cpu_isa();

}  // namespace fastabsld
