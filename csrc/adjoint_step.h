// Host-side plumbing of the adjoint-step kernel shared by the CPU and CUDA launchers: the pointer
// bundle the loops read, and the inputs it points into, all in one dense layout (dense_layout.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "dense_layout.h"
#include "ld3_ops.h"
#include "solver_coefficients.h"

namespace ld3 {

template <typename scalar_t>
struct AdjointPtrs {
  const scalar_t* lam_prev;
  scalar_t* v;                         // in/out: L_0 is written here; null without v
  const scalar_t* older[kMaxHistory];  // L_1..: lam_prev first when v is given, then `older`
  const scalar_t* x;
  const scalar_t* m;
  scalar_t* gm;
  const double* scale;  // on the tensors' device
  const double* w;
};

// Exactly the inputs the step reads, in the step's layout (keeps copies alive for the pointers).
struct AdjointInputs {
  at::Tensor lam_prev, x, m, w, scale;
  std::vector<at::Tensor> older;
};

// The step's output gm (undefined when w is empty), in the step's layout (v's, else that of the
// inputs `in`); true when there is nothing to compute (zero-size tensors: dots are zeroed).
inline bool adjoint_output(const AdjointArgs& a, const AdjointInputs& in, const at::Tensor& v, const at::Tensor& dots,
                           at::Tensor& gm) {
  gm = a.J > 0 ? at::empty_like(a.has_v ? v : in.lam_prev) : at::Tensor();
  if (in.lam_prev.numel() != 0) return false;
  if (a.need_dots) dots.narrow(0, 0, 1 + a.J).zero_();
  return true;
}

// The step runs in v's layout (v is written in place, so it is dense: check_adjoint_args), else in
// lam_prev's; inputs laid out otherwise are copied into it.
inline AdjointInputs adjoint_inputs(const AdjointArgs& a, const at::Tensor& lam_prev, const at::Tensor& v,
                                    const at::Tensor& scale, const std::vector<at::Tensor>& older,
                                    const at::Tensor& x, const at::Tensor& m, const at::Tensor& w) {
  AdjointInputs in;
  in.lam_prev = a.has_v ? in_layout_of(lam_prev, v) : dense_or_copy(lam_prev);
  const at::Tensor& like = in.lam_prev;
  for (const auto& o : older) in.older.push_back(in_layout_of(o, like));
  if (a.need_dots) in.x = in_layout_of(x, like);
  if (a.need_dots && a.J > 0) in.m = in_layout_of(m, like);
  in.w = contiguous_aligned(w);
  if (a.has_v) in.scale = contiguous_aligned(scale);
  return in;
}

template <typename scalar_t>
AdjointPtrs<scalar_t> adjoint_ptrs(const AdjointArgs& a, const AdjointInputs& in, const at::Tensor& v,
                                   const at::Tensor& gm) {
  AdjointPtrs<scalar_t> p{};
  p.lam_prev = in.lam_prev.const_data_ptr<scalar_t>();
  p.v = a.has_v ? v.mutable_data_ptr<scalar_t>() : nullptr;
  int slot = 0;
  if (a.has_v) p.older[slot++] = p.lam_prev;
  for (size_t k = 0; k < in.older.size() && slot < kMaxHistory; ++k)
    p.older[slot++] = in.older[k].const_data_ptr<scalar_t>();
  p.x = a.need_dots ? in.x.const_data_ptr<scalar_t>() : nullptr;
  p.m = (a.need_dots && a.J > 0) ? in.m.const_data_ptr<scalar_t>() : nullptr;
  p.gm = a.J > 0 ? gm.mutable_data_ptr<scalar_t>() : nullptr;
  p.scale = a.has_v ? in.scale.const_data_ptr<double>() : nullptr;
  p.w = in.w.const_data_ptr<double>();
  return p;
}

}  // namespace ld3
