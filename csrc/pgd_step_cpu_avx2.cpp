// The AVX2+FMA build of the fp32 PGD-step loops (see pgd_step_cpu_simd.h). ATen's vector types
// take the CPU_CAPABILITY namespace AVX2 here, as in ATen's own per-capability kernels; the
// scalar tails use the shared per-element math. L-inf results equal the scalar path's exactly
// (alpha * sign is exact, so an FMA rounds the same); L2 may differ in the last bit.
// Sums of squares convert each fp32 lane to double (exact squares, no overflow) and accumulate
// in four double vectors, in a fixed order.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTABSLD_AVX2 1
#pragma GCC target("avx2,fma")
// The pragma does not define the feature macros that ATen's and Sleef's headers test.
#ifndef __AVX2__
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#endif
// ATen's bf16 lambdas trip a harmless ABI note under the pragma.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "pgd_step_cpu_simd.h"

#if defined(FASTABSLD_AVX2)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include <ATen/cpu/vec/vec.h>

namespace fastabsld {
namespace avx2 {
namespace {

using Vec = at::vec::Vectorized<float>;

// clamp_to lane by lane: maxps/minps return their second operand when one is NaN, so a NaN
// passes through as in the scalar code.
Vec clamp_vec(const Vec& v, const Vec& lo, const Vec& hi) {
  return Vec(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
}

// l2_delta on eight lanes.
Vec delta_vec(const float* x_adv, const float* x, const float* grad, int64_t i, const Vec& step,
              const Vec& scale) {
  const Vec d0 = Vec::loadu(x_adv + i) - Vec::loadu(x + i);
  return Vec(_mm256_fmadd_ps(step, Vec::loadu(grad + i) * scale, d0));
}

// Adds the squares of eight fp32 lanes, in double, to two of the four accumulators.
void add_squares(const Vec& v, __m256d& lo, __m256d& hi) {
  const __m256 f = v;
  const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
  const __m256d b = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
  lo = _mm256_fmadd_pd(a, a, lo);
  hi = _mm256_fmadd_pd(b, b, hi);
}

double sum_lanes(__m256d a, __m256d b, __m256d c, __m256d d) {
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(a, b), _mm256_add_pd(c, d)));
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

}  // namespace

bool available() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

void linf_sample(const float* x_adv, const float* x, const float* grad, float* out, int64_t n,
                 float alpha, float eps, float lo, float hi) {
  const Vec va(alpha), ve(eps), vne(-eps), vlo(lo), vhi(hi), zero(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec g = Vec::loadu(grad + i);
    const Vec x0 = Vec::loadu(x + i);
    const Vec sign = g.gt(zero) - g.lt(zero);
    const Vec delta = clamp_vec(Vec::loadu(x_adv + i) + va * sign - x0, vne, ve);
    clamp_vec(x0 + delta, vlo, vhi).store(out + i);
  }
  for (; i < n; ++i) out[i] = pgd_linf_element(x_adv[i], x[i], grad[i], alpha, eps, lo, hi);
}

SumSquares<float> grad_sum_squares(const float* grad, const float* x_adv, const float* x,
                                   int64_t n) {
  __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    // x_adv and x are read by the next pass: fetching their lines now keeps three streams from
    // memory in flight, as one fused pass would.
    _mm_prefetch(reinterpret_cast<const char*>(x_adv + i), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(x + i), _MM_HINT_T0);
    add_squares(Vec::loadu(grad + i), s0, s1);
    add_squares(Vec::loadu(grad + i + Vec::size()), s2, s3);
  }
  SumSquares<float> s{};
  for (; i < n; ++i) add_square(s, grad[i]);
  s.mid += sum_lanes(s0, s1, s2, s3);
  return s;
}

SumSquares<float> delta_sum_squares(const float* x_adv, const float* x, const float* grad,
                                    int64_t n, L2Step<float> step, float* delta) {
  const Vec vstep(step.step), vscale(step.scale);
  __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    const Vec d_lo = delta_vec(x_adv, x, grad, i, vstep, vscale);
    const Vec d_hi = delta_vec(x_adv, x, grad, i + Vec::size(), vstep, vscale);
    d_lo.store(delta + i);
    d_hi.store(delta + i + Vec::size());
    add_squares(d_lo, s0, s1);
    add_squares(d_hi, s2, s3);
  }
  SumSquares<float> s{};
  for (; i < n; ++i) {
    delta[i] = l2_delta(x_adv[i], x[i], grad[i], step);
    add_square(s, delta[i]);
  }
  s.mid += sum_lanes(s0, s1, s2, s3);
  return s;
}

void l2_project(const float* x, float* delta_out, int64_t n, float factor, float lo, float hi) {
  const Vec vfactor(factor), vlo(lo), vhi(hi);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec moved(_mm256_fmadd_ps(vfactor, Vec::loadu(delta_out + i), Vec::loadu(x + i)));
    clamp_vec(moved, vlo, vhi).store(delta_out + i);
  }
  for (; i < n; ++i) delta_out[i] = clamp_to(mul_add(factor, delta_out[i], x[i]), lo, hi);
}

}  // namespace avx2
}  // namespace fastabsld

#else  // not x86-64 GCC: the scalar loops of pgd_step_cpu.cpp run instead

namespace fastabsld {
namespace avx2 {
bool available() { return false; }
void linf_sample(const float*, const float*, const float*, float*, int64_t, float, float, float,
                 float) {}
SumSquares<float> grad_sum_squares(const float*, const float*, const float*, int64_t) {
  return {};
}
SumSquares<float> delta_sum_squares(const float*, const float*, const float*, int64_t,
                                    L2Step<float>, float*) {
  return {};
}
void l2_project(const float*, float*, int64_t, float, float, float) {}
}  // namespace avx2
}  // namespace fastabsld

#endif
