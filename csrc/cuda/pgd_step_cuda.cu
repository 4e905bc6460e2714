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
// - L2, larger samples, on a (chunks, samples) grid: l2_grad_partial_kernel (partial ||grad||^2
//   per chunk), l2_step_finalize_kernel (one warp per sample sums its partials, writes the step),
//   l2_delta_partial_kernel, l2_factor_finalize_kernel (the projection factor), l2_apply_kernel.
//   Five launches; 8 element passes of DRAM traffic (grad; x_adv, x, grad; x_adv, x, grad, out).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "pgd_step_common.h"
#include "pgd_step_math.h"

namespace fastabsld {
namespace {

constexpr int kThreads = 256;           // block of the element, partial and apply kernels
constexpr int kPacksPerThread = 4;      // packs per thread in one chunk of a sample
constexpr int kFusedMaxThreads = 512;   // largest block of l2_fused_kernel
constexpr int kFusedPacks = 4;          // packs per thread that l2_fused_kernel holds
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

template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <int W, typename T>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, W>*>(p);
}

template <int W, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, W>& v) {
  *reinterpret_cast<Pack<T, W>*>(p) = v;
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

// ---- L2, one block per sample ---------------------------------------------------------------

template <typename T, int W, int U>
__global__ void __launch_bounds__(kFusedMaxThreads)
    l2_fused_kernel(const T* __restrict__ xa, const T* __restrict__ x0, const T* __restrict__ g,
                    T* __restrict__ out, Radii<at::opmath_type<T>> radii,
                    Box<at::opmath_type<T>> box, int64_t batch, int64_t n) {
  using acc_t = at::opmath_type<T>;
  using S = SumSquares<acc_t>;
  __shared__ S shared[33];
  const int t = threadIdx.x, threads = blockDim.x;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const SampleSpan s = sample_span<W>(b, n);
    const int64_t body = s.base + s.head;
    Pack<T, W> pa[U], px[U], pg[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t p = t + k * threads;
      if (p < s.packs) {
        pa[k] = load_pack<W>(xa + body + p * W);
        px[k] = load_pack<W>(x0 + body + p * W);
        pg[k] = load_pack<W>(g + body + p * W);
      }
    }
    const int64_t e = scalar_element(s, t);
    acc_t ea = 0, ex = 0, eg = 0;
    if (e >= 0) {
      ea = static_cast<acc_t>(xa[e]);
      ex = static_cast<acc_t>(x0[e]);
      eg = static_cast<acc_t>(g[e]);
    }

    S sq{};
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (t + k * threads < s.packs) {
#pragma unroll
        for (int j = 0; j < W; ++j) add_square(sq, static_cast<acc_t>(pg[k].v[j]));
      }
    }
    if (e >= 0) add_square(sq, eg);
    const L2Step<acc_t> step = l2_step<acc_t>(norm_of(block_sum(sq, shared)), radii.alpha_of(b));

    sq = S{};
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (t + k * threads < s.packs) {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          add_square(sq, l2_delta(static_cast<acc_t>(pa[k].v[j]), static_cast<acc_t>(px[k].v[j]),
                                  static_cast<acc_t>(pg[k].v[j]), step));
        }
      }
    }
    if (e >= 0) add_square(sq, l2_delta(ea, ex, eg, step));
    const acc_t factor = l2_factor<acc_t>(norm_of(block_sum(sq, shared)), radii.eps_of(b));

#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t p = t + k * threads;
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
