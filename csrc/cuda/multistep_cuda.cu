// Fused multistep update on CUDA: one launch forward, two launches backward, no host sync.
//
// Coefficients are read from device memory inside the kernels, so a whole sampler step can be
// captured in a CUDA graph.  Reductions use fixed per-block chunks and a fixed-shape second pass
// (no atomics), so the coefficient gradients are bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "ld3_ops.h"
#include "dense_layout.h"
#include "dispatch_history.h"
#include "cuda/packet_cuda.cuh"
#include "cuda/reduce_cuda.cuh"
#include "solver_coefficients.h"

namespace ld3 {
namespace {

template <typename scalar_t>
struct HistPtrs {
  const scalar_t* p[kMaxHistory];
};
template <typename scalar_t>
struct GradPtrs {
  scalar_t* p[kMaxHistory];
};

// Cached per device; atomics because the autograd engine calls kernels from one thread per GPU
// (two threads may both query a device once: the same value is stored).
int sm_count(int device) {
  static std::atomic<int> counts[64] = {};
  if (device < 0 || device >= 64) return 80;
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    n = n > 0 ? n : 80;
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Blocks of `kernel` (kThreads threads each) that one SM holds at once, cached per kernel and device.  Registers
// decide it: ptxas gives the float forward 39-40 registers a thread on sm_90, so 6 blocks fit, not the 8 that 2048
// threads would allow; a grid of 8 a SM then ran as a full wave plus a second one at a quarter of the GPU's width.
template <typename Kernel>
int resident_blocks(Kernel kernel, int device) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> cache;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
  n = std::max(n, 1);
  cache.emplace(key, n);
  return n;
}

// The element-wise forward's grid: one block per kThreads work items, at most one wave of resident blocks (the
// grid-stride loop covers the rest; the result does not depend on the grid).
template <typename Kernel>
int grid_for(Kernel kernel, int64_t work_items, int device) {
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sm_count(device)) * resident_blocks(kernel, device);
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

template <typename scalar_t, int K>
__device__ __forceinline__ at::opmath_type<scalar_t> combine(const at::opmath_type<scalar_t>* c, scalar_t xv,
                                                             const scalar_t* mv) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t v = c[0] * static_cast<acc_t>(xv);
#pragma unroll
  for (int k = 0; k < K; ++k) v = v + c[1 + k] * static_cast<acc_t>(mv[k]);
  return v;
}

template <typename scalar_t, int K, bool VEC>
__global__ void __launch_bounds__(kThreads) forward_kernel(scalar_t* out, const scalar_t* x, HistPtrs<scalar_t> m,
                                                           const double* __restrict__ coef, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t c[1 + K];
#pragma unroll
  for (int k = 0; k <= K; ++k) c[k] = static_cast<acc_t>(coef[k]);  // device read: no host sync
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t tail_start = 0;
  if constexpr (VEC) {
    using P = Packet<scalar_t>;
    const int64_t nvec = n / P::N;
    for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
      const P xp = reinterpret_cast<const P*>(x)[v];
      P mp[K > 0 ? K : 1];
#pragma unroll
      for (int k = 0; k < K; ++k) mp[k] = reinterpret_cast<const P*>(m.p[k])[v];
      P o;
#pragma unroll
      for (int e = 0; e < P::N; ++e) {
        scalar_t mv[K > 0 ? K : 1];
#pragma unroll
        for (int k = 0; k < K; ++k) mv[k] = mp[k].v[e];
        o.v[e] = static_cast<scalar_t>(combine<scalar_t, K>(c, xp.v[e], mv));
      }
      reinterpret_cast<P*>(out)[v] = o;
    }
    tail_start = nvec * P::N;
  }
  for (int64_t i = tail_start + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    scalar_t mv[K > 0 ? K : 1];
#pragma unroll
    for (int k = 0; k < K; ++k) mv[k] = m.p[k][i];
    out[i] = static_cast<scalar_t>(combine<scalar_t, K>(c, x[i], mv));
  }
}

// One element of pass 1: its element-wise grads, and its products added to the thread's sums.
template <typename scalar_t, int K>
__device__ __forceinline__ void backward_element(const at::opmath_type<scalar_t>* c, scalar_t g, scalar_t x,
                                                 const scalar_t* mv, scalar_t* gx, scalar_t* gmv, double* s,
                                                 bool want_x, bool want_m, bool want_dot) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t gi = static_cast<acc_t>(g);
  if (want_x) *gx = static_cast<scalar_t>(c[0] * gi);
  if (want_m) {
#pragma unroll
    for (int k = 0; k < K; ++k) gmv[k] = static_cast<scalar_t>(c[1 + k] * gi);
  }
  if (want_dot) {
    const double gd = static_cast<double>(gi);
    s[0] += gd * static_cast<double>(static_cast<acc_t>(x));
#pragma unroll
    for (int k = 0; k < K; ++k) s[1 + k] += gd * static_cast<double>(static_cast<acc_t>(mv[k]));
  }
}

// Pass 1: element-wise grads and one row of dot-product partials per block.  Each block owns a
// fixed chunk of kBlockChunk elements and each thread a fixed part of it, so the partials do not
// depend on the GPU.  Thread t takes the chunk's 16-byte packets t, t + kThreads, ... (chunk
// starts are multiples of kBlockChunk elements), then the last chunk's few leftover elements one
// by one.  VEC (every pointer in use 16-byte aligned) loads whole packets; otherwise the same
// packets are walked element by element, so each thread sums the same elements in the same order
// and the partials depend on n only, not on alignment.
template <typename scalar_t, int K, bool VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, HistPtrs<scalar_t> m,
                    scalar_t* __restrict__ gx, GradPtrs<scalar_t> gm, const double* __restrict__ coef, int64_t n,
                    double* __restrict__ partials, bool want_x, bool want_m, bool want_dot) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double smem[kThreads];
  acc_t c[1 + K];
#pragma unroll
  for (int k = 0; k <= K; ++k) c[k] = static_cast<acc_t>(coef[k]);
  double s[1 + K];
#pragma unroll
  for (int k = 0; k <= K; ++k) s[k] = 0.0;
  const BlockChunk<scalar_t> ch(blockIdx.x, n);
  int64_t scalar_from = ch.begin;
  if constexpr (VEC) {
    using P = Packet<scalar_t>;
    for (int64_t v = ch.pbegin + threadIdx.x; v < ch.pend; v += kThreads) {
      const P gp = reinterpret_cast<const P*>(g)[v];
      P xp{}, mp[K > 0 ? K : 1], gxp, gmp[K > 0 ? K : 1];
      if (want_dot) {
        xp = reinterpret_cast<const P*>(x)[v];
#pragma unroll
        for (int k = 0; k < K; ++k) mp[k] = reinterpret_cast<const P*>(m.p[k])[v];
      }
#pragma unroll
      for (int e = 0; e < P::N; ++e) {
        scalar_t mv[K > 0 ? K : 1], gmv[K > 0 ? K : 1];
#pragma unroll
        for (int k = 0; k < K; ++k) mv[k] = want_dot ? mp[k].v[e] : scalar_t(0);
        backward_element<scalar_t, K>(c, gp.v[e], xp.v[e], mv, &gxp.v[e], gmv, s, want_x, want_m, want_dot);
        if (want_m) {
#pragma unroll
          for (int k = 0; k < K; ++k) gmp[k].v[e] = gmv[k];
        }
      }
      if (want_x) reinterpret_cast<P*>(gx)[v] = gxp;
      if (want_m) {
#pragma unroll
        for (int k = 0; k < K; ++k) reinterpret_cast<P*>(gm.p[k])[v] = gmp[k];
      }
    }
    scalar_from = ch.pend * P::N;
  } else {
    // the packet path's element-to-thread mapping and order.  The body repeats the leftover loop's:
    // sharing it (helper or lambda) changed the packet path's code and register count.
    using P = Packet<scalar_t>;
    for (int64_t q = ch.pbegin + threadIdx.x; q < ch.pend; q += kThreads) {
#pragma unroll
      for (int e = 0; e < P::N; ++e) {
        const int64_t i = q * P::N + e;
        scalar_t mv[K > 0 ? K : 1], gmv[K > 0 ? K : 1];
        if (want_dot) {
#pragma unroll
          for (int k = 0; k < K; ++k) mv[k] = m.p[k][i];
        }
        scalar_t gxv;
        backward_element<scalar_t, K>(c, g[i], want_dot ? x[i] : scalar_t(0), mv, &gxv, gmv, s, want_x, want_m,
                                      want_dot);
        if (want_x) gx[i] = gxv;
        if (want_m) {
#pragma unroll
          for (int k = 0; k < K; ++k) gm.p[k][i] = gmv[k];
        }
      }
    }
    scalar_from = ch.pend * P::N;
  }
  // the last chunk's leftover elements (fewer than a packet), on both paths
  for (int64_t i = scalar_from + threadIdx.x; i < ch.end; i += kThreads) {
    scalar_t mv[K > 0 ? K : 1], gmv[K > 0 ? K : 1];
    if (want_dot) {
#pragma unroll
      for (int k = 0; k < K; ++k) mv[k] = m.p[k][i];
    }
    scalar_t gxv;
    backward_element<scalar_t, K>(c, g[i], want_dot ? x[i] : scalar_t(0), mv, &gxv, gmv, s, want_x, want_m,
                                  want_dot);
    if (want_x) gx[i] = gxv;
    if (want_m) {
#pragma unroll
      for (int k = 0; k < K; ++k) gm.p[k][i] = gmv[k];
    }
  }
  if (!want_dot) return;  // uniform across the block: safe before __syncthreads
#pragma unroll
  for (int k = 0; k <= K; ++k) {
    const double tot = block_sum(s[k], smem);
    if (threadIdx.x == 0) partials[int64_t(blockIdx.x) * (1 + K) + k] = tot;
  }
}

void check_cuda_args(const at::Tensor& x, const at::Tensor& coef) {
  TORCH_CHECK(x.device().is_cuda(), "multistep_update (CUDA kernel): x must be a CUDA tensor");
  TORCH_CHECK(coef.device() == x.device(), "multistep_update: coef is on ", coef.device(), " but x is on ",
              x.device(), " (coefficients are read on the device, never copied from the host)");
}

}  // namespace

at::Tensor multistep_forward_cuda(const at::Tensor& x_in, const at::Tensor& coef_in,
                                  const std::vector<at::Tensor>& history, const at::Tensor& out_in) {
  check_update_args(x_in, coef_in, history);
  check_cuda_args(x_in, coef_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t K = static_cast<int64_t>(history.size());
  // metadata only: no sync, fine under graph capture
  if (out_in.defined()) check_update_out(out_in, x_in, coef_in, history);
  // one layout for the flat kernel, as on the CPU (csrc/dense_layout.h)
  const at::Tensor x = dense_or_copy(x_in);
  const at::Tensor out = out_in.defined() ? out_in : at::empty_like(x);
  const int64_t n = x_in.numel();
  if (n == 0) return out;
  std::vector<at::Tensor> hist;
  for (const auto& m : history) hist.push_back(in_layout_of(m, x));
  const at::Tensor coef = contiguous_aligned(coef_in);
  const bool direct = same_dense_layout(out, x);
  at::Tensor dst = direct ? out : at::empty_like(x);
  const auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ld3_multistep_forward_cuda", [&] {
    HistPtrs<scalar_t> m{};
    bool vec = aligned16(dst.const_data_ptr()) && aligned16(x.const_data_ptr());
    for (int64_t k = 0; k < K; ++k) {
      m.p[k] = hist[k].const_data_ptr<scalar_t>();
      vec = vec && aligned16(m.p[k]);
    }
    const int64_t work = vec ? n / Packet<scalar_t>::N + n % Packet<scalar_t>::N : n;
    scalar_t* o = dst.mutable_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const double* cp = coef.const_data_ptr<double>();
    dispatch_k(K, [&](auto kc) {
      constexpr int KK = decltype(kc)::value;
      const auto kernel = vec ? forward_kernel<scalar_t, KK, true> : forward_kernel<scalar_t, KK, false>;
      const int grid = grid_for(kernel, work, x.device().index());
      kernel<<<grid, kThreads, 0, stream>>>(o, xp, m, cp, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!direct) out.copy_(dst);
  return out;
}

GradTuple multistep_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& coef_in,
                                  const std::vector<at::Tensor>& history, bool need_x, bool need_coef,
                                  bool need_hist) {
  check_update_args(x_in, coef_in, history);
  check_cuda_args(x_in, coef_in);
  check_update_grad(grad_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t K = static_cast<int64_t>(history.size());
  // the grads take g's layout, as on the CPU (csrc/dense_layout.h)
  const at::Tensor g = dense_or_copy(grad_in);
  at::Tensor gx = need_x ? at::empty_like(g) : at::Tensor();
  std::vector<at::Tensor> gms;
  if (need_hist)
    for (int64_t k = 0; k < K; ++k) gms.push_back(at::empty_like(g));
  const int64_t n = g.numel();
  at::Tensor gc;
  if (need_coef) gc = n == 0 ? at::zeros_like(coef_in, at::MemoryFormat::Contiguous)
                             : at::empty_like(coef_in, at::MemoryFormat::Contiguous);
  if (n == 0 || (!need_x && !need_coef && !(need_hist && K > 0))) return {gx, gc, gms};  // as on the CPU
  const at::Tensor coef = contiguous_aligned(coef_in);
  at::Tensor x;
  std::vector<at::Tensor> hist;
  if (need_coef) {
    x = in_layout_of(x_in, g);
    for (const auto& m : history) hist.push_back(in_layout_of(m, g));
  }
  const int64_t nblocks = (n + kBlockChunk - 1) / kBlockChunk;
  TORCH_CHECK(nblocks < (int64_t(1) << 31), "multistep_update backward: tensor too large");
  at::Tensor partials = need_coef ? at::empty({nblocks, 1 + K}, coef.options()) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream(x_in.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "ld3_multistep_backward_cuda", [&] {
    HistPtrs<scalar_t> m{};
    GradPtrs<scalar_t> gm{};
    if (need_coef)
      for (int64_t k = 0; k < K; ++k) m.p[k] = hist[k].const_data_ptr<scalar_t>();
    if (need_hist)
      for (int64_t k = 0; k < K; ++k) gm.p[k] = gms[k].mutable_data_ptr<scalar_t>();
    const scalar_t* xp = need_coef ? x.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    double* pp = need_coef ? partials.mutable_data_ptr<double>() : nullptr;
    // the packet path needs every pointer the kernel touches 16-byte aligned
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    bool vec = aligned16(gp) && (!need_x || aligned16(gxp)) && (!need_coef || aligned16(xp));
    for (int64_t k = 0; k < K; ++k) {
      if (need_coef) vec = vec && aligned16(m.p[k]);
      if (need_hist) vec = vec && aligned16(gm.p[k]);
    }
    dispatch_k(K, [&](auto kc) {
      constexpr int KK = decltype(kc)::value;
      const bool want_m = need_hist && KK > 0;
      if (vec)
        backward_kernel<scalar_t, KK, true><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
            gp, xp, m, gxp, gm, coef.const_data_ptr<double>(), n, pp, need_x, want_m, need_coef);
      else
        backward_kernel<scalar_t, KK, false><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
            gp, xp, m, gxp, gm, coef.const_data_ptr<double>(), n, pp, need_x, want_m, need_coef);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_coef) {
        reduce_partials_kernel<KK><<<1, kThreads, 0, stream>>>(pp, nblocks, gc.mutable_data_ptr<double>(), 1,
                                                               static_cast<int>(gc.numel()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {gx, gc, gms};
}

}  // namespace ld3
