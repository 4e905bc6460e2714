// The fp32 per-sample loops of the CPU PGD step, one set per x86 vector ISA, each compiled in its
// own translation unit for its ISA (pgd_step_cpu_avx2.cpp, pgd_step_cpu_avx512.cpp) from the
// one template in pgd_step_cpu_loops.h, and picked at load time. This header names no
// intrinsic, so the rest of the extension stays free of ISA-specific code.
#pragma once

#include <cstdint>

namespace fastabsld {

// One sample's step: x_adv, x, grad and out hold n elements; alpha, eps and the box in fp32.
using PgdSampleLoop = void (*)(const float* x_adv, const float* x, const float* grad, float* out,
                               int64_t n, float alpha, float eps, float lo, float hi);

struct PgdCpuLoops {
  const char* isa;  // "avx512" or "avx2"
  PgdSampleLoop linf_sample, l2_sample;
};

// The loops of an ISA when this build holds them and the CPU runs them, else nullptr.
const PgdCpuLoops* avx512_loops();
const PgdCpuLoops* avx2_loops();

// The ISA of the loops fp32 pgd_step runs on this machine: "avx512", "avx2" or "scalar".
const char* pgd_step_cpu_isa();

}  // namespace fastabsld
