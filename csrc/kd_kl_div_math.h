// Row math of the fused KD loss (fastabsld::kd_kl_div_forward), for contiguous rows in the
// accumulation type. Passes: (1) max of both rows; (2) exponentials, normalisers and the loss;
// (3) the gradients. A row weight w scales the loss and both gradients through the per-row
// constants of pass (3), so it costs no per-element work. fp32 runs on 16-lane GCC vectors (one
// AVX-512 register, two AVX2 ones, four SSE ones), the row's tail padded with -inf; fp64 (for
// gradcheck) runs one lane at a time.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// Everything here must inline into the caller, which is compiled once per target ISA.
#define KD_INLINE __attribute__((always_inline))

namespace fastabsld {

using KdFloatV = float __attribute__((vector_size(64)));
using KdIntV = int32_t __attribute__((vector_size(64)));
using KdFloatHalfV = float __attribute__((vector_size(32)));  // for short rows (less padding)
using KdIntHalfV = int32_t __attribute__((vector_size(32)));

template <typename V>
constexpr int kd_lanes() {
  return std::is_scalar_v<V> ? 1 : static_cast<int>(sizeof(V) / sizeof(float));
}

template <typename V, typename S>
KD_INLINE inline V kd_splat(S value) {
  if constexpr (std::is_scalar_v<V>) {
    return static_cast<V>(value);
  } else {
    return V{} + static_cast<float>(value);
  }
}

// exp(x) for x <= 0 (the shifted logits): Cody-Waite reduction and a degree-6 polynomial
// (~1 ulp in fp32); exactly 0 below the smallest normal and for -inf.
KD_INLINE inline double kd_exp(double x) { return std::exp(x); }

template <typename V>
KD_INLINE inline V kd_exp(V x) {
  const V lo = kd_splat<V>(-87.3f), hi = kd_splat<V>(88.0f);
  const V clamped = x < lo ? lo : (x > hi ? hi : x);
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V k = (clamped * 1.44269504088896341f + round_magic) - round_magic;
  const V r = (clamped - k * 0.693359375f) - k * -2.12194440e-4f;
  V p = kd_splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  V scale;
  if constexpr (std::is_scalar_v<V>) {
    scale = std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
  } else {
    using I = std::conditional_t<sizeof(V) == sizeof(KdFloatV), KdIntV, KdIntHalfV>;
    scale = std::bit_cast<V>((__builtin_convertvector(k, I) + 127) << 23);
  }
  return x < lo ? kd_splat<V>(0) : p * scale;
}

// Loads `count` <= W values, the missing lanes set to `fill`. A partial block goes through a
// small array, lane by lane (unrolled, so that no library memcpy call replaces the loop).
template <typename V, typename acc_t>
KD_INLINE inline V kd_load(const acc_t* src, int count, acc_t fill) {
  constexpr int W = kd_lanes<V>();
  V v;
  if (count == W) {
    std::memcpy(&v, src, sizeof(V));
  } else {
    acc_t lanes[W];
    for (int i = 0; i < W; ++i) lanes[i] = i < count ? src[i] : fill;
    std::memcpy(&v, lanes, sizeof(V));
  }
  return v;
}

template <typename V, typename acc_t>
KD_INLINE inline void kd_store(acc_t* dst, V v, int count) {
  constexpr int W = kd_lanes<V>();
  if (count == W) {
    std::memcpy(dst, &v, sizeof(V));
  } else {
    acc_t lanes[W];
    std::memcpy(lanes, &v, sizeof(V));
    for (int i = 0; i < W; ++i) {
      if (i < count) dst[i] = lanes[i];
    }
  }
}

template <typename V, typename acc_t>
KD_INLINE inline acc_t kd_sum(V v) {
  if constexpr (std::is_scalar_v<V>) {
    return v;
  } else {
    acc_t total = 0;
    for (int i = 0; i < kd_lanes<V>(); ++i) total += v[i];
    return total;
  }
}

template <typename V, typename acc_t>
KD_INLINE inline acc_t kd_max(V v) {
  if constexpr (std::is_scalar_v<V>) {
    return v;
  } else {
    acc_t best = v[0];
    for (int i = 1; i < kd_lanes<V>(); ++i) best = v[i] > best ? v[i] : best;
    return best;
  }
}

// What one row needs: the teacher's and student's rows, the inverse temperatures, the row's
// weight, and the outputs (nullptr when not wanted). `scratch` holds kd_scratch_size(cols) values.
template <typename acc_t>
struct KdRow {
  const acc_t* t;
  const acc_t* s;
  int64_t cols;
  acc_t inv_tau_t, inv_tau_s;
  acc_t weight;
  acc_t* grad_s;
  acc_t* grad_t;
  acc_t* scratch;
};

inline int64_t kd_scratch_size(int64_t cols) { return 3 * (cols + 16); }

// Calls body(c, width) over the row in blocks of W; the last block may be partial.
template <int W, typename F>
KD_INLINE inline void kd_blocks(int64_t n, F&& body) {
  int64_t c = 0;
  for (; c + W <= n; c += W) body(c, W);
  if (c < n) body(c, static_cast<int>(n - c));
}

template <typename V, typename acc_t, bool kTeacherGrad>
KD_INLINE inline acc_t kd_row_impl(const KdRow<acc_t>& r) {
  constexpr int W = kd_lanes<V>();
  const int64_t n = r.cols;
  const int64_t padded = (n + W - 1) / W * W;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t* ea = r.scratch;
  acc_t* eb = ea + padded;
  acc_t* diff = eb + padded;
  V vmt = kd_splat<V>(neg_inf), vms = vmt;
  kd_blocks<W>(n, [&](int64_t c, int width) KD_INLINE {
    const V t = kd_load<V>(r.t + c, width, neg_inf);
    const V s = kd_load<V>(r.s + c, width, neg_inf);
    vmt = t > vmt ? t : vmt;
    vms = s > vms ? s : vms;
  });
  const V mt = kd_splat<V>(kd_max<V, acc_t>(vmt)), ms = kd_splat<V>(kd_max<V, acc_t>(vms));
  const V zero = kd_splat<V>(0);
  V vzt = zero, vzs = zero, vw = zero;
  // Padded lanes read -inf: their exponentials are 0 and they add nothing.
  kd_blocks<W>(n, [&](int64_t c, int width) KD_INLINE {
    const V a = (kd_load<V>(r.t + c, width, neg_inf) - mt) * r.inv_tau_t;  // log p + log zt
    const V b = (kd_load<V>(r.s + c, width, neg_inf) - ms) * r.inv_tau_s;  // log q + log zs
    const V pa = kd_exp(a);
    const V qb = kd_exp(b);
    kd_store<V>(ea + c, pa, W);
    kd_store<V>(eb + c, qb, W);
    if constexpr (kTeacherGrad) kd_store<V>(diff + c, a - b, W);
    vzt += pa;
    vzs += qb;
    vw += pa > zero ? pa * (a - b) : zero;  // 0 log 0 = 0
  });
  const acc_t inv_zt = acc_t(1) / kd_sum<V, acc_t>(vzt), inv_zs = acc_t(1) / kd_sum<V, acc_t>(vzs);
  const acc_t log_ratio = std::log(inv_zt / inv_zs);  // log zs - log zt
  const acc_t loss = kd_sum<V, acc_t>(vw) * inv_zt + log_ratio;
  if (r.grad_s != nullptr) {
    const acc_t cq = r.weight * r.inv_tau_s * inv_zs, cp = r.weight * r.inv_tau_s * inv_zt;
    kd_blocks<W>(n, [&](int64_t c, int width) KD_INLINE {
      const V g = kd_load<V>(eb + c, W, acc_t(0)) * cq - kd_load<V>(ea + c, W, acc_t(0)) * cp;
      kd_store<V>(r.grad_s + c, g, width);
    });
  }
  if constexpr (kTeacherGrad) {
    const acc_t offset = log_ratio - loss;
    const acc_t cp = r.weight * r.inv_tau_t * inv_zt;
    kd_blocks<W>(n, [&](int64_t c, int width) KD_INLINE {
      const V p = kd_load<V>(ea + c, W, acc_t(0));
      const V g = p > zero ? p * cp * (kd_load<V>(diff + c, W, acc_t(0)) + offset) : zero;
      kd_store<V>(r.grad_t + c, g, width);
    });
  }
  return r.weight * loss;
}

// The row loss w * KL(p || q); fills grad_s / grad_t when they are not nullptr.
template <typename V, typename acc_t>
KD_INLINE inline acc_t kd_row_lanes(const KdRow<acc_t>& r) {
  return r.grad_t != nullptr ? kd_row_impl<V, acc_t, true>(r) : kd_row_impl<V, acc_t, false>(r);
}

template <typename acc_t>
KD_INLINE inline acc_t kd_row(const KdRow<acc_t>& r) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return r.cols < 32 ? kd_row_lanes<KdFloatHalfV>(r) : kd_row_lanes<KdFloatV>(r);
  } else {
    return kd_row_lanes<double>(r);
  }
}

}  // namespace fastabsld
