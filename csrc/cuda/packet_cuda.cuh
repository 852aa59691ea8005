// 16-byte packets for the CUDA kernels' vectorised loads and stores, and the per-block chunk
// bounds the backward and adjoint kernels share.
#pragma once

#include <cstdint>

#include "cuda/reduce_cuda.cuh"

namespace ld3 {

// 16-byte packet of scalar_t for vectorised loads and stores.
template <typename scalar_t>
struct alignas(16) Packet {
  static constexpr int N = 16 / sizeof(scalar_t);
  scalar_t v[N];
};

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// Elements [begin, end) of the fixed chunk block `block` owns (kBlockChunk elements each, the last
// one shorter), and the packets [pbegin, pend) wholly inside it.  Chunks start at multiples of
// kBlockChunk elements, so on a packet when the tensor is 16-byte aligned.
template <typename scalar_t>
struct BlockChunk {
  int64_t begin, end, pbegin, pend;
  __device__ __forceinline__ BlockChunk(unsigned block, int64_t n) {
    static_assert(kBlockChunk % Packet<scalar_t>::N == 0, "chunks must start on a packet");
    begin = int64_t(block) * kBlockChunk;
    end = begin + kBlockChunk < n ? begin + kBlockChunk : n;
    pbegin = begin / Packet<scalar_t>::N;
    pend = end / Packet<scalar_t>::N;
  }
};

}  // namespace ld3
