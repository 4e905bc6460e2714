// The fp32 per-sample loops of the CPU PGD step, written once over an ISA's vector operations
// (the Isa parameter: Avx2 in pgd_step_cpu_avx2.cpp, Avx512 in pgd_step_cpu_avx512.cpp) and
// included only by those translation units, each compiled for its ISA. The scalar tails use the
// shared per-element math of pgd_step_math.h.
//
// Isa provides: F (Isa::kLanes fp32 lanes), D (fp64 accumulators), load / store (unaligned),
// splat, add, sub, mul, fma(a, b, c) = a * b + c rounded once, clamp (lane-wise clamp_to, NaN
// passing through), linf_step (alpha * sign(g), 0 for NaN), add_squares (the squares of F's lanes
// in double, into two D accumulators) and sum (of four D accumulators, in a fixed order).
#pragma once

#include <cstdint>

#include "pgd_step_math.h"

namespace fastabsld {

// pgd_linf_element on every element of one sample. Equal to the scalar path: alpha * sign is
// exact, so a fused multiply-add rounds as the separate operations do.
template <typename Isa>
void pgd_linf_sample(const float* x_adv, const float* x, const float* grad, float* out, int64_t n,
                     float alpha, float eps, float lo, float hi) {
  using F = typename Isa::F;
  const F va = Isa::splat(alpha), ve = Isa::splat(eps), vne = Isa::splat(-eps);
  const F vlo = Isa::splat(lo), vhi = Isa::splat(hi);
  int64_t i = 0;
  for (; i + Isa::kLanes <= n; i += Isa::kLanes) {
    const F x0 = Isa::load(x + i);
    const F moved = Isa::add(Isa::load(x_adv + i), Isa::linf_step(Isa::load(grad + i), va));
    const F delta = Isa::clamp(Isa::sub(moved, x0), vne, ve);
    Isa::store(out + i, Isa::clamp(Isa::add(x0, delta), vlo, vhi));
  }
  for (; i < n; ++i) out[i] = pgd_linf_element(x_adv[i], x[i], grad[i], alpha, eps, lo, hi);
}

// The L2 step of one sample in three passes: ||grad||; delta (written to out) and ||delta||; the
// projection of out. ||delta|| is thus the norm of exactly the values projected.
template <typename Isa>
void pgd_l2_sample(const float* x_adv, const float* x, const float* grad, float* out, int64_t n,
                   float alpha, float eps, float lo, float hi) {
  using F = typename Isa::F;
  using D = typename Isa::D;
  constexpr int64_t kStep = 2 * Isa::kLanes;  // two vectors a step: four independent sums
  D s0 = Isa::zero_d(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    // x_adv and x are read by the next pass: fetching their lines now keeps three streams from
    // memory in flight, as one fused pass would.
    for (int64_t line = 0; line < kStep; line += 16) {
      __builtin_prefetch(x_adv + i + line);
      __builtin_prefetch(x + i + line);
    }
    Isa::add_squares(Isa::load(grad + i), s0, s1);
    Isa::add_squares(Isa::load(grad + i + Isa::kLanes), s2, s3);
  }
  SumSquares<float> grad_sq{};
  for (; i < n; ++i) add_square(grad_sq, grad[i]);
  grad_sq.mid += Isa::sum(s0, s1, s2, s3);
  const L2Step<float> step = l2_step<float>(norm_of(grad_sq), alpha);

  const F vstep = Isa::splat(step.step), vscale = Isa::splat(step.scale);
  // l2_delta on one vector of lanes from offset j, written to out.
  const auto delta_at = [&](int64_t j) {
    const F delta = Isa::fma(vstep, Isa::mul(Isa::load(grad + j), vscale),
                             Isa::sub(Isa::load(x_adv + j), Isa::load(x + j)));
    Isa::store(out + j, delta);
    return delta;
  };
  s0 = s1 = s2 = s3 = Isa::zero_d();
  for (i = 0; i + kStep <= n; i += kStep) {
    Isa::add_squares(delta_at(i), s0, s1);
    Isa::add_squares(delta_at(i + Isa::kLanes), s2, s3);
  }
  SumSquares<float> delta_sq{};
  for (; i < n; ++i) {
    out[i] = l2_delta(x_adv[i], x[i], grad[i], step);
    add_square(delta_sq, out[i]);
  }
  delta_sq.mid += Isa::sum(s0, s1, s2, s3);
  const float factor = l2_factor<float>(norm_of(delta_sq), eps);

  const F vfactor = Isa::splat(factor), vlo = Isa::splat(lo), vhi = Isa::splat(hi);
  for (i = 0; i + Isa::kLanes <= n; i += Isa::kLanes) {
    const F moved = Isa::fma(vfactor, Isa::load(out + i), Isa::load(x + i));
    Isa::store(out + i, Isa::clamp(moved, vlo, vhi));
  }
  for (; i < n; ++i) out[i] = clamp_to(mul_add(factor, out[i], x[i]), lo, hi);
}

}  // namespace fastabsld
