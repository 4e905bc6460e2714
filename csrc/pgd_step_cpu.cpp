// CPU kernel of fastabsld::pgd_step: parallel over samples, one pass over each sample.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pgd_step_common.h"
#include "pgd_step_math.h"

namespace fastabsld {
namespace {

template <typename scalar_t>
void linf_rows(const PgdStepArgs& a, at::Tensor& out, float alpha, float eps, float lo, float hi) {
  const scalar_t* xa = a.x_adv.const_data_ptr<scalar_t>();
  const scalar_t* x0 = a.x.const_data_ptr<scalar_t>();
  const scalar_t* g = a.grad.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const float* alpha_b = a.alpha ? a.alpha->const_data_ptr<float>() : nullptr;
  const float* eps_b = a.eps ? a.eps->const_data_ptr<float>() : nullptr;
  const int64_t n = a.per_sample;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
  at::parallel_for(0, a.batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float step = alpha_b ? alpha_b[b] : alpha;
      const float radius = eps_b ? eps_b[b] : eps;
      const int64_t base = b * n;
      for (int64_t i = base; i < base + n; ++i) {
        o[i] = static_cast<scalar_t>(pgd_linf_element(static_cast<float>(xa[i]),
                                                      static_cast<float>(x0[i]),
                                                      static_cast<float>(g[i]), step, radius,
                                                      lo, hi));
      }
    }
  });
}

at::Tensor pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                        const std::optional<at::Tensor>& alpha_per_sample,
                        const std::optional<at::Tensor>& eps_per_sample, double alpha, double eps,
                        c10::string_view norm, double clamp_min, double clamp_max) {
  TORCH_CHECK(norm == "linf", "pgd_step: norm must be 'linf', got '", std::string(norm), "'");
  PgdStepArgs a =
      prepare_pgd_step(x_adv, x, grad, alpha_per_sample, eps_per_sample, clamp_min, clamp_max);
  at::Tensor out = at::empty_like(a.x_adv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x_adv.scalar_type(), "pgd_step_cpu",
                                  [&] {
                                    linf_rows<scalar_t>(a, out, static_cast<float>(alpha),
                                                        static_cast<float>(eps),
                                                        static_cast<float>(clamp_min),
                                                        static_cast<float>(clamp_max));
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastabsld, CPU, m) { m.impl("pgd_step", &pgd_step_cpu); }

}  // namespace fastabsld
