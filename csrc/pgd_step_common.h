// Argument checks and layout helpers shared by the CPU and CUDA PGD-step kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <optional>
#include <string>

namespace fastabsld {

enum class PgdNorm { kLinf, kL2 };

struct PgdStepArgs {
  at::Tensor x_adv, x, grad;                 // same shape, dtype and dense layout, batch outermost
  std::optional<at::Tensor> alpha, eps;      // (B,) in the compute dtype on x_adv's device, or empty
  // The compute dtype: fp64 for fp64 inputs, else fp32 (at::opmath_type).
  at::ScalarType compute = at::kFloat;
  double alpha_value = 0.0, eps_value = 0.0, lo = 0.0, hi = 0.0;
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

// Every tensor argument must lie on x_adv's device: the kernels read all of them through raw
// pointers, and the dispatcher would otherwise pick the kernel of the highest-priority device
// among them (a meta grad selects the meta kernel, which returns uninitialised memory).
// RuntimeError, as for PyTorch's own device mismatches.
inline void check_pgd_step_devices(const at::Tensor& x_adv, const at::Tensor& x,
                                   const at::Tensor& grad,
                                   const std::optional<at::Tensor>& alpha_per_sample,
                                   const std::optional<at::Tensor>& eps_per_sample) {
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x_adv.device(), "pgd_step: ", name, " is on ", t.device(),
                " but x_adv is on ", x_adv.device(),
                "; every tensor argument must be on x_adv's device");
  };
  check(x, "x");
  check(grad, "grad");
  if (alpha_per_sample.has_value()) check(*alpha_per_sample, "alpha_per_sample");
  if (eps_per_sample.has_value()) check(*eps_per_sample, "eps_per_sample");
}

// Checks every argument (ValueError on bad values, RuntimeError on a device mismatch) and brings
// the tensors to one dense layout.
// Per-sample values are checked on the CPU only: on CUDA that would need a host sync.
inline PgdStepArgs prepare_pgd_step(const at::Tensor& x_adv, const at::Tensor& x,
                                    const at::Tensor& grad,
                                    const std::optional<at::Tensor>& alpha_per_sample,
                                    const std::optional<at::Tensor>& eps_per_sample, double alpha,
                                    double eps, c10::string_view norm, double clamp_min,
                                    double clamp_max) {
  PgdStepArgs a;
  a.norm = parse_norm(norm);
  check_pgd_step_devices(x_adv, x, grad, alpha_per_sample, eps_per_sample);
  TORCH_CHECK_VALUE(x_adv.dim() >= 1, "pgd_step: x_adv must have a batch dimension");
  TORCH_CHECK_VALUE(x.sizes() == x_adv.sizes() && grad.sizes() == x_adv.sizes(),
                    "pgd_step: x_adv ", x_adv.sizes(), ", x ", x.sizes(), " and grad ",
                    grad.sizes(), " must have the same shape");
  const auto dtype = x_adv.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                        dtype == at::kBFloat16,
                    "pgd_step: x_adv must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "pgd_step: x must be floating point, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(at::isFloatingType(grad.scalar_type()),
                    "pgd_step: grad must be floating point, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(alpha >= 0.0, "pgd_step: alpha must be non-negative and not NaN, got ", alpha);
  TORCH_CHECK_VALUE(eps >= 0.0, "pgd_step: eps must be non-negative and not NaN, got ", eps);
  TORCH_CHECK_VALUE(clamp_min <= clamp_max, "pgd_step: clamp min ", clamp_min, " > max ",
                    clamp_max);
  a.compute = at::toOpMathType(dtype);
  // The radii and the box in the compute dtype, as the kernels use them.
  const bool fp64 = a.compute == at::kDouble;
  auto in_compute = [fp64](double v) { return fp64 ? v : static_cast<double>(static_cast<float>(v)); };
  a.alpha_value = in_compute(alpha);
  a.eps_value = in_compute(eps);
  a.lo = in_compute(clamp_min);
  a.hi = in_compute(clamp_max);
  a.batch = x_adv.size(0);
  a.per_sample = a.batch == 0 ? 0 : x_adv.numel() / a.batch;
  const auto format = output_format(x_adv);
  a.x_adv = x_adv.contiguous(format);
  a.x = x.to(dtype).contiguous(format);
  a.grad = grad.to(dtype).contiguous(format);
  auto per_sample = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return std::optional<at::Tensor>();
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == a.batch, "pgd_step: ", name,
                      " must be a number or a tensor of shape (", a.batch, ",), got shape ",
                      t->sizes());
    at::Tensor values = t->to(a.compute).contiguous();
    if (values.device().is_cpu()) {
      AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "pgd_step_check", [&] {
        const scalar_t* v = values.const_data_ptr<scalar_t>();
        for (int64_t b = 0; b < a.batch; ++b) {
          TORCH_CHECK_VALUE(v[b] >= scalar_t(0), "pgd_step: ", name,
                            " must be non-negative and not NaN, got ", v[b], " for sample ", b);
        }
      });
    }
    return std::optional<at::Tensor>(values);
  };
  a.alpha = per_sample(alpha_per_sample, "alpha");
  a.eps = per_sample(eps_per_sample, "eps");
  return a;
}

}  // namespace fastabsld
