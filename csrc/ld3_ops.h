// Entry points of the native kernels, shared by the binding TU, the CPU and the CUDA sources.
// Kept free of torch/extension.h so the kernel TUs compile fast.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace ld3 {

using GradTuple = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// Argument checks common to every device (TORCH_CHECK messages name the argument).
void check_update_args(const at::Tensor& x, const at::Tensor& coef, const std::vector<at::Tensor>& history);
// A caller's `out=` must look exactly like x and may alias x or one history tensor only exactly
// (each element is then read and written by the same thread); any partial overlap is refused, and
// so is any memory shared with coef.
void check_update_out(const at::Tensor& out, const at::Tensor& x, const at::Tensor& coef,
                      const std::vector<at::Tensor>& history);
// The backward's incoming gradient must look exactly like x.
void check_update_grad(const at::Tensor& grad, const at::Tensor& x);
void check_table_args(const at::Tensor& t, int64_t schedule_kind, int64_t solver, int64_t order);
void check_table_backward_args(const at::Tensor& jac, const at::Tensor& grad);

// x_next = a*x + sum_k b_k*m_k with coef = [a, b_0, ...] (float64, on x's device).
// `out` (any layout, may alias x) is written in place when given; otherwise the result takes x's layout
// (x's dimension order, dense, when x is sliced; csrc/dense_layout.h).
at::Tensor multistep_forward_cpu(const at::Tensor& x, const at::Tensor& coef, const std::vector<at::Tensor>& history,
                                 const at::Tensor& out);
// Float32 CPU update outputs of at least `bytes` are written with non-temporal stores (-1: never;
// the default is the core's L2 size, at least 8 MiB); returns the previous setting.
int64_t set_stream_min_bytes(int64_t bytes);
// (grad_x, grad_coef, grad_history) in grad's layout; undefined tensors where not requested.
GradTuple multistep_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& coef,
                                 const std::vector<at::Tensor>& history, bool need_x, bool need_coef, bool need_hist);
// One reverse step of the whole-sampler adjoint (ld3_ext/adjoint.py): returns gm = sum_j w_j L_j,
// writes L_0 = scale*lam_prev + v into v when v is given, and dots = [<L_0,x>, <L_j,m>...] when
// dots is given.  Undefined tensors stand for "absent".  The written tensors (v, dots) share no
// memory with any other argument.  gm takes v's layout (v is dense), else lam_prev's.
struct AdjointArgs {
  int64_t J;
  bool has_v;
  bool need_dots;
};
AdjointArgs check_adjoint_args(const at::Tensor& lam_prev, const at::Tensor& v, const at::Tensor& scale,
                               const std::vector<at::Tensor>& older, const at::Tensor& x, const at::Tensor& m,
                               const at::Tensor& w, const at::Tensor& dots);
at::Tensor multistep_adjoint_cpu(const at::Tensor& lam_prev, const at::Tensor& v, const at::Tensor& scale,
                                 const std::vector<at::Tensor>& older, const at::Tensor& x, const at::Tensor& m,
                                 const at::Tensor& w, const at::Tensor& dots);
// ([N,2,5] table, [N,2,5,4] Jacobian w.r.t. t_{i-3..i}), float64.
std::tuple<at::Tensor, at::Tensor> coefficient_table_cpu(const at::Tensor& t, int64_t schedule_kind, double p0,
                                                         double p1, int64_t solver, int64_t order,
                                                         bool lower_order_final, bool heun, bool bh2,
                                                         bool use_corrector);

// lambda(t) = log alpha - log sigma at each host time, as the table's steps compute it (the grid check's values).
std::vector<double> schedule_lambda_cpu(int64_t schedule_kind, double p0, double p1, const std::vector<double>& t);

// grad_t = J^T grad_table scattered to t_0..t_N (float64, on jac's device).
at::Tensor coefficient_table_backward_cpu(const at::Tensor& jac, const at::Tensor& grad_table);

#ifdef LD3_WITH_CUDA_KERNELS
at::Tensor coefficient_table_backward_cuda(const at::Tensor& jac, const at::Tensor& grad_table);
at::Tensor multistep_forward_cuda(const at::Tensor& x, const at::Tensor& coef, const std::vector<at::Tensor>& history,
                                  const at::Tensor& out);
GradTuple multistep_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& coef,
                                  const std::vector<at::Tensor>& history, bool need_x, bool need_coef, bool need_hist);
at::Tensor multistep_adjoint_cuda(const at::Tensor& lam_prev, const at::Tensor& v, const at::Tensor& scale,
                                  const std::vector<at::Tensor>& older, const at::Tensor& x, const at::Tensor& m,
                                  const at::Tensor& w, const at::Tensor& dots);
std::tuple<at::Tensor, at::Tensor> coefficient_table_cuda(const at::Tensor& t, int64_t schedule_kind, double p0,
                                                          double p1, int64_t solver, int64_t order,
                                                          bool lower_order_final, bool heun, bool bh2,
                                                          bool use_corrector);
#endif

// Deterministic CPU reductions: fixed-size chunks, partials summed in chunk order
// (csrc/cpu/chunked_reduce.h).  The CUDA kernels have their own fixed shape (per-block partials of
// double products, then a fixed-order sum; csrc/cuda/reduce_cuda.cuh): each device is bitwise
// reproducible on its own, and CPU and GPU dot products agree to rounding, not bitwise.
constexpr int64_t kReduceChunk = 32768;

}  // namespace ld3
