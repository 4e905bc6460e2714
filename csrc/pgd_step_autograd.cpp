// Autograd kernel of fastabsld::pgd_step: the step is not differentiable (sign, projection),
// so its output never requires grad, whatever its inputs do (like argmax). Registered in C++
// so that the attack loop pays no Python dispatch per step.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

namespace fastabsld {
namespace {

at::Tensor pgd_step_not_differentiable(const at::Tensor& x_adv, const at::Tensor& x,
                                       const at::Tensor& grad,
                                       const std::optional<at::Tensor>& alpha_per_sample,
                                       const std::optional<at::Tensor>& eps_per_sample,
                                       double alpha, double eps, c10::string_view norm,
                                       double clamp_min, double clamp_max) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastabsld::pgd_step", "")
                             .typed<decltype(pgd_step_not_differentiable)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha, eps, norm, clamp_min,
                 clamp_max);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastabsld, Autograd, m) {
  m.impl("pgd_step", &pgd_step_not_differentiable);
}

}  // namespace fastabsld
