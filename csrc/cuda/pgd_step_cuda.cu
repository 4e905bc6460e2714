// CUDA kernels of fastabsld::pgd_step. The per-element and per-sample math is the CPU kernel's
// (pgd_step_math.h): fp64 inputs compute in fp64, fp32/fp16/bf16 in fp32, sums of squares in
// double. Data moves in 16-byte packs (4 fp32, 8 fp16/bf16, 2 fp64 elements) when x_adv, x, grad
// and the output are 16-byte aligned; a sample whose start is not pack-aligned does its first
// and last few elements one by one. Unaligned pointers run the same kernels one element at a
// time. All reductions add in a fixed order: results are deterministic.
//
// Launches (B samples of n elements; see benchmarks/gpu_model/pgd_step.py for the figures):
// - L-inf, one alpha and eps: linf_flat_kernel, one pack per thread over all B*n elements.
// - L-inf, per-sample alpha or eps: linf_sample_kernel on a (chunks, samples) grid.
// - L2, a sample fits in one block's registers (n <= 512 threads * 4 packs): l2_fused_kernel,
//   one block per sample: loads x_adv, x and grad once into registers, reduces ||grad|| and then
//   ||delta|| over the block, writes the output. DRAM traffic is the minimum, one launch.
// - L2, larger samples: l2_cooperative_kernel, a persistent grid of co-resident blocks (a
//   cooperative launch) over (sample, chunk) tiles in sample order. A block holds its chunk in
//   registers from load to store; the blocks of one sample exchange their partial sums of
//   squares through global memory and wait for one another (a per-sample arrival counter) twice:
//   for ||grad||, then for ||delta||. Each block sums the sample's partials in the same order,
//   so all of them get the same step and factor. DRAM traffic is the minimum (4 element passes)
//   plus the partials; two launches (the counters' memset and the kernel). Waiting is safe
//   because every tile a block waits for is held by a resident block that reaches it without
//   waiting on a later sample, as long as a sample has no more chunks than the grid has blocks.
// - L2, samples with more chunks than the grid can hold at once (about 1.1M fp32 elements on an
//   H100), or where a cooperative launch is not supported: on a (chunks, samples) grid,
//   l2_grad_partial_kernel (partial ||grad||^2 per chunk), l2_finalize_kernel (one warp per
//   sample sums its partials, writes the step), l2_delta_partial_kernel, l2_finalize_kernel (the
//   projection factor), l2_apply_kernel. Five launches; 8 element passes of DRAM traffic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda/atomic>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "pgd_step_common.h"
#include "pgd_step_math.h"

namespace fastabsld {
namespace {

constexpr int kThreads = 256;           // block of the element, partial and apply kernels
constexpr int kPacksPerThread = 4;      // packs per thread in one chunk of a sample
constexpr int kFusedMaxThreads = 512;   // largest block of l2_fused_kernel
constexpr int kFusedPacks = 4;          // packs per thread that l2_fused_kernel holds
// Resident blocks per SM that l2_cooperative_kernel's launch bounds ask for (at most 128
// registers a thread): 3 would cap it at 85, which spills the fp32 and fp64 kernels.
constexpr int kCooperativeMinBlocks = 2;
constexpr int kFinalizeWarps = 8;       // samples per block of the finalize kernels
constexpr int kPackBytes = 16;
constexpr int64_t kMaxGridY = 65535;
constexpr unsigned kFullMask = 0xffffffffu;

// Elements per 16-byte pack.
template <typename scalar_t>
constexpr int pack_width() {
  return kPackBytes / static_cast<int>(sizeof(scalar_t));
}

// Packs per thread held by l2_fused_kernel: 64 bytes per tensor in the vector case; one element
// per pack in the scalar case, 8 (4 for fp64) per thread, which keeps them free of spills.
template <typename scalar_t, int W>
constexpr int fused_packs() {
  return W > 1 ? kFusedPacks : (sizeof(scalar_t) == 8 ? 4 : 8);
}

// Packs per thread of l2_cooperative_kernel: as l2_fused_kernel, but 2 of the 8-element packs
// of fp16/bf16 (their fp32 values stay live across the phases), so that 2 or more of its blocks
// fit on an SM and every chunk holds about 4096 elements.
template <typename scalar_t, int W>
constexpr int cooperative_packs() {
  return W == 8 ? 2 : fused_packs<scalar_t, W>();
}

template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <int W, typename T>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, W>*>(p);
}

// A 16-byte pack is stored through a vector intrinsic: with the values of a pack computed apart,
// the compiler would otherwise split the store into four (seen in l2_cooperative_kernel's SASS).
template <int W, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, W>& v) {
  if constexpr (sizeof(Pack<T, W>) == kPackBytes) {
    int4 bits;
    memcpy(&bits, &v, kPackBytes);
    __stwb(reinterpret_cast<int4*>(p), bits);
  } else {
    *reinterpret_cast<Pack<T, W>*>(p) = v;
  }
}

template <typename acc_t>
struct Radii {
  const acc_t* alpha_b;
  const acc_t* eps_b;
  acc_t alpha, eps;

  __device__ acc_t alpha_of(int64_t b) const { return alpha_b ? alpha_b[b] : alpha; }
  __device__ acc_t eps_of(int64_t b) const { return eps_b ? eps_b[b] : eps; }
};

template <typename acc_t>
struct Box {
  acc_t lo, hi;
};

// The two per-sample results of the L2 finalize kernels.
template <typename acc_t>
struct L2Coefficients {
  L2Step<acc_t> step;
  acc_t factor;
};

// One sample's elements: [base, base + head) one by one, then `packs` aligned packs of W, then
// `tail` elements one by one from tail_begin. head and tail are below W.
struct SampleSpan {
  int64_t base, head, packs, tail_begin, tail;
};

template <int W>
__device__ __forceinline__ SampleSpan sample_span(int64_t b, int64_t n) {
  const int64_t base = b * n;
  int64_t head = (W - base % W) % W;
  head = head < n ? head : n;
  const int64_t packs = (n - head) / W;
  const int64_t tail_begin = base + head + packs * W;
  return {base, head, packs, tail_begin, base + n - tail_begin};
}

// The element (if any) that thread t of a sample's first chunk handles one by one: threads
// [0, W) take the head, threads [16, 16 + W) the tail (W <= 8, blocks have >= 32 threads).
__device__ __forceinline__ int64_t scalar_element(const SampleSpan& s, int t) {
  if (t < s.head) return s.base + t;
  if (t >= 16 && t - 16 < s.tail) return s.tail_begin + (t - 16);
  return -1;
}

// ---- reductions in a fixed order ------------------------------------------------------------

__device__ __forceinline__ SumSquares<float> shfl_down(const SumSquares<float>& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.mid, offset)};
}

__device__ __forceinline__ SumSquares<double> shfl_down(const SumSquares<double>& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.big, offset), __shfl_down_sync(kFullMask, s.mid, offset),
          __shfl_down_sync(kFullMask, s.small, offset)};
}

// Tree sum over the warp; the result is valid in lane 0.
template <typename S>
__device__ __forceinline__ S warp_sum(S s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) merge_into(s, shfl_down(s, offset));
  return s;
}

// Sum over the block, returned to every thread. shared holds 33 values.
template <typename S>
__device__ __forceinline__ S block_sum(S s, S* shared) {
  s = warp_sum(s);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the previous call's readers are done with shared
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    S v = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : S{};
    v = warp_sum(v);
    if (lane == 0) shared[32] = v;
  }
  __syncthreads();
  return shared[32];
}

// Reads a partial sum that another block wrote: through L2, never a stale L1 line.
__device__ __forceinline__ SumSquares<float> load_global(const SumSquares<float>* p) {
  return {__ldcg(&p->mid)};
}

__device__ __forceinline__ SumSquares<double> load_global(const SumSquares<double>* p) {
  return {__ldcg(&p->big), __ldcg(&p->mid), __ldcg(&p->small)};
}

// ---- L-inf ----------------------------------------------------------------------------------

template <int W, typename T, typename acc_t>
__device__ __forceinline__ void linf_pack(const T* __restrict__ xa, const T* __restrict__ x0,
                                          const T* __restrict__ g, T* __restrict__ out,
                                          int64_t i, acc_t alpha, acc_t eps, Box<acc_t> box) {
  const Pack<T, W> a = load_pack<W>(xa + i), c = load_pack<W>(x0 + i), d = load_pack<W>(g + i);
  Pack<T, W> o;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    o.v[j] = static_cast<T>(pgd_linf_element(static_cast<acc_t>(a.v[j]), static_cast<acc_t>(c.v[j]),
                                             static_cast<acc_t>(d.v[j]), alpha, eps, box.lo,
                                             box.hi));
  }
  store_pack<W>(out + i, o);
}

// One alpha and eps for all samples: elementwise over the whole batch, one pack per thread;
// the last numel % W elements go to the first threads.
template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
    linf_flat_kernel(const T* __restrict__ xa, const T* __restrict__ x0, const T* __restrict__ g,
                     T* __restrict__ out, int64_t numel, at::opmath_type<T> alpha,
                     at::opmath_type<T> eps, Box<at::opmath_type<T>> box) {
  const int64_t packs = numel / W;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < packs) linf_pack<W>(xa, x0, g, out, i * W, alpha, eps, box);
  if (i < numel - packs * W) linf_pack<1>(xa, x0, g, out, packs * W + i, alpha, eps, box);
}

// Per-sample alpha or eps: block (chunk, sample) handles kThreads * kPacksPerThread packs.
template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
    linf_sample_kernel(const T* __restrict__ xa, const T* __restrict__ x0, const T* __restrict__ g,
                       T* __restrict__ out, Radii<at::opmath_type<T>> radii,
                       Box<at::opmath_type<T>> box, int64_t batch, int64_t n) {
  constexpr int64_t kChunkPacks = kThreads * kPacksPerThread;
  const int t = threadIdx.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const SampleSpan s = sample_span<W>(b, n);
    const auto alpha = radii.alpha_of(b), eps = radii.eps_of(b);
    const int64_t first = blockIdx.x * kChunkPacks;
#pragma unroll
    for (int k = 0; k < kPacksPerThread; ++k) {
      const int64_t p = first + t + k * kThreads;
      if (p < s.packs) linf_pack<W>(xa, x0, g, out, s.base + s.head + p * W, alpha, eps, box);
    }
    if (blockIdx.x == 0) {
      const int64_t e = scalar_element(s, t);
      if (e >= 0) linf_pack<1>(xa, x0, g, out, e, alpha, eps, box);
    }
  }
}

// ---- L2, a sample held in registers --------------------------------------------------------

// Sums over a whole sample, given one thread's part: the block's sum (one block per sample).
template <typename S>
struct BlockSampleSum {
  S* shared;  // 33 values

  __device__ __forceinline__ S operator()(const S& part, int /*stage*/) const {
    return block_sum(part, shared);
  }
};

// Sums over a whole sample whose chunks several resident blocks hold: each block publishes its
// sum in slot `chunk` of the stage's row, arrives at the stage's counter and waits until every
// chunk of the sample has arrived; then warp 0 adds the row in a fixed order (the same order in
// every block of the sample, so they all get the same sum).
template <typename S>
struct GridSampleSum {
  S* shared;         // 33 values
  S* slots;          // [stage][chunks] of this sample
  unsigned* arrived; // [stage] of this sample
  int64_t chunk, chunks, stage_stride;

  __device__ __forceinline__ S operator()(const S& part, int stage) const {
    const S block = block_sum(part, shared);  // every thread of the block has it
    S* row = slots + stage * stage_stride;
    if (threadIdx.x == 0) {
      row[chunk] = block;
      cuda::atomic_ref<unsigned, cuda::thread_scope_device> counter(arrived[stage]);
      counter.fetch_add(1u, cuda::memory_order_release);
      while (counter.load(cuda::memory_order_acquire) < static_cast<unsigned>(chunks)) __nanosleep(32);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      S sum{};
      for (int64_t c = threadIdx.x; c < chunks; c += 32) merge_into(sum, load_global(row + c));
      sum = warp_sum(sum);
      if (threadIdx.x == 0) shared[32] = sum;
    }
    __syncthreads();
    return shared[32];  // the next block_sum writes shared only after a barrier
  }
};

// One L2 step on packs [first, first + U * threads) of sample b (with the sample's head and tail
// elements when first == 0), held in registers from load to store. sum(part, stage) turns one
// thread's sum of squares into the sample's (stage 0: grad, stage 1: delta).
template <typename T, int W, int U, typename SampleSum>
__device__ __forceinline__ void l2_registers(const T* __restrict__ xa, const T* __restrict__ x0,
                                             const T* __restrict__ g, T* __restrict__ out,
                                             const Radii<at::opmath_type<T>>& radii,
                                             Box<at::opmath_type<T>> box, int64_t b, int64_t n,
                                             int64_t first, int threads, const SampleSum& sum) {
  using acc_t = at::opmath_type<T>;
  using S = SumSquares<acc_t>;
  const int t = threadIdx.x;
  const SampleSpan s = sample_span<W>(b, n);
  const int64_t body = s.base + s.head;
  Pack<T, W> pa[U], px[U], pg[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t p = first + t + k * threads;
    if (p < s.packs) {
      pa[k] = load_pack<W>(xa + body + p * W);
      px[k] = load_pack<W>(x0 + body + p * W);
      pg[k] = load_pack<W>(g + body + p * W);
    }
  }
  const int64_t e = first == 0 ? scalar_element(s, t) : -1;
  acc_t ea = 0, ex = 0, eg = 0;
  if (e >= 0) {
    ea = static_cast<acc_t>(xa[e]);
    ex = static_cast<acc_t>(x0[e]);
    eg = static_cast<acc_t>(g[e]);
  }

  S sq{};
#pragma unroll
  for (int k = 0; k < U; ++k) {
    if (first + t + k * threads < s.packs) {
#pragma unroll
      for (int j = 0; j < W; ++j) add_square(sq, static_cast<acc_t>(pg[k].v[j]));
    }
  }
  if (e >= 0) add_square(sq, eg);
  const L2Step<acc_t> step = l2_step<acc_t>(norm_of(sum(sq, 0)), radii.alpha_of(b));

  sq = S{};
#pragma unroll
  for (int k = 0; k < U; ++k) {
    if (first + t + k * threads < s.packs) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        add_square(sq, l2_delta(static_cast<acc_t>(pa[k].v[j]), static_cast<acc_t>(px[k].v[j]),
                                static_cast<acc_t>(pg[k].v[j]), step));
      }
    }
  }
  if (e >= 0) add_square(sq, l2_delta(ea, ex, eg, step));
  const acc_t factor = l2_factor<acc_t>(norm_of(sum(sq, 1)), radii.eps_of(b));

#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t p = first + t + k * threads;
    if (p < s.packs) {
      Pack<T, W> o;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        o.v[j] = static_cast<T>(pgd_l2_element(static_cast<acc_t>(pa[k].v[j]),
                                               static_cast<acc_t>(px[k].v[j]),
                                               static_cast<acc_t>(pg[k].v[j]), step, factor,
                                               box.lo, box.hi));
      }
      store_pack<W>(out + body + p * W, o);
    }
  }
  if (e >= 0) out[e] = static_cast<T>(pgd_l2_element(ea, ex, eg, step, factor, box.lo, box.hi));
}

// One block per sample.
template <typename T, int W, int U>
__global__ void __launch_bounds__(kFusedMaxThreads)
    l2_fused_kernel(const T* __restrict__ xa, const T* __restrict__ x0, const T* __restrict__ g,
                    T* __restrict__ out, Radii<at::opmath_type<T>> radii,
                    Box<at::opmath_type<T>> box, int64_t batch, int64_t n) {
  using S = SumSquares<at::opmath_type<T>>;
  __shared__ S shared[33];
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    l2_registers<T, W, U>(xa, x0, g, out, radii, box, b, n, 0, blockDim.x, BlockSampleSum<S>{shared});
  }
}

// Tiles (sample, chunk) of kThreads * U packs, block i taking tiles i, i + gridDim.x, ...;
// slots holds [batch][2][chunks] partial sums, arrived [batch][2] zeroed counters. Needs every
// block resident (a cooperative launch) and chunks <= gridDim.x.
template <typename T, int W, int U>
__global__ void __launch_bounds__(kThreads, kCooperativeMinBlocks)
    l2_cooperative_kernel(const T* __restrict__ xa, const T* __restrict__ x0,
                          const T* __restrict__ g, T* __restrict__ out,
                          Radii<at::opmath_type<T>> radii, Box<at::opmath_type<T>> box,
                          int64_t batch, int64_t n, int64_t chunks,
                          SumSquares<at::opmath_type<T>>* slots, unsigned* arrived) {
  using S = SumSquares<at::opmath_type<T>>;
  __shared__ S shared[33];
  const int64_t tiles = batch * chunks;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t b = tile / chunks, chunk = tile - b * chunks;
    const GridSampleSum<S> sum{shared, slots + b * 2 * chunks, arrived + 2 * b, chunk, chunks, chunks};
    l2_registers<T, W, U>(xa, x0, g, out, radii, box, b, n, chunk * kThreads * U, kThreads, sum);
  }
}

// ---- L2, several blocks per sample ----------------------------------------------------------

// Sum of squares of this thread's elements of chunk blockIdx.x of sample s; value(i, width)
// gives the W (or 1) values of the pack (element) at i.
template <typename T, int W, typename Values>
__device__ __forceinline__ SumSquares<at::opmath_type<T>> chunk_sum_squares(const SampleSpan& s,
                                                                           Values values) {
  using acc_t = at::opmath_type<T>;
  constexpr int64_t kChunkPacks = kThreads * kPacksPerThread;
  const int t = threadIdx.x;
  const int64_t first = blockIdx.x * kChunkPacks;
  SumSquares<acc_t> sq{};
#pragma unroll
  for (int k = 0; k < kPacksPerThread; ++k) {
    const int64_t p = first + t + k * kThreads;
    if (p < s.packs) {
      acc_t v[W];
      values.template pack<W>(s.base + s.head + p * W, v);
#pragma unroll
      for (int j = 0; j < W; ++j) add_square(sq, v[j]);
    }
  }
  if (blockIdx.x == 0) {
    const int64_t e = scalar_element(s, t);
    if (e >= 0) {
      acc_t v[1];
      values.template pack<1>(e, v);
      add_square(sq, v[0]);
    }
  }
  return sq;
}

template <typename T>
struct GradValues {
  const T* g;

  template <int W>
  __device__ __forceinline__ void pack(int64_t i, at::opmath_type<T>* v) const {
    const Pack<T, W> a = load_pack<W>(g + i);
#pragma unroll
    for (int j = 0; j < W; ++j) v[j] = static_cast<at::opmath_type<T>>(a.v[j]);
  }
};

template <typename T>
struct DeltaValues {
  const T* xa;
  const T* x0;
  const T* g;
  L2Step<at::opmath_type<T>> step;

  template <int W>
  __device__ __forceinline__ void pack(int64_t i, at::opmath_type<T>* v) const {
    using acc_t = at::opmath_type<T>;
    const Pack<T, W> a = load_pack<W>(xa + i), c = load_pack<W>(x0 + i), d = load_pack<W>(g + i);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      v[j] = l2_delta(static_cast<acc_t>(a.v[j]), static_cast<acc_t>(c.v[j]),
                      static_cast<acc_t>(d.v[j]), step);
    }
  }
};

template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
    l2_grad_partial_kernel(const T* __restrict__ g, SumSquares<at::opmath_type<T>>* __restrict__ partial,
                           int64_t batch, int64_t n) {
  using S = SumSquares<at::opmath_type<T>>;
  __shared__ S shared[33];
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const S sq = block_sum(chunk_sum_squares<T, W>(sample_span<W>(b, n), GradValues<T>{g}), shared);
    if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sq;
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
    l2_delta_partial_kernel(const T* __restrict__ xa, const T* __restrict__ x0,
                            const T* __restrict__ g,
                            const L2Coefficients<at::opmath_type<T>>* __restrict__ coefficients,
                            SumSquares<at::opmath_type<T>>* __restrict__ partial, int64_t batch,
                            int64_t n) {
  using S = SumSquares<at::opmath_type<T>>;
  __shared__ S shared[33];
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const DeltaValues<T> values{xa, x0, g, coefficients[b].step};
    const S sq = block_sum(chunk_sum_squares<T, W>(sample_span<W>(b, n), values), shared);
    if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sq;
  }
}

// One warp per sample: lane l adds partials l, l + 32, ..., then the warp's tree. The grad
// stage writes the step, the delta stage the projection factor.
template <typename acc_t, bool kDeltaStage>
__global__ void __launch_bounds__(kFinalizeWarps * 32)
    l2_finalize_kernel(const SumSquares<acc_t>* __restrict__ partial, int64_t chunks,
                       int64_t batch, Radii<acc_t> radii, L2Coefficients<acc_t>* coefficients) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= batch) return;  // whole warps
  SumSquares<acc_t> sq{};
  for (int64_t c = lane; c < chunks; c += 32) merge_into(sq, partial[b * chunks + c]);
  sq = warp_sum(sq);
  if (lane == 0) {
    if constexpr (kDeltaStage) {
      coefficients[b].factor = l2_factor<acc_t>(norm_of(sq), radii.eps_of(b));
    } else {
      coefficients[b].step = l2_step<acc_t>(norm_of(sq), radii.alpha_of(b));
    }
  }
}

template <int W, typename T, typename acc_t>
__device__ __forceinline__ void l2_pack(const T* __restrict__ xa, const T* __restrict__ x0,
                                        const T* __restrict__ g, T* __restrict__ out, int64_t i,
                                        L2Step<acc_t> step, acc_t factor, Box<acc_t> box) {
  const Pack<T, W> a = load_pack<W>(xa + i), c = load_pack<W>(x0 + i), d = load_pack<W>(g + i);
  Pack<T, W> o;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    o.v[j] = static_cast<T>(pgd_l2_element(static_cast<acc_t>(a.v[j]), static_cast<acc_t>(c.v[j]),
                                           static_cast<acc_t>(d.v[j]), step, factor, box.lo,
                                           box.hi));
  }
  store_pack<W>(out + i, o);
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
    l2_apply_kernel(const T* __restrict__ xa, const T* __restrict__ x0, const T* __restrict__ g,
                    T* __restrict__ out,
                    const L2Coefficients<at::opmath_type<T>>* __restrict__ coefficients,
                    Box<at::opmath_type<T>> box, int64_t batch, int64_t n) {
  constexpr int64_t kChunkPacks = kThreads * kPacksPerThread;
  const int t = threadIdx.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const SampleSpan s = sample_span<W>(b, n);
    const auto c = coefficients[b];
    const int64_t first = blockIdx.x * kChunkPacks;
#pragma unroll
    for (int k = 0; k < kPacksPerThread; ++k) {
      const int64_t p = first + t + k * kThreads;
      if (p < s.packs) l2_pack<W>(xa, x0, g, out, s.base + s.head + p * W, c.step, c.factor, box);
    }
    if (blockIdx.x == 0) {
      const int64_t e = scalar_element(s, t);
      if (e >= 0) l2_pack<1>(xa, x0, g, out, e, c.step, c.factor, box);
    }
  }
}

// ---- launches -------------------------------------------------------------------------------

// Blocks of a kThreads-thread kernel that the device holds at once (occupancy times SMs), or 0
// where the device cannot launch cooperatively. Asked once per kernel and device.
int resident_blocks(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  if (const auto found = cache.find(key); found != cache.end()) return found->second;
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int blocks = props->cooperativeLaunch ? per_sm * props->multiProcessorCount : 0;
  cache.emplace(key, blocks);
  return blocks;
}

template <typename T>
struct Launch {
  using acc_t = at::opmath_type<T>;
  const T* xa;
  const T* x0;
  const T* g;
  T* out;
  Radii<acc_t> radii;
  Box<acc_t> box;
  int64_t batch, n;
  cudaStream_t stream;

  // Chunks per sample of the (chunks, samples) kernels: at least one, for the head and tail.
  template <int W>
  int64_t chunks() const {
    const int64_t chunk_packs = kThreads * kPacksPerThread;
    return std::max<int64_t>(1, (n / W + chunk_packs - 1) / chunk_packs);
  }

  template <int W>
  dim3 sample_grid() const {
    return dim3(static_cast<unsigned>(chunks<W>()), static_cast<unsigned>(std::min(batch, kMaxGridY)));
  }

  template <int W>
  void linf() const {
    if (!radii.alpha_b && !radii.eps_b) {
      const int64_t numel = batch * n;
      const int64_t blocks = (std::max<int64_t>(numel / W, 1) + kThreads - 1) / kThreads;
      linf_flat_kernel<T, W><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          xa, x0, g, out, numel, radii.alpha, radii.eps, box);
    } else {
      linf_sample_kernel<T, W><<<sample_grid<W>(), kThreads, 0, stream>>>(xa, x0, g, out, radii,
                                                                          box, batch, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Threads of l2_fused_kernel for this sample size, or 0 when a sample does not fit.
  template <int W>
  int fused_threads() const {
    constexpr int U = fused_packs<T, W>();
    const int64_t per_thread_packs = (n / W + U - 1) / U;
    const int64_t threads = std::max<int64_t>(32, (per_thread_packs + 31) / 32 * 32);
    return threads <= kFusedMaxThreads ? static_cast<int>(threads) : 0;
  }

  template <int W>
  void l2(const at::Tensor& like) const {
    if (const int threads = fused_threads<W>()) {
      constexpr int U = fused_packs<T, W>();
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(batch, INT32_MAX));
      l2_fused_kernel<T, W, U><<<blocks, threads, 0, stream>>>(xa, x0, g, out, radii, box, batch, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if (!l2_cooperative<W>(like)) l2_chunked<W>(like);
  }

  // The persistent L2 kernel over (sample, chunk) tiles; false where it cannot run (no
  // cooperative launch, or a sample with more chunks than resident blocks).
  template <int W>
  bool l2_cooperative(const at::Tensor& like) const {
    constexpr int U = cooperative_packs<T, W>();
    auto* kernel = &l2_cooperative_kernel<T, W, U>;
    const int resident = resident_blocks(reinterpret_cast<const void*>(kernel), like.get_device());
    const int64_t chunks = std::max<int64_t>(1, (n / W + kThreads * U - 1) / (kThreads * U));
    if (chunks > resident) return false;
    using S = SumSquares<acc_t>;
    // One buffer: the counters ([batch][2], zeroed), then the partial sums ([batch][2][chunks]).
    const int64_t counter_bytes = (batch * 2 * static_cast<int64_t>(sizeof(unsigned)) + 15) / 16 * 16;
    at::Tensor buffer = at::empty({counter_bytes + batch * 2 * chunks * static_cast<int64_t>(sizeof(S))},
                                  like.options().dtype(at::kByte));
    auto* arrived = reinterpret_cast<unsigned*>(buffer.mutable_data_ptr<uint8_t>());
    auto* slots = reinterpret_cast<S*>(buffer.mutable_data_ptr<uint8_t>() + counter_bytes);
    C10_CUDA_CHECK(cudaMemsetAsync(arrived, 0, batch * 2 * sizeof(unsigned), stream));
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(batch * chunks, resident));
    int64_t batch_arg = batch, n_arg = n, chunks_arg = chunks;
    auto radii_arg = radii;
    auto box_arg = box;
    const T *xa_arg = xa, *x0_arg = x0, *g_arg = g;
    T* out_arg = out;
    void* args[] = {&xa_arg, &x0_arg, &g_arg, &out_arg, &radii_arg, &box_arg,
                    &batch_arg, &n_arg, &chunks_arg, &slots, &arrived};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), blocks, kThreads,
                                               args, 0, stream));
    return true;
  }

  template <int W>
  void l2_chunked(const at::Tensor& like) const {
    using S = SumSquares<acc_t>;
    const int64_t chunks = this->chunks<W>();
    constexpr int64_t kDoublesPerSum = sizeof(S) / sizeof(double);
    // One buffer for both partial stages: the step finalize reads it before the delta stage.
    at::Tensor partial_buffer = at::empty({batch * chunks * kDoublesPerSum}, like.options().dtype(at::kDouble));
    at::Tensor coefficient_buffer =
        at::empty({batch * 3}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    S* partial = reinterpret_cast<S*>(partial_buffer.mutable_data_ptr<double>());
    auto* coefficients = reinterpret_cast<L2Coefficients<acc_t>*>(coefficient_buffer.mutable_data_ptr<acc_t>());
    const dim3 grid = sample_grid<W>();
    const unsigned finalize_blocks = static_cast<unsigned>((batch + kFinalizeWarps - 1) / kFinalizeWarps);
    l2_grad_partial_kernel<T, W><<<grid, kThreads, 0, stream>>>(g, partial, batch, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    l2_finalize_kernel<acc_t, false><<<finalize_blocks, kFinalizeWarps * 32, 0, stream>>>(
        partial, chunks, batch, radii, coefficients);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    l2_delta_partial_kernel<T, W><<<grid, kThreads, 0, stream>>>(xa, x0, g, coefficients, partial,
                                                                 batch, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    l2_finalize_kernel<acc_t, true><<<finalize_blocks, kFinalizeWarps * 32, 0, stream>>>(
        partial, chunks, batch, radii, coefficients);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    l2_apply_kernel<T, W><<<grid, kThreads, 0, stream>>>(xa, x0, g, out, coefficients, box, batch, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

bool aligned_to_pack(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kPackBytes == 0; }

at::Tensor pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                         const std::optional<at::Tensor>& alpha_per_sample,
                         const std::optional<at::Tensor>& eps_per_sample, double alpha, double eps,
                         c10::string_view norm, double clamp_min, double clamp_max) {
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const PgdStepArgs a = prepare_pgd_step(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha,
                                         eps, norm, clamp_min, clamp_max);
  at::Tensor out = at::empty_like(a.x_adv);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x_adv.scalar_type(), "pgd_step_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Launch<scalar_t> launch{
            a.x_adv.const_data_ptr<scalar_t>(),
            a.x.const_data_ptr<scalar_t>(),
            a.grad.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(),
            {a.alpha ? a.alpha->const_data_ptr<acc_t>() : nullptr,
             a.eps ? a.eps->const_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(a.alpha_value),
             static_cast<acc_t>(a.eps_value)},
            {static_cast<acc_t>(a.lo), static_cast<acc_t>(a.hi)},
            a.batch,
            a.per_sample,
            at::cuda::getCurrentCUDAStream()};
        const bool vector = aligned_to_pack(launch.xa) && aligned_to_pack(launch.x0) &&
                            aligned_to_pack(launch.g) && aligned_to_pack(launch.out);
        constexpr int W = pack_width<scalar_t>();
        if (a.norm == PgdNorm::kLinf) {
          vector ? launch.template linf<W>() : launch.template linf<1>();
        } else {
          vector ? launch.template l2<W>(out) : launch.template l2<1>(out);
        }
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastabsld, CUDA, m) { m.impl("pgd_step", &pgd_step_cuda); }

}  // namespace fastabsld
