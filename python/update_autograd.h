// The eager autograd node of the fused update x_next = coef[0]*x + sum_k coef[1+k]*history[k], in C++.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace ld3 {

// Records one node (when grad mode is on and an input requires grad) whose backward is the one-pass
// kernel; under create_graph=True it is a differentiable ATen composition instead.  Same results as
// the Python Function it replaces (ld3_ext/fused.py keeps it as the reference, _MultistepUpdate).
at::Tensor multistep_update_autograd(const at::Tensor& x, const at::Tensor& coef,
                                     const std::vector<at::Tensor>& history);

}  // namespace ld3
