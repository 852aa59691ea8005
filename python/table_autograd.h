// The eager autograd node of the fused coefficient table, in C++.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>

#include "device_dispatch.h"

namespace ld3 {

// Records one node (when grad mode is on and t requires grad) whose backward is grad_t = J^T grad_table
// with the Jacobian the forward computed.  Same results as the Python Function it replaces
// (ld3_ext/fused.py keeps it as the reference, _CoefficientTable).
at::Tensor coefficient_table_autograd(const at::Tensor& t, const TableArgs& args);

// create_graph=True: J^T g with a constant J would lose d(grad_t)/dt, so the node hands (t, grad_table, args)
// to this function instead: the Python reference table's VJP (bindings.cpp sets it to
// ld3_ext.fused._table_vjp_create_graph), which keeps every second-order term.  Also for a grad_table wrapped by
// a torch.func transform (is_grads_batched), which the kernel cannot read.
using TableVjpFn = std::function<at::Tensor(const at::Tensor& t, const at::Tensor& grad_table, const TableArgs&)>;
void set_table_create_graph_vjp(TableVjpFn fn);

}  // namespace ld3
