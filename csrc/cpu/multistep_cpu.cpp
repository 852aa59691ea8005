// Fused multistep update on the CPU: forward and one-pass backward.
//
// Loops live in templates (a #pragma cannot sit inside an AT_DISPATCH lambda) and are specialised
// on the number of history terms K so each pass reads exactly the bytes it needs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#if defined(__unix__)
#include <unistd.h>
#endif

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "ld3_ops.h"
#include "cpu/chunked_reduce.h"
#include "cpu/cpu_isa.h"
#include "cpu/element_io.h"
#include "cpu/half_avx2_io.h"
#include "dense_layout.h"
#include "dispatch_history.h"
#include "solver_coefficients.h"

namespace ld3 {
namespace {

// Elements per parallel_for task in the forward; large enough to amortise the fork.
constexpr int64_t kForwardGrain = 32768;
// Elements per op-math partial sum in the backward dot products (bounds float rounding growth).
constexpr int64_t kDotBlock = 256;

template <typename scalar_t>
using Ptrs = std::array<const scalar_t*, kMaxHistory>;

template <typename scalar_t, int K>
void forward_range(scalar_t* out, const scalar_t* x, const Ptrs<scalar_t>& m, const at::opmath_type<scalar_t>* c,
                   int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4];
  const scalar_t* m0 = m[0];
  const scalar_t* m1 = m[1];
  const scalar_t* m2 = m[2];
  const scalar_t* m3 = m[3];
  // out may alias x exactly: element i is read before it is written, no cross-element dependence.
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    acc_t v = c0 * load(x, i);
    if constexpr (K > 0) v = v + c1 * load(m0, i);
    if constexpr (K > 1) v = v + c2 * load(m1, i);
    if constexpr (K > 2) v = v + c3 * load(m2, i);
    if constexpr (K > 3) v = v + c4 * load(m3, i);
    store(out, i, v);
  }
}

#if defined(__SSE2__)
// float32 forward with non-temporal stores: the output bypasses the cache, which saves the
// read-for-ownership of each written line (1 of the 6 memory passes) when tensors are larger than
// the cache.  Same operation order as forward_range (no FMA contraction): bitwise-equal results.
template <int K>
void forward_range_stream(float* out, const float* x, const Ptrs<float>& m, const float* c, int64_t begin,
                          int64_t end) {
  int64_t i = begin;
  for (; i < end && (reinterpret_cast<std::uintptr_t>(out + i) & 15u) != 0; ++i)
    forward_range<float, K>(out, x, m, c, i, i + 1);
  const __m128 c0 = _mm_set1_ps(c[0]), c1 = _mm_set1_ps(c[1]), c2 = _mm_set1_ps(c[2]), c3 = _mm_set1_ps(c[3]),
               c4 = _mm_set1_ps(c[4]);
  for (; i + 4 <= end; i += 4) {
    __m128 v = _mm_mul_ps(c0, _mm_loadu_ps(x + i));
    if constexpr (K > 0) v = _mm_add_ps(v, _mm_mul_ps(c1, _mm_loadu_ps(m[0] + i)));
    if constexpr (K > 1) v = _mm_add_ps(v, _mm_mul_ps(c2, _mm_loadu_ps(m[1] + i)));
    if constexpr (K > 2) v = _mm_add_ps(v, _mm_mul_ps(c3, _mm_loadu_ps(m[2] + i)));
    if constexpr (K > 3) v = _mm_add_ps(v, _mm_mul_ps(c4, _mm_loadu_ps(m[3] + i)));
    _mm_stream_ps(out + i, v);
  }
  if (i < end) forward_range<float, K>(out, x, m, c, i, end);
  _mm_sfence();  // order the streamed stores before anything that reads `out`
}
#endif

#if LD3_CPU_AVX2_PATH
// float16 forward on AVX2 CPUs, 8 elements a step (csrc/cpu/half_avx2_io.h).  Same
// operation order as forward_range and the same rounding, so the results are bitwise equal
// (NaN payloads aside).
template <typename scalar_t, int K>
LD3_TARGET_AVX2_F16C void forward_range_half8(scalar_t* out, const scalar_t* x, const Ptrs<scalar_t>& m,
                                              const float* c, int64_t begin, int64_t end) {
  using V = HalfVec8<scalar_t>;
  const __m256 c0 = _mm256_set1_ps(c[0]), c1 = _mm256_set1_ps(c[1]), c2 = _mm256_set1_ps(c[2]),
               c3 = _mm256_set1_ps(c[3]), c4 = _mm256_set1_ps(c[4]);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {  // out may alias x: each block is read before it is written
    __m256 v = _mm256_mul_ps(c0, V::load(x + i));
    if constexpr (K > 0) v = _mm256_add_ps(v, _mm256_mul_ps(c1, V::load(m[0] + i)));
    if constexpr (K > 1) v = _mm256_add_ps(v, _mm256_mul_ps(c2, V::load(m[1] + i)));
    if constexpr (K > 2) v = _mm256_add_ps(v, _mm256_mul_ps(c3, V::load(m[2] + i)));
    if constexpr (K > 3) v = _mm256_add_ps(v, _mm256_mul_ps(c4, V::load(m[3] + i)));
    V::store(out + i, v);
  }
  if (i < end) forward_range<scalar_t, K>(out, x, m, c, i, end);
}
#endif

// Float32 outputs of at least this many bytes are written with non-temporal stores (x86).  In a
// sampler the next network evaluation reads the new state at once, so streaming pays only when
// the state is far larger than the caches; below that it costs more than it saves elsewhere.
// Measured crossovers: ~2 MiB on an Intel Xeon box, 3-6 MiB on an AMD EPYC box (1-2 threads),
// with up to 1.5x losses below the crossover and 1-30 % gains above it
// (benchmarks/README.md), so the default errs high: the L2 size, at least 8 MiB.  The L3 size is
// not used: VMs report the whole package's (320 MiB on the EPYC box, whose core sees 32 MiB).
// LD3_STREAM_MIN_BYTES sets it at load and set_stream_min_bytes() at run time (-1 = never).
int64_t default_stream_min_bytes() {
  int64_t l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
  l2 = static_cast<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
  return std::max<int64_t>(l2, int64_t(8) << 20);
}

std::atomic<int64_t>& stream_threshold() {
  static std::atomic<int64_t> value{[] {
    const char* env = std::getenv("LD3_STREAM_MIN_BYTES");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      // as for the setter, any negative value means never (-1)
      if (end != env && *end == '\0') return v < 0 ? int64_t(-1) : static_cast<int64_t>(v);
    }
    return default_stream_min_bytes();
  }()};
  return value;
}

[[maybe_unused]] bool stream_output(int64_t bytes) {  // unused without SSE2 (no streaming stores)
  const int64_t t = stream_threshold().load(std::memory_order_relaxed);
  return t >= 0 && bytes >= t;
}

template <typename scalar_t, int K>
void forward_impl(CpuIsa isa, scalar_t* out, const scalar_t* x, const Ptrs<scalar_t>& m, const double* coef,
                  int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  // coefficients are rounded to the op-math type first, as the reference path does
  acc_t c[kTableWidth] = {};
  for (int k = 0; k <= K; ++k) c[k] = static_cast<acc_t>(coef[k]);
#if LD3_CPU_AVX2_PATH
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (isa == CpuIsa::kAvx2) {
      at::parallel_for(0, n, kForwardGrain,
                       [&](int64_t b, int64_t e) { forward_range_half8<scalar_t, K>(out, x, m, c, b, e); });
      return;
    }
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream_output(n * int64_t(sizeof(float)))) {
      const auto loop = [&](int64_t b, int64_t e) { forward_range_stream<K>(out, x, m, c, b, e); };
      at::parallel_for(0, n, kForwardGrain, [&](int64_t b, int64_t e) { invoke_for_isa(isa, loop, b, e); });
      return;
    }
  }
#endif
  const auto loop = [&](int64_t b, int64_t e) { forward_range<scalar_t, K>(out, x, m, c, b, e); };
  at::parallel_for(0, n, kForwardGrain, [&](int64_t b, int64_t e) { invoke_for_isa(isa, loop, b, e); });
}

// One pass: element-wise grads (if wanted) and the chunk's dot products <g,x>, <g,m_k> in double.
// Every combination is its own instantiation: a conditional store inside the loop would stop GCC
// from vectorising it.
template <typename scalar_t, int K, bool GX, bool GM, bool DOT>
void backward_range(const scalar_t* g, const scalar_t* x, const Ptrs<scalar_t>& m, scalar_t* gx,
                    const std::array<scalar_t*, kMaxHistory>& gm, const at::opmath_type<scalar_t>* c, int64_t begin,
                    int64_t end, double* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4];
  const scalar_t* m0 = m[0];
  const scalar_t* m1 = m[1];
  const scalar_t* m2 = m[2];
  const scalar_t* m3 = m[3];
  scalar_t* g0 = gm[0];
  scalar_t* g1 = gm[1];
  scalar_t* g2 = gm[2];
  scalar_t* g3 = gm[3];
  // Dot products in double over short fixed blocks, then across blocks: a product of two floats is
  // exact in double, and <g, x> can cancel (float partial sums lost ~1e-4 relative of a float32 time
  // gradient); the CUDA kernel and the reference sum in double too.
  BlockSums sums;
  for (int64_t b0 = begin; b0 < end; b0 += kDotBlock) {
    const int64_t b1 = std::min(end, b0 + kDotBlock);
    double f0 = 0, f1 = 0, f2 = 0, f3 = 0, f4 = 0;
#pragma omp simd reduction(+ : f0, f1, f2, f3, f4)
    for (int64_t i = b0; i < b1; ++i) {
      const acc_t gi = load(g, i);
      if constexpr (GX) store(gx, i, c0 * gi);
      if constexpr (GM && K > 0) store(g0, i, c1 * gi);
      if constexpr (GM && K > 1) store(g1, i, c2 * gi);
      if constexpr (GM && K > 2) store(g2, i, c3 * gi);
      if constexpr (GM && K > 3) store(g3, i, c4 * gi);
      if constexpr (DOT) {
        const double gd = gi;
        f0 += gd * static_cast<double>(load(x, i));
        if constexpr (K > 0) f1 += gd * static_cast<double>(load(m0, i));
        if constexpr (K > 1) f2 += gd * static_cast<double>(load(m1, i));
        if constexpr (K > 2) f3 += gd * static_cast<double>(load(m2, i));
        if constexpr (K > 3) f4 += gd * static_cast<double>(load(m3, i));
      }
    }
    sums.add(f0, f1, f2, f3, f4);
  }
  if constexpr (DOT) sums.store(partial);
}

#if LD3_CPU_AVX2_PATH
// float16 backward on AVX2 CPUs: the loop of backward_range, 8 elements a step.  The
// element-wise grads are bitwise those of backward_range; each block's dot products are summed in double in
// 8 lanes, then across lanes in a fixed order, then the block's scalar tail.
template <typename scalar_t, int K, bool GX, bool GM, bool DOT>
LD3_TARGET_AVX2_F16C void backward_range_half8(const scalar_t* g, const scalar_t* x, const Ptrs<scalar_t>& m,
                                               scalar_t* gx, const std::array<scalar_t*, kMaxHistory>& gm,
                                               const float* c, int64_t begin, int64_t end, double* partial) {
  using V = HalfVec8<scalar_t>;
  const __m256 c0 = _mm256_set1_ps(c[0]), c1 = _mm256_set1_ps(c[1]), c2 = _mm256_set1_ps(c[2]),
               c3 = _mm256_set1_ps(c[3]), c4 = _mm256_set1_ps(c[4]);
  BlockSums sums;
  for (int64_t b0 = begin; b0 < end; b0 += kDotBlock) {
    const int64_t b1 = std::min(end, b0 + kDotBlock);
    DotAcc8 a0 = dot_zero(), a1 = a0, a2 = a0, a3 = a0, a4 = a0;  // in double, as adjoint_range sums
    int64_t i = b0;
    for (; i + 8 <= b1; i += 8) {
      const __m256 gi = V::load(g + i);
      if constexpr (GX) V::store(gx + i, _mm256_mul_ps(c0, gi));
      if constexpr (GM && K > 0) V::store(gm[0] + i, _mm256_mul_ps(c1, gi));
      if constexpr (GM && K > 1) V::store(gm[1] + i, _mm256_mul_ps(c2, gi));
      if constexpr (GM && K > 2) V::store(gm[2] + i, _mm256_mul_ps(c3, gi));
      if constexpr (GM && K > 3) V::store(gm[3] + i, _mm256_mul_ps(c4, gi));
      if constexpr (DOT) {
        dot_add(a0, _mm256_mul_ps(gi, V::load(x + i)));
        if constexpr (K > 0) dot_add(a1, _mm256_mul_ps(gi, V::load(m[0] + i)));
        if constexpr (K > 1) dot_add(a2, _mm256_mul_ps(gi, V::load(m[1] + i)));
        if constexpr (K > 2) dot_add(a3, _mm256_mul_ps(gi, V::load(m[2] + i)));
        if constexpr (K > 3) dot_add(a4, _mm256_mul_ps(gi, V::load(m[3] + i)));
      }
    }
    // the block's tail (only the range's last block has one): backward_range's scalar body
    BlockSums tail;
    backward_range<scalar_t, K, GX, GM, DOT>(g, x, m, gx, gm, c, i, b1, tail.s);
    sums.add(dot_sum(a0) + tail.s[0], dot_sum(a1) + tail.s[1], dot_sum(a2) + tail.s[2], dot_sum(a3) + tail.s[3],
             dot_sum(a4) + tail.s[4]);
  }
  if constexpr (DOT) sums.store(partial);
}
#endif

template <typename scalar_t, int K, bool GX, bool GM, bool DOT>
void backward_impl(CpuIsa isa, const scalar_t* g, const scalar_t* x, const Ptrs<scalar_t>& m, scalar_t* gx,
                   const std::array<scalar_t*, kMaxHistory>& gm, const double* coef, int64_t n, double* grad_coef) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t c[kTableWidth] = {};
  for (int k = 0; k <= K; ++k) c[k] = static_cast<acc_t>(coef[k]);
#if LD3_CPU_AVX2_PATH
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (isa == CpuIsa::kAvx2) {
      chunked_reduce(n, DOT ? K + 1 : 0, grad_coef, [&](int64_t b, int64_t e, double* partial) {
        backward_range_half8<scalar_t, K, GX, GM, DOT>(g, x, m, gx, gm, c, b, e, partial);
      });
      return;
    }
  }
#endif
  const auto loop = [&](int64_t b, int64_t e, double* partial) {
    backward_range<scalar_t, K, GX, GM, DOT>(g, x, m, gx, gm, c, b, e, partial);
  };
  chunked_reduce(n, DOT ? K + 1 : 0, grad_coef,
                 [&](int64_t b, int64_t e, double* partial) { invoke_for_isa(isa, loop, b, e, partial); });
}

void check_cpu(const at::Tensor& x, const at::Tensor& coef) {
  TORCH_CHECK(x.device().is_cpu(), "multistep_update (CPU kernel): x must be on the CPU, got ", x.device());
  TORCH_CHECK(coef.device().is_cpu(), "multistep_update: coef is on ", coef.device(), " but x is on the CPU");
}

}  // namespace

int64_t set_stream_min_bytes(int64_t bytes) {
  return stream_threshold().exchange(bytes < 0 ? -1 : bytes);
}

at::Tensor multistep_forward_cpu(const at::Tensor& x_in, const at::Tensor& coef_in,
                                 const std::vector<at::Tensor>& history, const at::Tensor& out_in) {
  check_update_args(x_in, coef_in, history);
  check_cpu(x_in, coef_in);
  const int64_t K = static_cast<int64_t>(history.size());
  if (out_in.defined()) check_update_out(out_in, x_in, coef_in, history);
  // One layout for the flat loop (csrc/dense_layout.h): x's own when dense; a sliced x, or a history
  // term laid out otherwise, is copied into it first.
  const at::Tensor x = dense_or_copy(x_in);
  const at::Tensor out = out_in.defined() ? out_in : at::empty_like(x);
  if (x_in.numel() == 0) return out;
  std::vector<at::Tensor> hist;
  hist.reserve(K);
  for (const auto& m : history) hist.push_back(in_layout_of(m, x));
  const at::Tensor coef = contiguous_aligned(coef_in);
  const bool direct = same_dense_layout(out, x);
  at::Tensor dst = direct ? out : at::empty_like(x);
  const CpuIsa isa = cpu_isa();
  // An exactly aliased x (out=x) stays safe: same index read then written.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ld3_multistep_forward_cpu", [&] {
    Ptrs<scalar_t> m{};
    for (int64_t k = 0; k < K; ++k) m[k] = hist[k].const_data_ptr<scalar_t>();
    scalar_t* o = dst.mutable_data_ptr<scalar_t>();
    const scalar_t* xp = direct && out.is_same(x_in) ? o : x.const_data_ptr<scalar_t>();
    const double* cp = coef.const_data_ptr<double>();
    dispatch_k(K, [&](auto kc) { forward_impl<scalar_t, decltype(kc)::value>(isa, o, xp, m, cp, x.numel()); });
  });
  if (!direct) out.copy_(dst);
  return out;
}

GradTuple multistep_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& coef_in,
                                 const std::vector<at::Tensor>& history, bool need_x, bool need_coef,
                                 bool need_hist) {
  check_update_args(x_in, coef_in, history);
  check_cpu(x_in, coef_in);
  check_update_grad(grad_in, x_in);
  const int64_t K = static_cast<int64_t>(history.size());
  // the grads take g's layout (csrc/dense_layout.h); x and history are read in it too
  const at::Tensor g = dense_or_copy(grad_in);
  at::Tensor gx = need_x ? at::empty_like(g) : at::Tensor();
  std::vector<at::Tensor> gms;
  if (need_hist)
    for (int64_t k = 0; k < K; ++k) gms.push_back(at::empty_like(g));
  at::Tensor gc = need_coef ? at::zeros_like(coef_in, at::MemoryFormat::Contiguous) : at::Tensor();
  const int64_t n = g.numel();
  if (n == 0 || (!need_x && !need_coef && !(need_hist && K > 0))) return {gx, gc, gms};
  const at::Tensor coef = contiguous_aligned(coef_in);
  // x and history are only read for the dot products
  at::Tensor x;
  std::vector<at::Tensor> hist;
  if (need_coef) {
    x = in_layout_of(x_in, g);
    for (const auto& m : history) hist.push_back(in_layout_of(m, g));
  }
  const CpuIsa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "ld3_multistep_backward_cpu", [&] {
    Ptrs<scalar_t> m{};
    std::array<scalar_t*, kMaxHistory> gm{};
    if (need_coef)
      for (int64_t k = 0; k < K; ++k) m[k] = hist[k].const_data_ptr<scalar_t>();
    if (need_hist)
      for (int64_t k = 0; k < K; ++k) gm[k] = gms[k].mutable_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = need_coef ? x.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    const double* cp = coef.const_data_ptr<double>();
    double* gcp = need_coef ? gc.mutable_data_ptr<double>() : nullptr;
    dispatch_k(K, [&](auto kc) {
      constexpr int KK = decltype(kc)::value;
      const bool gm_on = need_hist && KK > 0;
      // 8 combinations of (grad_x, grad_history, dot products)
      if (need_x && gm_on && need_coef) backward_impl<scalar_t, KK, true, true, true>(isa, gp, xp, m, gxp, gm, cp, n, gcp);
      else if (need_x && gm_on) backward_impl<scalar_t, KK, true, true, false>(isa, gp, xp, m, gxp, gm, cp, n, gcp);
      else if (need_x && need_coef) backward_impl<scalar_t, KK, true, false, true>(isa, gp, xp, m, gxp, gm, cp, n, gcp);
      else if (need_x) backward_impl<scalar_t, KK, true, false, false>(isa, gp, xp, m, gxp, gm, cp, n, gcp);
      else if (gm_on && need_coef) backward_impl<scalar_t, KK, false, true, true>(isa, gp, xp, m, gxp, gm, cp, n, gcp);
      else if (gm_on) backward_impl<scalar_t, KK, false, true, false>(isa, gp, xp, m, gxp, gm, cp, n, gcp);
      else backward_impl<scalar_t, KK, false, false, true>(isa, gp, xp, m, gxp, gm, cp, n, gcp);
    });
  });
  return {gx, gc, gms};
}

}  // namespace ld3
