// Per-element and per-sample math of the PGD step, shared by the C++ CPU and the CUDA kernels.
//
// Everything is templated on the compute type acc_t: double for fp64 inputs, float for
// fp32/fp16/bf16 inputs (at::opmath_type). Sums of squares are kept in double in both cases.
//
// L-inf, in torchattacks' operation order:
//   delta = clamp(x_adv + alpha * sign(grad) - x, -eps, eps); out = clamp(x + delta, lo, hi).
// L2 (torchattacks' PGDL2): with gden = ||grad|| + 1e-10 and d0 = x_adv - x,
//   delta = d0 + (alpha / gden) * grad, factor = min(1, eps / ||delta||) (1 where delta = 0),
//   out = clamp(x + factor * delta, lo, hi).
// ||delta|| is a sum over the delta elements themselves, computed exactly as the element pass
// computes them. Expanding it as ||d0||^2 + 2 s <d0, grad> + s^2 ||grad||^2 would cancel
// catastrophically when the step nearly undoes d0 (the ascent turning back), and a norm of
// other values than the ones projected would leave the output outside the eps ball.
// So an L2 step is three passes per sample: ||grad||, then ||delta||, then the output.
//
// Range: squares of fp32 values are exact in double and cannot overflow or underflow there.
// fp64 values are summed in three scaled accumulators (Blue's algorithm, with the thresholds of
// Anderson, "Algorithm 978: Safe Scaling in the Level 1 BLAS", 2017), and a norm is returned as
// value * 2^exponent, so even ||grad|| beyond the double range gives the right direction. The
// step is applied as step * (grad * scale), scale a power of two, so that neither factor leaves
// the normal range of acc_t, even with flush-to-zero (nvcc --use_fast_math).
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FASTABSLD_HOST_DEVICE static __host__ __device__ __forceinline__
#else
// static: each translation unit (the AVX2 one included) keeps its own copy.
#define FASTABSLD_HOST_DEVICE static inline
#endif

namespace fastabsld {

constexpr double kL2GradDivisionEps = 1e-10;  // torchattacks' eps_for_division
constexpr double kDoubleMax = 1.7976931348623157e308;

// a * b + c: one rounding on CUDA (both L2 passes there compute delta identically); on the CPU
// the compiler's contraction rules apply, the same to both passes of one loop.
template <typename T>
FASTABSLD_HOST_DEVICE T mul_add(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  return a * b + c;
#endif
}

template <typename T>
FASTABSLD_HOST_DEVICE T sign_or_zero(T g) {
  return static_cast<T>((g > T(0)) - (g < T(0)));
}

// NaN passes through (both comparisons are false), as in torch.clamp.
template <typename T>
FASTABSLD_HOST_DEVICE T clamp_to(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// L-inf step for one element.
template <typename T>
FASTABSLD_HOST_DEVICE T pgd_linf_element(T x_adv, T x, T grad, T alpha, T eps, T lo, T hi) {
  const T delta = clamp_to(x_adv + alpha * sign_or_zero(grad) - x, -eps, eps);
  return clamp_to(x + delta, lo, hi);
}

// ---- sums of squares without overflow -------------------------------------------------------

// Aggregates without constructors: nothing here has an out-of-line definition that the AVX2
// translation unit could contribute to the others.
template <typename acc_t>
struct SumSquares;

// fp32 values (also fp16/bf16 ones, computed in fp32): their squares are exact in double.
template <>
struct SumSquares<float> {
  double mid;
};

// fp64 values: squares of |v| > kBlueBig are summed scaled by 2^-538, of |v| < kBlueSmall scaled
// by 2^537, the others unscaled; none of the three sums can overflow or lose its precision.
template <>
struct SumSquares<double> {
  double big, mid, small;
};

constexpr double kBlueSmall = 0x1p-511;       // 2^ceil((DBL_MIN_EXP - 2) / 2)
constexpr double kBlueBig = 0x1p486;          // 2^floor((DBL_MAX_EXP - DBL_MANT_DIG + 1) / 2)
constexpr double kBlueScaleSmall = 0x1p537;   // 2^-floor((DBL_MIN_EXP - 1 - DBL_MANT_DIG) / 2)
constexpr double kBlueScaleBig = 0x1p-538;    // 2^-ceil((DBL_MAX_EXP + DBL_MANT_DIG - 1) / 2)
constexpr int kBlueExponentBig = 538;
constexpr int kBlueExponentSmall = -537;

FASTABSLD_HOST_DEVICE void add_square(SumSquares<float>& s, float v) {
  const double d = v;
  s.mid = mul_add(d, d, s.mid);
}

FASTABSLD_HOST_DEVICE void add_square(SumSquares<double>& s, double v) {
  const double a = fabs(v);
  if (a > kBlueBig) {
    const double scaled = v * kBlueScaleBig;
    s.big = mul_add(scaled, scaled, s.big);
  } else if (a < kBlueSmall) {
    const double scaled = v * kBlueScaleSmall;
    s.small = mul_add(scaled, scaled, s.small);
  } else {
    s.mid = mul_add(v, v, s.mid);  // also NaN
  }
}

FASTABSLD_HOST_DEVICE void merge_into(SumSquares<float>& s, const SumSquares<float>& o) {
  s.mid += o.mid;
}

FASTABSLD_HOST_DEVICE void merge_into(SumSquares<double>& s, const SumSquares<double>& o) {
  s.big += o.big;
  s.mid += o.mid;
  s.small += o.small;
}

// A norm as value * 2^exponent; exponent is 0 unless the norm lies outside the double range
// (or near its ends).
struct ScaledNorm {
  double value;
  int exponent;
};

FASTABSLD_HOST_DEVICE ScaledNorm norm_of(const SumSquares<float>& s) {
  return {sqrt(s.mid), 0};
}

FASTABSLD_HOST_DEVICE ScaledNorm norm_of(const SumSquares<double>& s) {
  if (s.mid != s.mid) return {s.mid, 0};  // NaN
  if (s.big > 0.0) {
    // The medium sum, scaled into the big one, can only matter when it is not tiny there.
    return {sqrt(s.big + (s.mid * kBlueScaleBig) * kBlueScaleBig), kBlueExponentBig};
  }
  if (s.small > 0.0) {
    if (s.mid > 0.0) {
      const double medium = sqrt(s.mid), small = sqrt(s.small) / kBlueScaleSmall;
      const double hi = medium > small ? medium : small, lo = medium > small ? small : medium;
      const double ratio = lo / hi;
      return {hi * sqrt(1.0 + ratio * ratio), 0};
    }
    return {sqrt(s.small), kBlueExponentSmall};
  }
  return {sqrt(s.mid), 0};
}

// ---- the L2 step ----------------------------------------------------------------------------

template <typename acc_t>
struct ExponentRange;
template <>
struct ExponentRange<float> {
  static constexpr int kMin = -126, kMax = 127;  // normal floats: flush-to-zero safe
};
template <>
struct ExponentRange<double> {
  static constexpr int kMin = -1022, kMax = 1023;
};

// alpha * grad / (||grad|| + 1e-10) = step * (grad * scale), scale a power of two.
template <typename acc_t>
struct L2Step {
  acc_t step, scale;
};

// The step of one sample from its gradient norm. In the usual range, step * (grad * scale)
// rounds exactly as float(alpha / gden) * grad would: scaling by a power of two is exact.
template <typename acc_t>
FASTABSLD_HOST_DEVICE L2Step<acc_t> l2_step(ScaledNorm grad_norm, double alpha) {
  // alpha * grad / (v 2^e + 1e-10) = [alpha / (v + 1e-10 2^-e)] * (grad 2^-e)
  const double step = alpha / (grad_norm.value + ldexp(kL2GradDivisionEps, -grad_norm.exponent));
  if (!(step > 0.0) || !(step <= kDoubleMax)) {
    // 0 (alpha = 0 or an infinite gradient), NaN, or an infinite alpha: no scaling to choose.
    return {static_cast<acc_t>(step), acc_t(1)};
  }
  int e = 0;
  const double mantissa = frexp(step, &e);  // step = mantissa 2^e, mantissa in [0.5, 1)
  int scale_exponent = e - grad_norm.exponent;
  scale_exponent = scale_exponent < ExponentRange<acc_t>::kMin ? ExponentRange<acc_t>::kMin
                                                                : scale_exponent;
  scale_exponent = scale_exponent > ExponentRange<acc_t>::kMax ? ExponentRange<acc_t>::kMax
                                                                : scale_exponent;
  const double rest = ldexp(mantissa, e - grad_norm.exponent - scale_exponent);
  return {static_cast<acc_t>(rest), static_cast<acc_t>(ldexp(1.0, scale_exponent))};
}

// delta of one element, as both the norm pass and the output pass compute it.
template <typename acc_t>
FASTABSLD_HOST_DEVICE acc_t l2_delta(acc_t x_adv, acc_t x, acc_t grad, L2Step<acc_t> s) {
  return mul_add(s.step, grad * s.scale, x_adv - x);
}

// min(1, eps / ||delta||); 1 where delta = 0 (also for eps = 0).
template <typename acc_t>
FASTABSLD_HOST_DEVICE acc_t l2_factor(ScaledNorm delta_norm, double eps) {
  if (!(delta_norm.value > 0.0)) return acc_t(1);  // delta = 0; NaN is carried by delta
  const double ratio = ldexp(eps / delta_norm.value, -delta_norm.exponent);
  return ratio < 1.0 ? static_cast<acc_t>(ratio) : acc_t(1);
}

// L2 step for one element, given its sample's step and projection factor.
template <typename acc_t>
FASTABSLD_HOST_DEVICE acc_t pgd_l2_element(acc_t x_adv, acc_t x, acc_t grad, L2Step<acc_t> s,
                                           acc_t factor, acc_t lo, acc_t hi) {
  return clamp_to(mul_add(factor, l2_delta(x_adv, x, grad, s), x), lo, hi);
}

}  // namespace fastabsld
