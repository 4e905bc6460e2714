// Argument checks and layout helpers shared by the CPU and CUDA PGD-step kernels.
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace fastabsld {

struct PgdStepArgs {
  at::Tensor x_adv, x, grad;                 // same shape, same dense layout, batch outermost
  std::optional<at::Tensor> alpha, eps;      // (B,) fp32 on the inputs' device, or empty
  int64_t batch = 0;
  int64_t per_sample = 0;                    // elements per sample
};

inline PgdStepArgs prepare_pgd_step(const at::Tensor& x_adv, const at::Tensor& x,
                                    const at::Tensor& grad,
                                    const std::optional<at::Tensor>& alpha_per_sample,
                                    const std::optional<at::Tensor>& eps_per_sample,
                                    double clamp_min, double clamp_max) {
  TORCH_CHECK(x_adv.dim() >= 1, "pgd_step: x_adv must have a batch dimension");
  TORCH_CHECK(x.sizes() == x_adv.sizes() && grad.sizes() == x_adv.sizes(),
              "pgd_step: x_adv ", x_adv.sizes(), ", x ", x.sizes(), " and grad ", grad.sizes(),
              " must have the same shape");
  TORCH_CHECK(x.device() == x_adv.device() && grad.device() == x_adv.device(),
              "pgd_step: all tensors must be on one device");
  TORCH_CHECK(at::isFloatingType(x_adv.scalar_type()), "pgd_step: x_adv must be floating point");
  TORCH_CHECK(clamp_min <= clamp_max, "pgd_step: clamp min ", clamp_min, " > max ", clamp_max);
  PgdStepArgs a;
  a.batch = x_adv.size(0);
  a.per_sample = a.batch == 0 ? 0 : x_adv.numel() / a.batch;
  const auto format = x_adv.suggest_memory_format();
  a.x_adv = x_adv.contiguous(format);
  a.x = x.to(x_adv.scalar_type()).contiguous(format);
  a.grad = grad.contiguous(format);
  auto per_sample = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return std::optional<at::Tensor>();
    TORCH_CHECK(t->dim() == 1 && t->size(0) == a.batch, "pgd_step: ", name,
                " must have shape (", a.batch, ",), got ", t->sizes());
    return std::optional<at::Tensor>(t->to(x_adv.device(), at::kFloat).contiguous());
  };
  a.alpha = per_sample(alpha_per_sample, "alpha");
  a.eps = per_sample(eps_per_sample, "eps");
  return a;
}

}  // namespace fastabsld
