// CPU kernel of fastabsld::pgd_step: parallel over samples (at::parallel_for). fp32 runs the
// AVX2 loops of pgd_step_cpu_avx2.cpp where the CPU has them; fp16/bf16 (and CPUs without AVX2)
// run the scalar loops below, in fp32. L-inf: one pass per sample. L2: a reduction pass (three
// per-sample sums) and an element pass, both over a sample that stays in cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "pgd_step_common.h"
#include "pgd_step_cpu_simd.h"
#include "pgd_step_math.h"

namespace fastabsld {
namespace {

const bool kHasAvx2 = avx2::available();

template <typename scalar_t>
constexpr bool use_avx2() {
  return std::is_same_v<scalar_t, float>;
}

struct LinfSample {
  float alpha, eps, lo, hi;

  template <typename scalar_t>
  void run(const scalar_t* xa, const scalar_t* x0, const scalar_t* g, scalar_t* o, int64_t n) const {
    if constexpr (use_avx2<scalar_t>()) {
      if (kHasAvx2) return avx2::linf_sample(xa, x0, g, o, n, alpha, eps, lo, hi);
    }
    for (int64_t i = 0; i < n; ++i) {
      o[i] = static_cast<scalar_t>(pgd_linf_element(static_cast<float>(xa[i]),
                                                    static_cast<float>(x0[i]),
                                                    static_cast<float>(g[i]), alpha, eps, lo, hi));
    }
  }
};

struct L2Sample {
  float alpha, eps, lo, hi;

  template <typename scalar_t>
  void run(const scalar_t* xa, const scalar_t* x0, const scalar_t* g, scalar_t* o, int64_t n) const {
    if constexpr (use_avx2<scalar_t>()) {
      if (kHasAvx2) {
        const L2Coefficients c = l2_coefficients(avx2::l2_sums(xa, x0, g, n), alpha, eps);
        return avx2::l2_apply(xa, x0, g, o, n, c, lo, hi);
      }
    }
    L2Sums s;
    for (int64_t i = 0; i < n; ++i) {
      l2_accumulate(s, static_cast<float>(xa[i]), static_cast<float>(x0[i]),
                    static_cast<float>(g[i]));
    }
    const L2Coefficients c = l2_coefficients(s, alpha, eps);
    for (int64_t i = 0; i < n; ++i) {
      o[i] = static_cast<scalar_t>(pgd_l2_element(static_cast<float>(xa[i]),
                                                  static_cast<float>(x0[i]),
                                                  static_cast<float>(g[i]), c, lo, hi));
    }
  }
};

// Runs Sample{alpha_b, eps_b, lo, hi}.run on every sample, samples split across threads.
template <typename Sample, typename scalar_t>
void for_each_sample(const PgdStepArgs& a, at::Tensor& out) {
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
      const Sample sample{alpha_b ? alpha_b[b] : a.alpha_value, eps_b ? eps_b[b] : a.eps_value,
                          a.lo, a.hi};
      const int64_t base = b * n;
      sample.run(xa + base, x0 + base, g + base, o + base, n);
    }
  });
}

at::Tensor pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                        const std::optional<at::Tensor>& alpha_per_sample,
                        const std::optional<at::Tensor>& eps_per_sample, double alpha, double eps,
                        c10::string_view norm, double clamp_min, double clamp_max) {
  const PgdStepArgs a = prepare_pgd_step(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha,
                                         eps, norm, clamp_min, clamp_max);
  at::Tensor out = at::empty_like(a.x_adv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x_adv.scalar_type(), "pgd_step_cpu",
                                  [&] {
                                    if (a.norm == PgdNorm::kLinf) {
                                      for_each_sample<LinfSample, scalar_t>(a, out);
                                    } else {
                                      for_each_sample<L2Sample, scalar_t>(a, out);
                                    }
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastabsld, CPU, m) { m.impl("pgd_step", &pgd_step_cpu); }

}  // namespace fastabsld
