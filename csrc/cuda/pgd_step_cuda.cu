// CUDA kernels of fastabsld::pgd_step. Grids are (chunks, samples): a block handles one chunk of
// one sample, so per-sample values need no index division.
// L-inf: one kernel reads x_adv, x and grad once and writes once (4 elements moved per element).
// L2: a reduction kernel writes each chunk's three partial sums (||d0||^2, <d0, grad>,
// ||grad||^2; no atomics, so the result is deterministic), then the element kernel sums its
// sample's partials, computes the step and projection factor and writes (7 elements moved).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pgd_step_common.h"
#include "pgd_step_math.h"

namespace fastabsld {
namespace {

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 8;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMaxGridY = 65535;

struct Grid {
  int64_t chunks, chunk_len;
  dim3 blocks;
};

Grid make_grid(int64_t batch, int64_t per_sample) {
  const int64_t wanted = (per_sample + kThreads * kItemsPerThread - 1) / (kThreads * kItemsPerThread);
  const int64_t chunks = std::max<int64_t>(1, std::min(wanted, kMaxChunks));
  const int64_t chunk_len = (per_sample + chunks - 1) / chunks;
  return {chunks, chunk_len,
          dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min(batch, kMaxGridY)))};
}

struct Radii {
  const float* alpha_b;
  const float* eps_b;
  float alpha, eps;

  __device__ float alpha_of(int64_t b) const { return alpha_b ? alpha_b[b] : alpha; }
  __device__ float eps_of(int64_t b) const { return eps_b ? eps_b[b] : eps; }
};

template <typename scalar_t>
__global__ void linf_kernel(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ x0,
                            const scalar_t* __restrict__ g, scalar_t* __restrict__ out,
                            Radii radii, float lo, float hi, int64_t batch, int64_t per_sample,
                            int64_t chunk_len) {
  const int64_t begin = blockIdx.x * chunk_len;
  const int64_t end = min(begin + chunk_len, per_sample);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const float alpha = radii.alpha_of(b), eps = radii.eps_of(b);
    const int64_t base = b * per_sample;
    for (int64_t i = base + begin + threadIdx.x; i < base + end; i += blockDim.x) {
      out[i] = static_cast<scalar_t>(pgd_linf_element(static_cast<float>(xa[i]),
                                                      static_cast<float>(x0[i]),
                                                      static_cast<float>(g[i]), alpha, eps, lo, hi));
    }
  }
}

// Sum of v over the block; the result is valid in thread 0.
__device__ float block_sum(float v, float* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = 0.0f;
  if (warp == 0) {
    if (lane < blockDim.x / 32) v = shared[lane];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t>
__global__ void l2_partial_kernel(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ x0,
                                  const scalar_t* __restrict__ g, float* __restrict__ partial,
                                  int64_t batch, int64_t per_sample, int64_t chunk_len) {
  __shared__ float shared[kThreads / 32];
  const int64_t begin = blockIdx.x * chunk_len;
  const int64_t end = min(begin + chunk_len, per_sample);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t base = b * per_sample;
    L2Sums s;
    for (int64_t i = base + begin + threadIdx.x; i < base + end; i += blockDim.x) {
      l2_accumulate(s, static_cast<float>(xa[i]), static_cast<float>(x0[i]),
                    static_cast<float>(g[i]));
    }
    const float dd = block_sum(s.dd, shared);
    const float dg = block_sum(s.dg, shared);
    const float gg = block_sum(s.gg, shared);
    if (threadIdx.x == 0) {
      float* p = partial + (b * gridDim.x + blockIdx.x) * 3;
      p[0] = dd;
      p[1] = dg;
      p[2] = gg;
    }
  }
}

template <typename scalar_t>
__global__ void l2_apply_kernel(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ x0,
                                const scalar_t* __restrict__ g, scalar_t* __restrict__ out,
                                const float* __restrict__ partial, Radii radii, float lo,
                                float hi, int64_t batch, int64_t per_sample, int64_t chunk_len) {
  __shared__ L2Coefficients coefficients;
  const int64_t begin = blockIdx.x * chunk_len;
  const int64_t end = min(begin + chunk_len, per_sample);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    __syncthreads();  // every thread is done with the previous sample's coefficients
    if (threadIdx.x == 0) {
      L2Sums s;
      const float* p = partial + b * gridDim.x * 3;
      for (unsigned c = 0; c < gridDim.x; ++c) {
        s.dd += p[3 * c];
        s.dg += p[3 * c + 1];
        s.gg += p[3 * c + 2];
      }
      coefficients = l2_coefficients(s, radii.alpha_of(b), radii.eps_of(b));
    }
    __syncthreads();
    const L2Coefficients c = coefficients;
    const int64_t base = b * per_sample;
    for (int64_t i = base + begin + threadIdx.x; i < base + end; i += blockDim.x) {
      out[i] = static_cast<scalar_t>(pgd_l2_element(static_cast<float>(xa[i]),
                                                    static_cast<float>(x0[i]),
                                                    static_cast<float>(g[i]), c, lo, hi));
    }
  }
}

at::Tensor pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                         const std::optional<at::Tensor>& alpha_per_sample,
                         const std::optional<at::Tensor>& eps_per_sample, double alpha, double eps,
                         c10::string_view norm, double clamp_min, double clamp_max) {
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const PgdStepArgs a = prepare_pgd_step(x_adv, x, grad, alpha_per_sample, eps_per_sample, alpha,
                                         eps, norm, clamp_min, clamp_max);
  at::Tensor out = at::empty_like(a.x_adv);
  if (out.numel() == 0) return out;
  const Grid grid = make_grid(a.batch, a.per_sample);
  const Radii radii{a.alpha ? a.alpha->const_data_ptr<float>() : nullptr,
                    a.eps ? a.eps->const_data_ptr<float>() : nullptr, a.alpha_value, a.eps_value};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x_adv.scalar_type(), "pgd_step_cuda", [&] {
        const scalar_t* xa = a.x_adv.const_data_ptr<scalar_t>();
        const scalar_t* x0 = a.x.const_data_ptr<scalar_t>();
        const scalar_t* g = a.grad.const_data_ptr<scalar_t>();
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        if (a.norm == PgdNorm::kLinf) {
          linf_kernel<scalar_t><<<grid.blocks, kThreads, 0, stream>>>(
              xa, x0, g, o, radii, a.lo, a.hi, a.batch, a.per_sample, grid.chunk_len);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          at::Tensor partial = at::empty({a.batch, grid.chunks, 3}, out.options().dtype(at::kFloat));
          float* p = partial.mutable_data_ptr<float>();
          l2_partial_kernel<scalar_t><<<grid.blocks, kThreads, 0, stream>>>(
              xa, x0, g, p, a.batch, a.per_sample, grid.chunk_len);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          l2_apply_kernel<scalar_t><<<grid.blocks, kThreads, 0, stream>>>(
              xa, x0, g, o, p, radii, a.lo, a.hi, a.batch, a.per_sample, grid.chunk_len);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastabsld, CUDA, m) { m.impl("pgd_step", &pgd_step_cuda); }

}  // namespace fastabsld
