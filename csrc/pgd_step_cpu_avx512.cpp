// The fp32 PGD-step loops (pgd_step_cpu_loops.h) compiled for AVX-512 (F and DQ): 16 lanes, sums
// of squares in four vectors of eight doubles. L-inf results equal the scalar path's exactly; L2
// may differ in the last bit (another summation order).
#include "pgd_step_cpu_simd.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512dq")
// GCC 12 warns about the undefined upper halves that its own cast intrinsics leave (a known
// false positive in avx512fintrin.h).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "pgd_step_cpu_loops.h"

namespace fastabsld {
namespace {

struct Avx512 {
  using F = __m512;
  using D = __m512d;
  static constexpr int64_t kLanes = 16;

  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F splat(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // vmaxps/vminps return their second operand when one is NaN: a NaN lane passes through.
  static F clamp(F v, F lo, F hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, v)); }
  static F linf_step(F g, F alpha) {
    const F zero = _mm512_setzero_ps();
    const F up = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(g, zero, _CMP_GT_OQ), alpha);
    return _mm512_mask_sub_ps(up, _mm512_cmp_ps_mask(g, zero, _CMP_LT_OQ), zero, alpha);
  }
  static D zero_d() { return _mm512_setzero_pd(); }
  static void add_squares(F v, D& lo, D& hi) {
    const D a = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const D b = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
    lo = _mm512_fmadd_pd(a, a, lo);
    hi = _mm512_fmadd_pd(b, b, hi);
  }
  static double sum(D a, D b, D c, D d) {
    alignas(64) double lanes[8];
    _mm512_store_pd(lanes, _mm512_add_pd(_mm512_add_pd(a, b), _mm512_add_pd(c, d)));
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
           ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
};

const PgdCpuLoops kLoops{"avx512", &pgd_linf_samples<Avx512>, &pgd_l2_samples<Avx512>};

}  // namespace

const PgdCpuLoops* avx512_loops() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") ? &kLoops
                                                                                 : nullptr;
}

}  // namespace fastabsld

#else  // not x86-64 GCC: the scalar loops of pgd_step_cpu.cpp run instead

namespace fastabsld {
const PgdCpuLoops* avx512_loops() { return nullptr; }
}  // namespace fastabsld

#endif
