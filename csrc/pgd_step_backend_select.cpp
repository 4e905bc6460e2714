// BackendSelect kernel of fastabsld::pgd_step: checks that every tensor argument lies on x_adv's
// device before any backend kernel is chosen. The dispatcher picks the backend of the
// highest-priority device among the arguments, so without this check a grad (or a per-sample
// radius) on the meta device would run the meta kernel for CPU inputs and return uninitialised
// memory, and a CUDA grad would hand CPU pointers to the CUDA kernel. BackendSelect is in every
// dispatch (inference mode too), below autograd and above every backend.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "pgd_step_common.h"

namespace fastabsld {
namespace {

at::Tensor pgd_step_backend_select(c10::DispatchKeySet keys, const at::Tensor& x_adv,
                                   const at::Tensor& x, const at::Tensor& grad,
                                   const std::optional<at::Tensor>& alpha_per_sample,
                                   const std::optional<at::Tensor>& eps_per_sample, double alpha,
                                   double eps, c10::string_view norm, double clamp_min,
                                   double clamp_max) {
  check_pgd_step_devices(x_adv, x, grad, alpha_per_sample, eps_per_sample);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastabsld::pgd_step", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            double, double, c10::string_view, double, double)>();
  const c10::DispatchKeySet below(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);
  return op.redispatch(keys & below, x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha, eps,
                       norm, clamp_min, clamp_max);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastabsld, BackendSelect, m) {
  m.impl("pgd_step", TORCH_FN(pgd_step_backend_select));
}

}  // namespace fastabsld
