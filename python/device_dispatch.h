// Device dispatch of the fused kernels (CPU or CUDA by x's device), shared by the pybind11 functions
// (bindings.cpp) and the C++ autograd nodes (update_autograd.cpp, table_autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "ld3_ops.h"

namespace ld3 {

// out (undefined: a new tensor) is written in place: it must not require grad, and its version goes up.
at::Tensor update_forward(const at::Tensor& x, const at::Tensor& coef, const std::vector<at::Tensor>& history,
                          const at::Tensor& out);

GradTuple update_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& coef,
                          const std::vector<at::Tensor>& history, bool need_x, bool need_coef, bool need_history);

// The [N,2,5] coefficient table of a grid and its Jacobian [N,2,5,4] w.r.t. t_{i-3..i} (CPU or CUDA by t's
// device), and grad_t = J^T grad_table.
struct TableArgs {
  int64_t schedule_kind;
  double p0, p1;
  int64_t solver, order;
  bool lower_order_final, heun, bh2, use_corrector;
};
std::tuple<at::Tensor, at::Tensor> table_forward(const at::Tensor& t, const TableArgs& a);
at::Tensor table_backward(const at::Tensor& jac, const at::Tensor& grad_table);

// The checks that in-place writes of the kernels share with ATen's in-place ops.
void check_written(const at::Tensor& t, const char* what);
void bump_version(const at::Tensor& t);

[[noreturn]] void no_cuda(const char* what);

}  // namespace ld3
