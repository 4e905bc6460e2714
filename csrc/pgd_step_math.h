// Per-element math of the PGD step, shared by the C++ CPU and the CUDA kernels so that both
// compute bit-identical results. Operation order follows torchattacks:
// delta = clamp(x_adv + alpha * sign(grad) - x, -eps, eps); out = clamp(x + delta, lo, hi).
#pragma once

#if defined(__CUDACC__)
#define FASTABSLD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTABSLD_HOST_DEVICE inline
#endif

namespace fastabsld {

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

}  // namespace fastabsld
