// The one memory layout a fused kernel call runs in.  The kernels walk storage flatly, which
// pairs up the right elements for any tensors that are non-overlapping and dense with the same
// strides (contiguous, channels_last, any permutation): their outputs then take that layout too,
// as torch.empty_like(x) and the eager ops do, instead of a contiguous copy every step.
#pragma once

#include <ATen/ATen.h>

namespace ld3 {

// t and `like` (dense) put every element at the same storage offset: t is dense and has like's
// strides on every dimension of size > 1 (a size-1 dimension's stride is never used).
inline bool same_dense_layout(const at::Tensor& t, const at::Tensor& like) {
  if (!t.is_non_overlapping_and_dense() || t.sizes() != like.sizes()) return false;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != like.stride(d)) return false;
  return true;
}

// t when dense, else a dense copy in t's dimension order (the layout empty_like picks for it).
inline at::Tensor dense_or_copy(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : at::empty_like(t).copy_(t);
}

// t when it is laid out like `like` (dense), else a copy in like's layout.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  return same_dense_layout(t, like) ? t : at::empty_like(like).copy_(t);
}

}  // namespace ld3
