// Per-element and per-sample math of the PGD step, shared by the C++ CPU and the CUDA kernels.
//
// L-inf, in torchattacks' operation order:
//   delta = clamp(x_adv + alpha * sign(grad) - x, -eps, eps); out = clamp(x + delta, lo, hi).
// L2 (torchattacks' PGDL2): with d0 = x_adv - x, gden = ||grad|| + 1e-10 and step = alpha / gden,
//   delta = d0 + step * grad, factor = min(1, eps / ||delta||) (1 where delta = 0),
//   out = clamp(x + factor * delta, lo, hi).
// ||delta||^2 is expanded as ||d0||^2 + 2 step <d0, grad> + step^2 ||grad||^2, so one reduction
// pass over (x_adv, x, grad) gives everything the element pass needs.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FASTABSLD_HOST_DEVICE __host__ __device__ __forceinline__
#else
// static: each translation unit (the AVX2 one included) keeps its own copy.
#define FASTABSLD_HOST_DEVICE static inline
#endif

namespace fastabsld {

constexpr float kL2GradDivisionEps = 1e-10f;  // torchattacks' eps_for_division

FASTABSLD_HOST_DEVICE float sign_or_zero(float g) {
  return static_cast<float>((g > 0.0f) - (g < 0.0f));
}

FASTABSLD_HOST_DEVICE float clamp_to(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// L-inf step for one element.
FASTABSLD_HOST_DEVICE float pgd_linf_element(float x_adv, float x, float grad, float alpha,
                                             float eps, float lo, float hi) {
  const float delta = clamp_to(x_adv + alpha * sign_or_zero(grad) - x, -eps, eps);
  return clamp_to(x + delta, lo, hi);
}

// Per-sample sums of the L2 step: ||d0||^2, <d0, grad>, ||grad||^2.
struct L2Sums {
  float dd = 0.0f, dg = 0.0f, gg = 0.0f;
};

FASTABSLD_HOST_DEVICE void l2_accumulate(L2Sums& s, float x_adv, float x, float grad) {
  const float d0 = x_adv - x;
  s.dd += d0 * d0;
  s.dg += d0 * grad;
  s.gg += grad * grad;
}

// The two per-sample scalars of the L2 element pass: the step on grad and the projection factor.
struct L2Coefficients {
  float step, factor;
};

FASTABSLD_HOST_DEVICE L2Coefficients l2_coefficients(const L2Sums& s, float alpha, float eps) {
  const float g_norm = sqrtf(s.gg);
  const float step = alpha / (g_norm + kL2GradDivisionEps);
  const float step_g = step * g_norm;  // = ||step * grad|| <= alpha, no overflow in step^2
  float delta_sq = s.dd + 2.0f * step * s.dg + step_g * step_g;
  delta_sq = delta_sq > 0.0f ? delta_sq : 0.0f;
  float factor = 1.0f;
  if (delta_sq > 0.0f) {
    const float ratio = eps / sqrtf(delta_sq);
    factor = ratio < 1.0f ? ratio : 1.0f;
  }
  return {step, factor};
}

// L2 step for one element, given its sample's coefficients.
FASTABSLD_HOST_DEVICE float pgd_l2_element(float x_adv, float x, float grad, L2Coefficients c,
                                           float lo, float hi) {
  const float delta = (x_adv - x) + c.step * grad;
  return clamp_to(x + delta * c.factor, lo, hi);
}

}  // namespace fastabsld
