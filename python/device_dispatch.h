// Device dispatch of the fused kernels (CPU or CUDA by x's device), shared by the pybind11 functions
// (bindings.cpp) and the C++ autograd node of the update (update_autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "ld3_ops.h"

namespace ld3 {

// out (undefined: a new tensor) is written in place: it must not require grad, and its version goes up.
at::Tensor update_forward(const at::Tensor& x, const at::Tensor& coef, const std::vector<at::Tensor>& history,
                          const at::Tensor& out);

GradTuple update_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& coef,
                          const std::vector<at::Tensor>& history, bool need_x, bool need_coef, bool need_history);

// The checks that in-place writes of the kernels share with ATen's in-place ops.
void check_written(const at::Tensor& t, const char* what);
void bump_version(const at::Tensor& t);

[[noreturn]] void no_cuda(const char* what);

}  // namespace ld3
