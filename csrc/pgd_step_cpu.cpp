// CPU kernel of fastabsld::pgd_step: parallel over samples (at::parallel_for), each sample by one
// thread in a fixed order, so results do not depend on the thread count. fp32 runs the vector
// loops of pgd_step_cpu_loops.h for AVX-512 or AVX2 where the CPU has them, on each thread's
// range of samples at once; fp16/bf16 (and CPUs without AVX2) run the scalar loops below in fp32,
// fp64 runs them in fp64. L-inf: one pass per sample. L2: three passes over a sample that stays in
// cache: ||grad||, ||delta||, the output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "pgd_step_common.h"
#include "pgd_step_cpu_simd.h"
#include "pgd_step_math.h"

namespace fastabsld {
namespace {

// The fp32 loops of the widest ISA that the CPU runs and ATen's own dispatch allows (so
// ATEN_CPU_CAPABILITY=avx2 or =default narrows them, as it does PyTorch's kernels); nullptr: the
// scalar loops.
const PgdCpuLoops* pick_loops() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    if (const PgdCpuLoops* loops = avx512_loops()) return loops;
  }
  if (capability == "AVX512" || capability == "AVX2") return avx2_loops();
  return nullptr;
}

const PgdCpuLoops* const kLoops = pick_loops();

// One sample's radii and box in the compute type.
template <typename acc_t>
struct Radii {
  acc_t alpha, eps, lo, hi;
};

struct LinfSample {
  static PgdSamplesLoop vector_loop(const PgdCpuLoops& loops) { return loops.linf_samples; }

  template <typename scalar_t, typename acc_t>
  static void run(const scalar_t* xa, const scalar_t* x0, const scalar_t* g, scalar_t* o,
                  int64_t n, Radii<acc_t> r) {
    for (int64_t i = 0; i < n; ++i) {
      o[i] = static_cast<scalar_t>(pgd_linf_element(static_cast<acc_t>(xa[i]),
                                                    static_cast<acc_t>(x0[i]),
                                                    static_cast<acc_t>(g[i]), r.alpha, r.eps,
                                                    r.lo, r.hi));
    }
  }
};

struct L2Sample {
  static PgdSamplesLoop vector_loop(const PgdCpuLoops& loops) { return loops.l2_samples; }

  template <typename scalar_t, typename acc_t>
  static void run(const scalar_t* xa, const scalar_t* x0, const scalar_t* g, scalar_t* o,
                  int64_t n, Radii<acc_t> r) {
    SumSquares<acc_t> grad_sq{};
    for (int64_t i = 0; i < n; ++i) add_square(grad_sq, static_cast<acc_t>(g[i]));
    const L2Step<acc_t> step = l2_step<acc_t>(norm_of(grad_sq), r.alpha);
    SumSquares<acc_t> delta_sq{};
    for (int64_t i = 0; i < n; ++i) {
      add_square(delta_sq, l2_delta(static_cast<acc_t>(xa[i]), static_cast<acc_t>(x0[i]),
                                    static_cast<acc_t>(g[i]), step));
    }
    const acc_t factor = l2_factor<acc_t>(norm_of(delta_sq), r.eps);
    for (int64_t i = 0; i < n; ++i) {
      o[i] = static_cast<scalar_t>(pgd_l2_element(static_cast<acc_t>(xa[i]),
                                                  static_cast<acc_t>(x0[i]),
                                                  static_cast<acc_t>(g[i]), step, factor, r.lo,
                                                  r.hi));
    }
  }
};

// Runs Sample's step on every sample, samples split across threads: fp32 by the vector loop of
// kLoops on a thread's whole range (the L2 one pipelines consecutive samples), else Sample::run
// on one sample at a time.
template <typename Sample, typename scalar_t>
void for_each_sample(const PgdStepArgs& a, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xa = a.x_adv.const_data_ptr<scalar_t>();
  const scalar_t* x0 = a.x.const_data_ptr<scalar_t>();
  const scalar_t* g = a.grad.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const acc_t* alpha_b = a.alpha ? a.alpha->const_data_ptr<acc_t>() : nullptr;
  const acc_t* eps_b = a.eps ? a.eps->const_data_ptr<acc_t>() : nullptr;
  const acc_t alpha = static_cast<acc_t>(a.alpha_value), eps = static_cast<acc_t>(a.eps_value);
  const acc_t lo = static_cast<acc_t>(a.lo), hi = static_cast<acc_t>(a.hi);
  const int64_t n = a.per_sample;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
  at::parallel_for(0, a.batch, grain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (kLoops != nullptr) {
        const int64_t at = begin * n;
        const PgdFp32Samples samples{xa + at, x0 + at, g + at, o + at, n, end - begin,
                                     alpha_b ? alpha_b + begin : &alpha,
                                     eps_b ? eps_b + begin : &eps, alpha_b ? 1 : 0,
                                     eps_b ? 1 : 0, lo, hi};
        return Sample::vector_loop(*kLoops)(samples);
      }
    }
    for (int64_t b = begin; b < end; ++b) {
      const Radii<acc_t> r{alpha_b ? alpha_b[b] : alpha, eps_b ? eps_b[b] : eps, lo, hi};
      const int64_t base = b * n;
      Sample::run(xa + base, x0 + base, g + base, o + base, n, r);
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
  if (out.numel() == 0) return out;
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

const char* pgd_step_cpu_isa() { return kLoops != nullptr ? kLoops->isa : "scalar"; }

TORCH_LIBRARY_IMPL(fastabsld, CPU, m) { m.impl("pgd_step", &pgd_step_cpu); }

}  // namespace fastabsld
