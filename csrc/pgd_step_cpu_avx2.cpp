// The fp32 PGD-step loops (pgd_step_cpu_loops.h) compiled for AVX2+FMA: 8 lanes, sums of squares
// in four vectors of four doubles. L-inf results equal the scalar path's exactly; L2 may differ
// in the last bit (another summation order).
#include "pgd_step_cpu_simd.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "pgd_step_cpu_loops.h"

namespace fastabsld {
namespace {

struct Avx2 {
  using F = __m256;
  using D = __m256d;
  static constexpr int64_t kLanes = 8;

  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F splat(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  // maxps/minps return their second operand when one is NaN: a NaN lane passes through.
  static F clamp(F v, F lo, F hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, v)); }
  static F linf_step(F g, F alpha) {
    const F zero = _mm256_setzero_ps();
    const F up = _mm256_and_ps(_mm256_cmp_ps(g, zero, _CMP_GT_OQ), alpha);
    const F down = _mm256_and_ps(_mm256_cmp_ps(g, zero, _CMP_LT_OQ), alpha);
    return _mm256_sub_ps(up, down);
  }
  static D zero_d() { return _mm256_setzero_pd(); }
  static void add_squares(F v, D& lo, D& hi) {
    const D a = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const D b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    lo = _mm256_fmadd_pd(a, a, lo);
    hi = _mm256_fmadd_pd(b, b, hi);
  }
  static double sum(D a, D b, D c, D d) {
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(a, b), _mm256_add_pd(c, d)));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  }
};

const PgdCpuLoops kLoops{"avx2", &pgd_linf_samples<Avx2>, &pgd_l2_samples<Avx2>};

}  // namespace

const PgdCpuLoops* avx2_loops() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? &kLoops : nullptr;
}

}  // namespace fastabsld

#else  // not x86-64 GCC: the scalar loops of pgd_step_cpu.cpp run instead

namespace fastabsld {
const PgdCpuLoops* avx2_loops() { return nullptr; }
}  // namespace fastabsld

#endif
