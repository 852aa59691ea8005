// Queries on the autograd graph that the whole-sampler node (ld3_ext/adjoint.py) needs per step.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace ld3 {

// True when `out` depends, through its autograd graph, on a tensor that requires grad other than
// the tensors in `ours` (their gradients would be lost by the whole-sampler backward).  A non-leaf
// in `ours` counts as an input: the walk does not look past it at what it was computed from.  Same
// answer as the Python reference adjoint._depends_on_other_leaves_reference, without building a
// Python object per graph node.
bool depends_on_other_leaves(const at::Tensor& out, const std::vector<at::Tensor>& ours);

}  // namespace ld3
