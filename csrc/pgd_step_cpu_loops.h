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

#include "pgd_step_cpu_simd.h"
#include "pgd_step_math.h"

namespace fastabsld {

// Samples of at most this many elements run the L2 step pipelined: the output pass of one sample
// and the gradient-norm pass of the next share one loop, which also fetches the next sample's
// x_adv and x for its delta pass, so the next sample streams in from memory while the current one
// is finished from cache. The five rows in play (x and out of this sample, grad, x_adv and x of
// the next) fit a core's L2 up to 5 * 4 B * 49152 = 960 KiB. Larger samples run their passes one
// after the other and fetch nothing ahead: by the delta pass, lines fetched during the gradient
// pass would be gone again, and the extra traffic made both the prefetch and the shared loop cost
// 10 to 30% at 3 x 224 x 224 (measured on a 2 MiB-L2 Xeon).
constexpr int64_t kL2PipelineMaxElements = 49152;

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

template <typename Isa>
void pgd_linf_samples(const PgdFp32Samples& s) {
  for (int64_t k = 0; k < s.count; ++k) {
    const int64_t at = k * s.n;
    pgd_linf_sample<Isa>(s.x_adv + at, s.x + at, s.grad + at, s.out + at, s.n,
                         s.alpha[k * s.alpha_stride], s.eps[k * s.eps_stride], s.lo, s.hi);
  }
}

// ||grad||^2 of one sample: two vectors a step into four independent sums, then the scalar tail,
// then the four sums in a fixed order, so the result is the same whichever loop feeds it.
template <typename Isa>
struct GradSquares {
  using D = typename Isa::D;
  static constexpr int64_t kStep = 2 * Isa::kLanes;
  D s0, s1, s2, s3;

  // Made here rather than by an implicit constructor, which GCC would compile without the ISA.
  static GradSquares zero() {
    const D z = Isa::zero_d();
    return {z, z, z, z};
  }

  // grad's elements [i, i + kStep).
  void add_step(const float* grad, int64_t i) {
    Isa::add_squares(Isa::load(grad + i), s0, s1);
    Isa::add_squares(Isa::load(grad + i + Isa::kLanes), s2, s3);
  }

  // ||grad|| once the steps have covered [0, i).
  ScaledNorm finish(const float* grad, int64_t i, int64_t n) const {
    SumSquares<float> sq{};
    for (; i < n; ++i) add_square(sq, grad[i]);
    sq.mid += Isa::sum(s0, s1, s2, s3);
    return norm_of(sq);
  }
};

// Fetches the lines of x_adv and x at [i, i + kStep) for the delta pass (kLocality as in
// __builtin_prefetch), so that a gradient pass keeps three streams from memory in flight, as one
// fused pass would.
template <typename Isa, int kLocality>
void prefetch_step(const float* x_adv, const float* x, int64_t i) {
  for (int64_t line = 0; line < GradSquares<Isa>::kStep; line += 16) {
    __builtin_prefetch(x_adv + i + line, 0, kLocality);
    __builtin_prefetch(x + i + line, 0, kLocality);
  }
}

template <typename Isa, bool kPrefetch>
ScaledNorm l2_grad_norm(const float* x_adv, const float* x, const float* grad, int64_t n) {
  GradSquares<Isa> sq = GradSquares<Isa>::zero();
  int64_t i = 0;
  for (; i + GradSquares<Isa>::kStep <= n; i += GradSquares<Isa>::kStep) {
    if constexpr (kPrefetch) prefetch_step<Isa, 3>(x_adv, x, i);
    sq.add_step(grad, i);
  }
  return sq.finish(grad, i, n);
}

// l2_delta on every element, written to out; returns ||delta||, the norm of exactly the values
// that the projection then scales.
template <typename Isa>
ScaledNorm l2_delta_pass(const float* x_adv, const float* x, const float* grad, float* out,
                         int64_t n, L2Step<float> step) {
  using F = typename Isa::F;
  using D = typename Isa::D;
  constexpr int64_t kStep = 2 * Isa::kLanes;  // two vectors a step: four independent sums
  const F vstep = Isa::splat(step.step), vscale = Isa::splat(step.scale);
  const auto delta_at = [&](int64_t j) {
    const F delta = Isa::fma(vstep, Isa::mul(Isa::load(grad + j), vscale),
                             Isa::sub(Isa::load(x_adv + j), Isa::load(x + j)));
    Isa::store(out + j, delta);
    return delta;
  };
  D s0 = Isa::zero_d(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Isa::add_squares(delta_at(i), s0, s1);
    Isa::add_squares(delta_at(i + Isa::kLanes), s2, s3);
  }
  SumSquares<float> delta_sq{};
  for (; i < n; ++i) {
    out[i] = l2_delta(x_adv[i], x[i], grad[i], step);
    add_square(delta_sq, out[i]);
  }
  delta_sq.mid += Isa::sum(s0, s1, s2, s3);
  return norm_of(delta_sq);
}

// out = clamp(x + factor * out, lo, hi): the last pass of one sample's L2 step.
template <typename Isa>
struct L2Projection {
  using F = typename Isa::F;
  float factor, lo, hi;
  F vfactor = Isa::splat(factor), vlo = Isa::splat(lo), vhi = Isa::splat(hi);

  void vector_at(const float* x, float* out, int64_t i) const {
    const F moved = Isa::fma(vfactor, Isa::load(out + i), Isa::load(x + i));
    Isa::store(out + i, Isa::clamp(moved, vlo, vhi));
  }

  // The elements [i, n): whole vectors, then one by one. Every caller leaves the same elements
  // to the scalar tail, so a sample's output does not depend on the loop that projected it.
  void finish(const float* x, float* out, int64_t i, int64_t n) const {
    for (; i + Isa::kLanes <= n; i += Isa::kLanes) vector_at(x, out, i);
    for (; i < n; ++i) out[i] = clamp_to(mul_add(factor, out[i], x[i]), lo, hi);
  }
};

// The L2 step of consecutive samples, three passes each: ||grad||; delta (written to out) and
// ||delta||; the projection of out. Up to kL2PipelineMaxElements a sample's projection shares its
// loop with the next sample's ||grad||; the sums are formed as in the unshared loop, so every
// sample's result is the same whether it is the last of its thread's range or not.
template <typename Isa>
void pgd_l2_samples(const PgdFp32Samples& s) {
  if (s.count <= 0) return;
  constexpr int64_t kStep = GradSquares<Isa>::kStep;
  const int64_t n = s.n;
  const bool pipelined = n <= kL2PipelineMaxElements;
  ScaledNorm grad_norm = pipelined ? l2_grad_norm<Isa, true>(s.x_adv, s.x, s.grad, n)
                                   : l2_grad_norm<Isa, false>(s.x_adv, s.x, s.grad, n);
  for (int64_t k = 0; k < s.count; ++k) {
    const int64_t at = k * n, next = at + n;
    const float* x = s.x + at;
    float* out = s.out + at;
    const L2Step<float> step = l2_step<float>(grad_norm, s.alpha[k * s.alpha_stride]);
    const ScaledNorm delta_norm = l2_delta_pass<Isa>(s.x_adv + at, x, s.grad + at, out, n, step);
    const L2Projection<Isa> project{l2_factor<float>(delta_norm, s.eps[k * s.eps_stride]), s.lo,
                                    s.hi};
    const bool has_next = k + 1 < s.count;
    if (pipelined && has_next) {
      // Locality 2: the next sample's lines wait in L2, leaving L1 to the rows projected now.
      GradSquares<Isa> next_sq = GradSquares<Isa>::zero();
      int64_t i = 0;
      for (; i + kStep <= n; i += kStep) {
        prefetch_step<Isa, 2>(s.x_adv + next, s.x + next, i);
        next_sq.add_step(s.grad + next, i);
        project.vector_at(x, out, i);
        project.vector_at(x, out, i + Isa::kLanes);
      }
      project.finish(x, out, i, n);
      grad_norm = next_sq.finish(s.grad + next, i, n);
    } else {
      project.finish(x, out, 0, n);
      if (has_next) {
        grad_norm = l2_grad_norm<Isa, false>(s.x_adv + next, s.x + next, s.grad + next, n);
      }
    }
  }
}

}  // namespace fastabsld
