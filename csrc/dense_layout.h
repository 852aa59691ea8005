// The one memory layout a fused kernel call runs in.  The kernels walk storage flatly, which
// pairs up the right elements for any tensors that are non-overlapping and dense with the same
// strides (contiguous, channels_last, any permutation): their outputs then take that layout too,
// as torch.empty_like(x) and the eager ops do, instead of a contiguous copy every step.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace ld3 {

// t's data starts at a multiple of its element size.  The kernels read and write through typed
// pointers: a view at an odd byte offset (torch.frombuffer(buf, offset=1)) would be undefined
// behaviour there (UBSan reports it), though torch's own ops take it.
inline bool element_aligned(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % static_cast<std::uintptr_t>(t.element_size()) == 0;
}

// No two elements of t can share memory: over its dimensions of size > 1 taken by rising stride,
// each stride steps past everything the smaller ones reach.  at::has_internal_overlap says "yes"
// only for a certain overlap (a zero stride) and "too hard" for e.g. as_strided((3, 3), (2, 1)),
// whose elements collide; a written tensor must pass this test instead.
inline bool surely_no_internal_overlap(const at::Tensor& t) {
  if (t.numel() == 0) return true;  // no elements to meet (a size-0 dimension, whatever the other strides)
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // the largest offset the dimensions so far reach
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += (size - 1) * stride;
  }
  return true;
}

// t and `like` (dense) put every element at the same storage offset: t is dense and has like's
// strides on every dimension of size > 1 (a size-1 dimension's stride is never used).
inline bool same_dense_layout(const at::Tensor& t, const at::Tensor& like) {
  if (!t.is_non_overlapping_and_dense() || t.sizes() != like.sizes()) return false;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != like.stride(d)) return false;
  return true;
}

// t when dense (and aligned), else a dense copy in t's dimension order (the layout empty_like picks for it).
inline at::Tensor dense_or_copy(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && element_aligned(t) ? t : at::empty_like(t).copy_(t);
}

// t when it is laid out like `like` (dense, aligned), else a copy in like's layout.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  return same_dense_layout(t, like) && element_aligned(t) ? t : at::empty_like(like).copy_(t);
}

// t.contiguous(), realigned by a copy when its data starts at an odd byte offset (coefficients, grids).
inline at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return element_aligned(c) ? c : c.clone(at::MemoryFormat::Contiguous);
}

}  // namespace ld3
