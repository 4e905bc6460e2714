// The AVX2+FMA build of the fp32 PGD-step loops (see pgd_step_cpu_simd.h). ATen's vector types
// take the CPU_CAPABILITY namespace AVX2 here, as in ATen's own per-capability kernels; the
// scalar tails use the shared per-element math. L-inf results equal the scalar path's exactly
// (alpha * sign is exact, so an FMA rounds the same); L2 may differ in the last bit.
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

float sum_lanes(const Vec& v) {
  __at_align__ float lanes[Vec::size()];
  v.store(lanes);
  float sum = 0.0f;
  for (int k = 0; k < Vec::size(); ++k) sum += lanes[k];
  return sum;
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

L2Sums l2_sums(const float* x_adv, const float* x, const float* grad, int64_t n) {
  Vec dd(0.0f), dg(0.0f), gg(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d0 = Vec::loadu(x_adv + i) - Vec::loadu(x + i);
    const Vec g = Vec::loadu(grad + i);
    dd = dd + d0 * d0;
    dg = dg + d0 * g;
    gg = gg + g * g;
  }
  L2Sums s{sum_lanes(dd), sum_lanes(dg), sum_lanes(gg)};
  for (; i < n; ++i) l2_accumulate(s, x_adv[i], x[i], grad[i]);
  return s;
}

void l2_apply(const float* x_adv, const float* x, const float* grad, float* out, int64_t n,
              L2Coefficients c, float lo, float hi) {
  const Vec step(c.step), factor(c.factor), vlo(lo), vhi(hi);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec x0 = Vec::loadu(x + i);
    const Vec delta = (Vec::loadu(x_adv + i) - x0) + step * Vec::loadu(grad + i);
    clamp_vec(x0 + delta * factor, vlo, vhi).store(out + i);
  }
  for (; i < n; ++i) out[i] = pgd_l2_element(x_adv[i], x[i], grad[i], c, lo, hi);
}

}  // namespace avx2
}  // namespace fastabsld

#else  // not x86-64 GCC: the scalar loops of pgd_step_cpu.cpp run instead

namespace fastabsld {
namespace avx2 {
bool available() { return false; }
void linf_sample(const float*, const float*, const float*, float*, int64_t, float, float, float,
                 float) {}
L2Sums l2_sums(const float*, const float*, const float*, int64_t) { return {}; }
void l2_apply(const float*, const float*, const float*, float*, int64_t, L2Coefficients, float,
              float) {}
}  // namespace avx2
}  // namespace fastabsld

#endif
