// Row math of the fused KD loss (fastabsld::kd_kl_div_forward), for contiguous rows in the
// accumulation type. Passes: (1) max of both rows; (2) exponentials, normalisers and the loss;
// (3) the gradients. The loops are written so that the compiler vectorises them (omp simd).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace fastabsld {

// exp(x) in fp32 for x <= 0 (the shifted logits): Cody-Waite reduction and a degree-6
// polynomial (~1 ulp); exactly 0 below the smallest normal, and for -inf.
__attribute__((always_inline)) inline float kd_exp(float x) {
  const float clamped = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float k = (clamped * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (clamped - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
  return x < -87.3f ? 0.0f : p * scale;
}

__attribute__((always_inline)) inline double kd_exp(double x) { return std::exp(x); }

// What one row needs: the teacher's and student's rows, the inverse temperatures, and the
// outputs (nullptr when not wanted). `scratch` holds 3 * C values of the accumulation type.
template <typename acc_t>
struct KdRow {
  const acc_t* t;
  const acc_t* s;
  int64_t cols;
  acc_t inv_tau_t, inv_tau_s;
  acc_t* grad_s;
  acc_t* grad_t;
  acc_t* scratch;
};

template <typename acc_t, bool kTeacherGrad>
__attribute__((always_inline)) inline acc_t kd_row_impl(const KdRow<acc_t>& r) {
  const acc_t* t = r.t;
  const acc_t* s = r.s;
  const int64_t n = r.cols;
  const acc_t itt = r.inv_tau_t, its = r.inv_tau_s;
  acc_t* ea = r.scratch;
  acc_t* eb = r.scratch + n;
  acc_t* diff = r.scratch + 2 * n;
  acc_t mt = -std::numeric_limits<acc_t>::infinity();
  acc_t ms = mt;
#pragma omp simd reduction(max : mt, ms)
  for (int64_t c = 0; c < n; ++c) {
    mt = t[c] > mt ? t[c] : mt;
    ms = s[c] > ms ? s[c] : ms;
  }
  acc_t zt = 0, zs = 0, w = 0;
#pragma omp simd reduction(+ : zt, zs, w)
  for (int64_t c = 0; c < n; ++c) {
    const acc_t a = (t[c] - mt) * itt;  // log p + log zt
    const acc_t b = (s[c] - ms) * its;  // log q + log zs
    const acc_t pa = kd_exp(a);
    const acc_t qb = kd_exp(b);
    ea[c] = pa;
    eb[c] = qb;
    if constexpr (kTeacherGrad) diff[c] = a - b;
    zt += pa;
    zs += qb;
    w += pa > 0 ? pa * (a - b) : acc_t(0);  // 0 log 0 = 0
  }
  const acc_t log_zt = std::log(zt), log_zs = std::log(zs);
  const acc_t loss = w / zt - log_zt + log_zs;
  if (r.grad_s != nullptr) {
    acc_t* gs = r.grad_s;
    const acc_t cq = its / zs, cp = its / zt;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) gs[c] = eb[c] * cq - ea[c] * cp;
  }
  if constexpr (kTeacherGrad) {
    acc_t* gt = r.grad_t;
    const acc_t offset = log_zs - log_zt - loss;
    const acc_t cp = itt / zt;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) gt[c] = ea[c] > 0 ? ea[c] * cp * (diff[c] + offset) : acc_t(0);
  }
  return loss;
}

// The row loss KL(p || q); fills grad_s / grad_t when they are not nullptr.
template <typename acc_t>
__attribute__((always_inline)) inline acc_t kd_row(const KdRow<acc_t>& r) {
  return r.grad_t != nullptr ? kd_row_impl<acc_t, true>(r) : kd_row_impl<acc_t, false>(r);
}

}  // namespace fastabsld
