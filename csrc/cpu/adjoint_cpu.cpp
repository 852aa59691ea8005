// One reverse step of the whole-sampler adjoint on the CPU (ld3_ext/adjoint.py has the PyTorch
// reference and the derivation).  Per element, in one pass:
//
//   L_0 = v ? scale*lam_prev + v : lam_prev      (the state adjoint lambda_{i+1}; stored into v)
//   L_j = the older adjoints lambda_{i+1+j}      (L_1 = lam_prev when v is given, then `older`)
//   gm  = sum_j w_j L_j                          (the complete gradient of the model output m_i)
//   dots[0] = <L_0, x>,  dots[1+j] = <L_j, m>    (feed d a_i and d b_{i+j,j})
//
// The dot products use the fixed chunking of the update backward, so they are bitwise identical
// for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <array>
#include <type_traits>
#include <vector>

#include "adjoint_step.h"
#include "cpu/chunked_reduce.h"
#include "cpu/cpu_isa.h"
#include "cpu/element_io.h"
#include "cpu/half_avx2_io.h"
#include "dispatch_history.h"
#include "ld3_ops.h"
#include "solver_coefficients.h"

namespace ld3 {
namespace {

constexpr int64_t kDotBlock = 256;  // partial sums over short blocks, then across blocks

template <typename scalar_t, int J, bool V, bool DOT>
void adjoint_range(const AdjointPtrs<scalar_t>& p, at::opmath_type<scalar_t> s,
                   const at::opmath_type<scalar_t>* w, int64_t begin, int64_t end, double* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  const scalar_t* lp = p.lam_prev;
  scalar_t* vp = p.v;
  const scalar_t* l1 = p.older[0];
  const scalar_t* l2 = p.older[1];
  const scalar_t* l3 = p.older[2];
  const scalar_t* xp = p.x;
  const scalar_t* mp = p.m;
  scalar_t* gm = p.gm;
  BlockSums sums;
  for (int64_t b0 = begin; b0 < end; b0 += kDotBlock) {
    const int64_t b1 = std::min(end, b0 + kDotBlock);
    // the dot products in double, as the CUDA kernel and adjoint_step_reference take them: a product of two
    // floats is exact in double, and these dots cancel (|<L, x>| << sum |L_i x_i|), so float partial sums
    // cost the time gradient up to ~1e-4 relative in float32 sampling (10x the per-step reference's error)
    double f0 = 0, f1 = 0, f2 = 0, f3 = 0, f4 = 0;
#pragma omp simd reduction(+ : f0, f1, f2, f3, f4)
    for (int64_t i = b0; i < b1; ++i) {
      acc_t L0;
      if constexpr (V) {
        // rounded to the storage type first: the stored adjoint and the one used here agree
        L0 = round_to<scalar_t>(s * load(lp, i) + load(vp, i));
        store(vp, i, L0);
      } else {
        L0 = load(lp, i);
      }
      acc_t L1 = 0, L2 = 0, L3 = 0;
      if constexpr (J > 1) L1 = load(l1, i);
      if constexpr (J > 2) L2 = load(l2, i);
      if constexpr (J > 3) L3 = load(l3, i);
      if constexpr (J > 0) {
        acc_t g = w0 * L0;
        if constexpr (J > 1) g = g + w1 * L1;
        if constexpr (J > 2) g = g + w2 * L2;
        if constexpr (J > 3) g = g + w3 * L3;
        store(gm, i, g);
      }
      if constexpr (DOT) {
        const double L0d = L0;
        f0 += L0d * static_cast<double>(load(xp, i));
        if constexpr (J > 0) {
          const double mv = load(mp, i);
          f1 += L0d * mv;
          if constexpr (J > 1) f2 += static_cast<double>(L1) * mv;
          if constexpr (J > 2) f3 += static_cast<double>(L2) * mv;
          if constexpr (J > 3) f4 += static_cast<double>(L3) * mv;
        }
      }
    }
    sums.add(f0, f1, f2, f3, f4);
  }
  if constexpr (DOT) sums.store(partial);
}

#if LD3_CPU_AVX2_PATH
// float16 on AVX2 CPUs (csrc/cpu/half_avx2_io.h): the loop of adjoint_range, 8 elements
// a step, with bitwise the same element-wise results (L_0 is rounded to the storage type once,
// stored, and the stored value is the one used); the dot products are summed in 8 double lanes, then
// across lanes in a fixed order, then the block's scalar tail.
template <typename scalar_t, int J, bool V, bool DOT>
LD3_TARGET_AVX2_F16C void adjoint_range_half8(const AdjointPtrs<scalar_t>& p, float s, const float* w,
                                              int64_t begin, int64_t end, double* partial) {
  using H = HalfVec8<scalar_t>;
  const __m256 sv = _mm256_set1_ps(s), w0 = _mm256_set1_ps(w[0]), w1 = _mm256_set1_ps(w[1]),
               w2 = _mm256_set1_ps(w[2]), w3 = _mm256_set1_ps(w[3]);
  BlockSums sums;
  for (int64_t b0 = begin; b0 < end; b0 += kDotBlock) {
    const int64_t b1 = std::min(end, b0 + kDotBlock);
    DotAcc8 a0 = dot_zero(), a1 = a0, a2 = a0, a3 = a0, a4 = a0;  // in double, as adjoint_range sums
    int64_t i = b0;
    for (; i + 8 <= b1; i += 8) {
      __m256 L0;
      if constexpr (V) {
        const __m256 sum = _mm256_add_ps(_mm256_mul_ps(sv, H::load(p.lam_prev + i)), H::load(p.v + i));
        L0 = H::store_reload(p.v + i, sum);  // rounded once; the stored value is the one used
      } else {
        L0 = H::load(p.lam_prev + i);
      }
      __m256 L1 = _mm256_setzero_ps(), L2 = L1, L3 = L1;
      if constexpr (J > 1) L1 = H::load(p.older[0] + i);
      if constexpr (J > 2) L2 = H::load(p.older[1] + i);
      if constexpr (J > 3) L3 = H::load(p.older[2] + i);
      if constexpr (J > 0) {
        __m256 g = _mm256_mul_ps(w0, L0);
        if constexpr (J > 1) g = _mm256_add_ps(g, _mm256_mul_ps(w1, L1));
        if constexpr (J > 2) g = _mm256_add_ps(g, _mm256_mul_ps(w2, L2));
        if constexpr (J > 3) g = _mm256_add_ps(g, _mm256_mul_ps(w3, L3));
        H::store(p.gm + i, g);
      }
      if constexpr (DOT) {
        dot_add(a0, _mm256_mul_ps(L0, H::load(p.x + i)));
        if constexpr (J > 0) {
          const __m256 mv = H::load(p.m + i);
          dot_add(a1, _mm256_mul_ps(L0, mv));
          if constexpr (J > 1) dot_add(a2, _mm256_mul_ps(L1, mv));
          if constexpr (J > 2) dot_add(a3, _mm256_mul_ps(L2, mv));
          if constexpr (J > 3) dot_add(a4, _mm256_mul_ps(L3, mv));
        }
      }
    }
    // the block's tail (only the range's last block has one): adjoint_range's scalar body
    BlockSums tail;
    adjoint_range<scalar_t, J, V, DOT>(p, s, w, i, b1, tail.s);
    sums.add(dot_sum(a0) + tail.s[0], dot_sum(a1) + tail.s[1], dot_sum(a2) + tail.s[2], dot_sum(a3) + tail.s[3],
             dot_sum(a4) + tail.s[4]);
  }
  if constexpr (DOT) sums.store(partial);
}
#endif

template <typename scalar_t, int J, bool V, bool DOT>
void adjoint_impl(CpuIsa isa, const AdjointPtrs<scalar_t>& p, double scale, const double* w, int64_t n,
                  double* dots) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t wc[kMaxHistory] = {};
  for (int j = 0; j < J; ++j) wc[j] = static_cast<acc_t>(w[j]);
  const acc_t s = static_cast<acc_t>(scale);
#if LD3_CPU_AVX2_PATH
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (isa == CpuIsa::kAvx2) {
      chunked_reduce(n, DOT ? J + 1 : 0, dots, [&](int64_t b, int64_t e, double* partial) {
        adjoint_range_half8<scalar_t, J, V, DOT>(p, s, wc, b, e, partial);
      });
      return;
    }
  }
#endif
  const auto loop = [&](int64_t b, int64_t e, double* partial) {
    adjoint_range<scalar_t, J, V, DOT>(p, s, wc, b, e, partial);
  };
  chunked_reduce(n, DOT ? J + 1 : 0, dots,
                 [&](int64_t b, int64_t e, double* partial) { invoke_for_isa(isa, loop, b, e, partial); });
}

}  // namespace

at::Tensor multistep_adjoint_cpu(const at::Tensor& lam_prev, const at::Tensor& v, const at::Tensor& scale,
                                 const std::vector<at::Tensor>& older, const at::Tensor& x, const at::Tensor& m,
                                 const at::Tensor& w, const at::Tensor& dots) {
  const AdjointArgs a = check_adjoint_args(lam_prev, v, scale, older, x, m, w, dots);
  TORCH_CHECK(lam_prev.device().is_cpu(), "multistep_adjoint (CPU kernel): lam_prev must be on the CPU");
  const int64_t J = a.J;
  const int64_t n = lam_prev.numel();
  const AdjointInputs in = adjoint_inputs(a, lam_prev, v, scale, older, x, m, w);
  at::Tensor gm;
  if (adjoint_output(a, in, v, dots, gm)) return gm;
  // read through the pointer, not item(): the step makes no scalar round trip through the dispatcher
  const double s = a.has_v ? *in.scale.const_data_ptr<double>() : 1.0;
  std::vector<double> dot_host(kTableWidth, 0.0);
  const CpuIsa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.lam_prev.scalar_type(), "ld3_multistep_adjoint_cpu", [&] {
    const AdjointPtrs<scalar_t> p = adjoint_ptrs<scalar_t>(a, in, v, gm);
    const double* wp = p.w;
    dispatch_k(J, [&](auto jc) {
      constexpr int JJ = decltype(jc)::value;
      if (a.has_v && a.need_dots) adjoint_impl<scalar_t, JJ, true, true>(isa, p, s, wp, n, dot_host.data());
      else if (a.has_v) adjoint_impl<scalar_t, JJ, true, false>(isa, p, s, wp, n, nullptr);
      else if (a.need_dots) adjoint_impl<scalar_t, JJ, false, true>(isa, p, s, wp, n, dot_host.data());
      else adjoint_impl<scalar_t, JJ, false, false>(isa, p, s, wp, n, nullptr);
    });
  });
  if (a.need_dots) {
    double* d = dots.mutable_data_ptr<double>();
    const int64_t st = dots.stride(0);
    for (int64_t k = 0; k <= J; ++k) d[k * st] = dot_host[k];
  }
  return gm;
}

}  // namespace ld3
