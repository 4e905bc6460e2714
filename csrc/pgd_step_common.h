// Argument checks and layout helpers shared by the CPU and CUDA PGD-step kernels.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <string>

namespace fastabsld {

enum class PgdNorm { kLinf, kL2 };

struct PgdStepArgs {
  at::Tensor x_adv, x, grad;                 // same shape, dtype and dense layout, batch outermost
  std::optional<at::Tensor> alpha, eps;      // (B,) fp32 on the inputs' device, or empty
  float alpha_value = 0.0f, eps_value = 0.0f, lo = 0.0f, hi = 0.0f;
  PgdNorm norm = PgdNorm::kLinf;
  int64_t batch = 0;
  int64_t per_sample = 0;                    // elements per sample
};

// The layout of the output: x_adv's when it is dense channels_last(_3d), else contiguous.
// Mirrors fastabsld.reference.memory_format_of (the fake kernel's choice).
inline at::MemoryFormat output_format(const at::Tensor& t) {
  if (!t.is_contiguous()) {
    if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      return at::MemoryFormat::ChannelsLast;
    }
    if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
      return at::MemoryFormat::ChannelsLast3d;
    }
  }
  return at::MemoryFormat::Contiguous;
}

inline PgdNorm parse_norm(c10::string_view norm) {
  if (norm == "linf") return PgdNorm::kLinf;
  TORCH_CHECK_VALUE(norm == "l2", "pgd_step: norm must be 'linf' or 'l2', got '", std::string(norm), "'");
  return PgdNorm::kL2;
}

// Checks every argument (ValueError on bad input) and brings the tensors to one dense layout.
// Per-sample values are checked on the CPU only: on CUDA that would need a host sync.
inline PgdStepArgs prepare_pgd_step(const at::Tensor& x_adv, const at::Tensor& x,
                                    const at::Tensor& grad,
                                    const std::optional<at::Tensor>& alpha_per_sample,
                                    const std::optional<at::Tensor>& eps_per_sample, double alpha,
                                    double eps, c10::string_view norm, double clamp_min,
                                    double clamp_max) {
  PgdStepArgs a;
  a.norm = parse_norm(norm);
  TORCH_CHECK_VALUE(x_adv.dim() >= 1, "pgd_step: x_adv must have a batch dimension");
  TORCH_CHECK_VALUE(x.sizes() == x_adv.sizes() && grad.sizes() == x_adv.sizes(),
                    "pgd_step: x_adv ", x_adv.sizes(), ", x ", x.sizes(), " and grad ",
                    grad.sizes(), " must have the same shape");
  TORCH_CHECK_VALUE(x.device() == x_adv.device() && grad.device() == x_adv.device(),
                    "pgd_step: x_adv, x and grad must be on one device");
  TORCH_CHECK_VALUE(at::isFloatingType(x_adv.scalar_type()) &&
                        at::isFloatingType(x.scalar_type()) &&
                        at::isFloatingType(grad.scalar_type()),
                    "pgd_step: x_adv, x and grad must be floating point");
  TORCH_CHECK_VALUE(alpha >= 0.0, "pgd_step: alpha must be non-negative and not NaN, got ", alpha);
  TORCH_CHECK_VALUE(eps >= 0.0, "pgd_step: eps must be non-negative and not NaN, got ", eps);
  TORCH_CHECK_VALUE(clamp_min <= clamp_max, "pgd_step: clamp min ", clamp_min, " > max ",
                    clamp_max);
  a.alpha_value = static_cast<float>(alpha);
  a.eps_value = static_cast<float>(eps);
  a.lo = static_cast<float>(clamp_min);
  a.hi = static_cast<float>(clamp_max);
  a.batch = x_adv.size(0);
  a.per_sample = a.batch == 0 ? 0 : x_adv.numel() / a.batch;
  const auto format = output_format(x_adv);
  const auto dtype = x_adv.scalar_type();
  a.x_adv = x_adv.contiguous(format);
  a.x = x.to(dtype).contiguous(format);
  a.grad = grad.to(dtype).contiguous(format);
  auto per_sample = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return std::optional<at::Tensor>();
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == a.batch, "pgd_step: ", name,
                      " must be a number or a tensor of shape (", a.batch, ",), got shape ",
                      t->sizes());
    at::Tensor values = t->to(x_adv.device(), at::kFloat).contiguous();
    if (values.device().is_cpu()) {
      const float* v = values.const_data_ptr<float>();
      for (int64_t b = 0; b < a.batch; ++b) {
        TORCH_CHECK_VALUE(v[b] >= 0.0f, "pgd_step: ", name,
                          " must be non-negative and not NaN, got ", v[b], " for sample ", b);
      }
    }
    return std::optional<at::Tensor>(values);
  };
  a.alpha = per_sample(alpha_per_sample, "alpha");
  a.eps = per_sample(eps_per_sample, "eps");
  return a;
}

}  // namespace fastabsld
