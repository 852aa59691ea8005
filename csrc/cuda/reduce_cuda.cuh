// Deterministic block reductions shared by the CUDA kernels: fixed per-block chunks, a fixed-shape
// tree inside a block, and one block summing the per-block partials in a fixed order (no atomics),
// so results are bitwise reproducible on a given GPU.
#pragma once

#include <cstdint>

namespace ld3 {

constexpr int kThreads = 256;
// each block owns a fixed range of kBlockChunk elements, independent of the GPU
constexpr int kItemsPerThread = 16;
constexpr int64_t kBlockChunk = int64_t(kThreads) * kItemsPerThread;

// Fixed-shape tree sum over the block (kThreads is a power of two).
__device__ __forceinline__ double block_sum(double v, double* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  const double r = smem[0];
  __syncthreads();
  return r;
}

// out[k * out_stride] = sum over blocks of partials[b * W + k] for k < W (W = 1 + K), then zeros
// up to out_len.  Launched with one block.
template <int K>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const double* __restrict__ partials, int64_t nblocks, double* __restrict__ out,
                           int64_t out_stride, int out_len) {
  __shared__ double smem[kThreads];
#pragma unroll
  for (int k = 0; k <= K; ++k) {
    double v = 0.0;
    for (int64_t b = threadIdx.x; b < nblocks; b += kThreads) v += partials[b * (1 + K) + k];
    const double tot = block_sum(v, smem);
    if (threadIdx.x == 0) out[k * out_stride] = tot;
  }
  if (threadIdx.x == 0)
    for (int k = 1 + K; k < out_len; ++k) out[k * out_stride] = 0.0;
}

}  // namespace ld3
