// CUDA kernel of fastabsld::pgd_step: reads x_adv, x and grad once and writes once (L-inf).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pgd_step_common.h"
#include "pgd_step_math.h"

namespace fastabsld {
namespace {

template <typename scalar_t>
__global__ void linf_kernel(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ x0,
                            const scalar_t* __restrict__ g, scalar_t* __restrict__ out,
                            const float* __restrict__ alpha_b, const float* __restrict__ eps_b,
                            float alpha, float eps, float lo, float hi, int64_t numel,
                            int64_t per_sample) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += stride) {
    const int64_t b = i / per_sample;
    const float step = alpha_b ? alpha_b[b] : alpha;
    const float radius = eps_b ? eps_b[b] : eps;
    out[i] = static_cast<scalar_t>(pgd_linf_element(static_cast<float>(xa[i]),
                                                    static_cast<float>(x0[i]),
                                                    static_cast<float>(g[i]), step, radius, lo,
                                                    hi));
  }
}

at::Tensor pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                         const std::optional<at::Tensor>& alpha_per_sample,
                         const std::optional<at::Tensor>& eps_per_sample, double alpha, double eps,
                         c10::string_view norm, double clamp_min, double clamp_max) {
  TORCH_CHECK(norm == "linf", "pgd_step: norm must be 'linf', got '", std::string(norm), "'");
  const c10::cuda::CUDAGuard guard(x_adv.device());
  PgdStepArgs a =
      prepare_pgd_step(x_adv, x, grad, alpha_per_sample, eps_per_sample, clamp_min, clamp_max);
  at::Tensor out = at::empty_like(a.x_adv);
  const int64_t numel = a.x_adv.numel();
  if (numel == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 65535 * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x_adv.scalar_type(), "pgd_step_cuda", [&] {
        linf_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
            a.x_adv.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
            a.grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
            a.alpha ? a.alpha->const_data_ptr<float>() : nullptr,
            a.eps ? a.eps->const_data_ptr<float>() : nullptr, static_cast<float>(alpha),
            static_cast<float>(eps), static_cast<float>(clamp_min),
            static_cast<float>(clamp_max), numel, a.per_sample);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastabsld, CUDA, m) { m.impl("pgd_step", &pgd_step_cuda); }

}  // namespace fastabsld
