// One reverse step of the whole-sampler adjoint on CUDA (the CPU twin, csrc/cpu/adjoint_cpu.cpp,
// states the per-element formulas; ld3_ext/adjoint.py derives them).  Two launches: one pass over
// memory writing lambda_{i+1} into v, gm and per-block dot partials; one block summing the
// partials in a fixed order.  scale and w are read on the device: no host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "adjoint_step.h"
#include "cuda/packet_cuda.cuh"
#include "cuda/reduce_cuda.cuh"
#include "dispatch_history.h"
#include "ld3_ops.h"
#include "solver_coefficients.h"

namespace ld3 {
namespace {

// One element of the step: L_0 (read from and stored back to *vio when V), gm (into *gm), and the
// products added to the thread's sums d; lam, older, xv and mv are the element's inputs.
template <typename scalar_t, int J, bool V, bool DOT>
__device__ __forceinline__ void adjoint_element(at::opmath_type<scalar_t> s, const at::opmath_type<scalar_t>* w,
                                                scalar_t lam, scalar_t* vio, const scalar_t* older, scalar_t xv,
                                                scalar_t mv, scalar_t* gm, double* d) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t L[J > 0 ? J : 1];
  acc_t L0;
  if constexpr (V) {
    const scalar_t l = static_cast<scalar_t>(s * static_cast<acc_t>(lam) + static_cast<acc_t>(*vio));
    *vio = l;
    L0 = static_cast<acc_t>(l);
  } else {
    L0 = static_cast<acc_t>(lam);
  }
  L[0] = L0;
#pragma unroll
  for (int j = 1; j < J; ++j) L[j] = static_cast<acc_t>(older[j - 1]);
  if constexpr (J > 0) {
    acc_t g = w[0] * L[0];
#pragma unroll
    for (int j = 1; j < J; ++j) g = g + w[j] * L[j];
    *gm = static_cast<scalar_t>(g);
  }
  if constexpr (DOT) {
    d[0] += static_cast<double>(L0) * static_cast<double>(static_cast<acc_t>(xv));
    if constexpr (J > 0) {
      const double mvd = static_cast<double>(static_cast<acc_t>(mv));
#pragma unroll
      for (int j = 0; j < J; ++j) d[1 + j] += static_cast<double>(L[j]) * mvd;
    }
  }
}

// Per-block fixed chunks as in the update's backward (multistep_cuda.cu): thread t takes the chunk's
// packets t, t + kThreads, ... (whole 16-byte loads when VEC, i.e. every pointer in use aligned;
// else element by element, in the same order, so the dots do not depend on alignment), then the
// last chunk's leftover elements one by one.
template <typename scalar_t, int J, bool V, bool DOT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    adjoint_kernel(AdjointPtrs<scalar_t> p, int64_t n, double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double smem[kThreads];
  acc_t w[J > 0 ? J : 1];
#pragma unroll
  for (int j = 0; j < J; ++j) w[j] = static_cast<acc_t>(p.w[j]);
  const acc_t s = V ? static_cast<acc_t>(p.scale[0]) : acc_t(1);
  double d[1 + J];
#pragma unroll
  for (int k = 0; k <= J; ++k) d[k] = 0.0;
  using P = Packet<scalar_t>;
  const BlockChunk<scalar_t> ch(blockIdx.x, n);
  // one element by plain loads and stores: the misaligned fallback and the leftovers
  const auto scalar_element = [&](int64_t i) {
    scalar_t ov[J > 1 ? J - 1 : 1];
#pragma unroll
    for (int j = 1; j < J; ++j) ov[j - 1] = p.older[j - 1][i];
    scalar_t vv = V ? p.v[i] : scalar_t(0);
    scalar_t gv;
    adjoint_element<scalar_t, J, V, DOT>(s, w, p.lam_prev[i], &vv, ov, DOT ? p.x[i] : scalar_t(0),
                                         (DOT && J > 0) ? p.m[i] : scalar_t(0), &gv, d);
    if constexpr (V) p.v[i] = vv;
    if constexpr (J > 0) p.gm[i] = gv;
  };
  if constexpr (VEC) {
    for (int64_t q = ch.pbegin + threadIdx.x; q < ch.pend; q += kThreads) {
      const P lp = reinterpret_cast<const P*>(p.lam_prev)[q];
      P vp{}, xp{}, mp{}, gp;
      P op[J > 1 ? J - 1 : 1];
      if constexpr (V) vp = reinterpret_cast<const P*>(p.v)[q];
#pragma unroll
      for (int j = 1; j < J; ++j) op[j - 1] = reinterpret_cast<const P*>(p.older[j - 1])[q];
      if constexpr (DOT) {
        xp = reinterpret_cast<const P*>(p.x)[q];
        if constexpr (J > 0) mp = reinterpret_cast<const P*>(p.m)[q];
      }
#pragma unroll
      for (int e = 0; e < P::N; ++e) {
        scalar_t ov[J > 1 ? J - 1 : 1];
#pragma unroll
        for (int j = 1; j < J; ++j) ov[j - 1] = op[j - 1].v[e];
        adjoint_element<scalar_t, J, V, DOT>(s, w, lp.v[e], &vp.v[e], ov, xp.v[e], mp.v[e], &gp.v[e], d);
      }
      if constexpr (V) reinterpret_cast<P*>(p.v)[q] = vp;
      if constexpr (J > 0) reinterpret_cast<P*>(p.gm)[q] = gp;
    }
  } else {
    // the packet path's element-to-thread mapping and order (not consecutive elements per thread)
    for (int64_t q = ch.pbegin + threadIdx.x; q < ch.pend; q += kThreads)
#pragma unroll
      for (int e = 0; e < P::N; ++e) scalar_element(q * P::N + e);
  }
  // the last chunk's leftover elements (fewer than a packet), on both paths
  for (int64_t i = ch.pend * P::N + threadIdx.x; i < ch.end; i += kThreads) scalar_element(i);
  if constexpr (DOT) {
#pragma unroll
    for (int k = 0; k <= J; ++k) {
      const double tot = block_sum(d[k], smem);
      if (threadIdx.x == 0) partials[int64_t(blockIdx.x) * (1 + J) + k] = tot;
    }
  }
}

// Every pointer the kernel dereferences is 16-byte aligned (the packet path may run).
template <typename scalar_t>
bool all_aligned(const AdjointPtrs<scalar_t>& p, int64_t J, bool has_v, bool need_dots) {
  bool ok = aligned16(p.lam_prev) && (!has_v || aligned16(p.v)) && (J == 0 || aligned16(p.gm));
  for (int64_t j = 1; j < J; ++j) ok = ok && aligned16(p.older[j - 1]);
  if (need_dots) ok = ok && aligned16(p.x) && (J == 0 || aligned16(p.m));
  return ok;
}

}  // namespace

at::Tensor multistep_adjoint_cuda(const at::Tensor& lam_prev, const at::Tensor& v, const at::Tensor& scale,
                                  const std::vector<at::Tensor>& older, const at::Tensor& x, const at::Tensor& m,
                                  const at::Tensor& w, const at::Tensor& dots) {
  const AdjointArgs a = check_adjoint_args(lam_prev, v, scale, older, x, m, w, dots);
  TORCH_CHECK(lam_prev.device().is_cuda(), "multistep_adjoint (CUDA kernel): lam_prev must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(lam_prev.device());
  const int64_t J = a.J;
  const int64_t n = lam_prev.numel();
  const AdjointInputs in = adjoint_inputs(a, lam_prev, v, scale, older, x, m, w);
  at::Tensor gm;
  if (adjoint_output(a, in, v, dots, gm)) return gm;
  const int64_t nblocks = (n + kBlockChunk - 1) / kBlockChunk;
  TORCH_CHECK(nblocks < (int64_t(1) << 31), "multistep_adjoint: tensor too large");
  at::Tensor partials = a.need_dots ? at::empty({nblocks, 1 + J}, in.w.options()) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream(lam_prev.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.lam_prev.scalar_type(), "ld3_multistep_adjoint_cuda", [&] {
    const AdjointPtrs<scalar_t> p = adjoint_ptrs<scalar_t>(a, in, v, gm);
    double* pp = a.need_dots ? partials.mutable_data_ptr<double>() : nullptr;
    dispatch_k(J, [&](auto jc) {
      constexpr int JJ = decltype(jc)::value;
      const unsigned grid = static_cast<unsigned>(nblocks);
      const auto go = [&](auto vc, auto dc) {
        constexpr bool VV = decltype(vc)::value, DD = decltype(dc)::value;
        if (all_aligned(p, JJ, VV, DD))
          adjoint_kernel<scalar_t, JJ, VV, DD, true><<<grid, kThreads, 0, stream>>>(p, n, pp);
        else
          adjoint_kernel<scalar_t, JJ, VV, DD, false><<<grid, kThreads, 0, stream>>>(p, n, pp);
      };
      using T = std::true_type;
      using F = std::false_type;
      if (a.has_v && a.need_dots) go(T{}, T{});
      else if (a.has_v) go(T{}, F{});
      else if (a.need_dots) go(F{}, T{});
      else go(F{}, F{});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (a.need_dots) {
        reduce_partials_kernel<JJ><<<1, kThreads, 0, stream>>>(pp, nblocks, dots.mutable_data_ptr<double>(),
                                                               dots.stride(0), static_cast<int>(1 + JJ));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return gm;
}

}  // namespace ld3
