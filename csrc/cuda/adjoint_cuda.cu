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

#include <vector>

#include "adjoint_step.h"
#include "cuda/reduce_cuda.cuh"
#include "dispatch_history.h"
#include "ld3_ops.h"
#include "solver_coefficients.h"

namespace ld3 {
namespace {

template <typename scalar_t, int J, bool V, bool DOT>
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
  const int64_t base = int64_t(blockIdx.x) * kBlockChunk;
  const int64_t end = base + kBlockChunk < n ? base + kBlockChunk : n;
  for (int64_t i = base + threadIdx.x; i < end; i += kThreads) {
    acc_t L[J > 0 ? J : 1];
    acc_t L0;
    if constexpr (V) {
      const scalar_t l = static_cast<scalar_t>(s * static_cast<acc_t>(p.lam_prev[i]) + static_cast<acc_t>(p.v[i]));
      p.v[i] = l;
      L0 = static_cast<acc_t>(l);
    } else {
      L0 = static_cast<acc_t>(p.lam_prev[i]);
    }
    L[0] = L0;
#pragma unroll
    for (int j = 1; j < J; ++j) L[j] = static_cast<acc_t>(p.older[j - 1][i]);
    if constexpr (J > 0) {
      acc_t g = w[0] * L[0];
#pragma unroll
      for (int j = 1; j < J; ++j) g = g + w[j] * L[j];
      p.gm[i] = static_cast<scalar_t>(g);
    }
    if constexpr (DOT) {
      d[0] += static_cast<double>(L0) * static_cast<double>(static_cast<acc_t>(p.x[i]));
      if constexpr (J > 0) {
        const double mv = static_cast<double>(static_cast<acc_t>(p.m[i]));
#pragma unroll
        for (int j = 0; j < J; ++j) d[1 + j] += static_cast<double>(L[j]) * mv;
      }
    }
  }
  if constexpr (DOT) {
#pragma unroll
    for (int k = 0; k <= J; ++k) {
      const double tot = block_sum(d[k], smem);
      if (threadIdx.x == 0) partials[int64_t(blockIdx.x) * (1 + J) + k] = tot;
    }
  }
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
  at::Tensor gm;
  if (adjoint_output(a, lam_prev, dots, gm)) return gm;
  const AdjointInputs in = contiguous_adjoint_inputs(a, lam_prev, scale, older, x, m, w);
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
      if (a.has_v && a.need_dots) adjoint_kernel<scalar_t, JJ, true, true><<<grid, kThreads, 0, stream>>>(p, n, pp);
      else if (a.has_v) adjoint_kernel<scalar_t, JJ, true, false><<<grid, kThreads, 0, stream>>>(p, n, pp);
      else if (a.need_dots) adjoint_kernel<scalar_t, JJ, false, true><<<grid, kThreads, 0, stream>>>(p, n, pp);
      else adjoint_kernel<scalar_t, JJ, false, false><<<grid, kThreads, 0, stream>>>(p, n, pp);
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
