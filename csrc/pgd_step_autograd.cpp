// Autograd kernel of fastabsld::pgd_step. The step has no derivative (sign steps, projections
// and clamps: what an attack needs is the gradient of its loss at x_adv, not through the step),
// and asking for one is an error, never zeros: where grad mode is on and an input requires grad,
// the output carries a node that raises when a backward reaches it; an input with a forward-mode
// tangent raises at once. Registered in C++ so that the attack loop pays no Python dispatch per
// step.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

namespace fastabsld {
namespace {

constexpr const char* kNoDerivative =
    "fastabsld::pgd_step has no derivative (its sign step, projection and clamp are not "
    "differentiated); take the gradient of the attack loss at x_adv and pass the inputs detached";

at::Tensor pgd_step_no_derivative(const at::Tensor& x_adv, const at::Tensor& x,
                                  const at::Tensor& grad,
                                  const std::optional<at::Tensor>& alpha_per_sample,
                                  const std::optional<at::Tensor>& eps_per_sample, double alpha,
                                  double eps, c10::string_view norm, double clamp_min,
                                  double clamp_max) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastabsld::pgd_step", "")
                             .typed<decltype(pgd_step_no_derivative)>();
  const at::Tensor alpha_t = alpha_per_sample.value_or(at::Tensor());
  const at::Tensor eps_t = eps_per_sample.value_or(at::Tensor());
  using torch::autograd::isFwGradDefined;
  TORCH_CHECK_NOT_IMPLEMENTED(!(isFwGradDefined(x_adv) || isFwGradDefined(x) || isFwGradDefined(grad) ||
                                isFwGradDefined(alpha_t) || isFwGradDefined(eps_t)),
                              kNoDerivative, " (forward mode)");
  at::Tensor out;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = op.call(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha, eps, norm, clamp_min,
                  clamp_max);
  }
  if (torch::autograd::compute_requires_grad(x_adv, x, grad, alpha_t, eps_t)) {
    auto node = c10::make_intrusive<torch::autograd::Error>(kNoDerivative);
    node->set_next_edges(torch::autograd::collect_next_edges(x_adv, x, grad, alpha_t, eps_t));
    torch::autograd::set_history(out, node);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastabsld, Autograd, m) { m.impl("pgd_step", &pgd_step_no_derivative); }

}  // namespace fastabsld
