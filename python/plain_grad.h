// The incoming gradient of an autograd node as the kernels can read it.
#pragma once

#include <ATen/ATen.h>

namespace ld3 {

// A user's grad_outputs may be sparse (or mkldnn) or a lazily negated view (torch._neg_view): the kernels walk
// dense storage and read raw values, so such a gradient is made dense and plain first, as the eager ops'
// backward would take it.  Both conversions are differentiable (create_graph=True keeps working).
inline at::Tensor plain_grad(const at::Tensor& g) {
  if (!g.defined()) return g;
  at::Tensor out = g.layout() == at::kStrided ? g : g.to_dense();
  return out.is_neg() ? out.resolve_neg() : out;
}

}  // namespace ld3
