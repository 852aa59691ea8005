// Argument validation shared by the CPU and CUDA entry points: a clear TORCH_CHECK, never a crash.
#include "ld3_ops.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <ostream>
#include <string>

#include "dense_layout.h"
#include "solver_coefficients.h"

namespace ld3 {

namespace {
// An argument's name for a message: "x", or "history[2]".  Formatted only when a check fails (TORCH_CHECK
// evaluates its message lazily): a c10::str("history[", k, "]") per tensor per call built an ostringstream
// each time, a few microseconds of every sampler step.
struct ArgName {
  const char* base;
  int64_t index = -1;
  ArgName(const char* b) : base(b) {}  // NOLINT: implicit, so a literal names a plain argument
  ArgName(const char* b, size_t i) : base(b), index(static_cast<int64_t>(i)) {}
};
std::ostream& operator<<(std::ostream& os, const ArgName& a) {
  os << a.base;
  if (a.index >= 0) os << '[' << a.index << ']';
  return os;
}

// torch._neg_view and z.conj().imag give tensors whose values are negated lazily (a bit on the tensor, not in
// memory); the kernels read and write raw storage, so such a tensor would be read (or written) with the wrong sign
void check_plain(const at::Tensor& t, const char* fn, const ArgName& name) {
  TORCH_CHECK(!t.defined() || (!t.is_neg() && !t.is_conj()), fn, ": ", name,
              " is a lazily negated or conjugated view (torch._neg_view, z.conj().imag); pass ", name,
              ".resolve_neg() (or .clone())");
}
// sparse, mkldnn and nested tensors have no strided data to walk (a nested tensor reports the strided layout)
void check_dense(const at::Tensor& t, const char* fn, const ArgName& name) {
  TORCH_CHECK(!t.defined() || (t.layout() == at::kStrided && !t.is_nested()), fn, ": ", name,
              " must be a dense (strided) tensor, got ", t.is_nested() ? std::string("a nested tensor")
                                                                        : c10::str("layout ", t.layout()));
}
// a tensor the kernel writes through a typed pointer must start at a multiple of its element size (a view at an
// odd byte offset cannot be copied back into exactly: an input is realigned by a copy, an output is refused)
void check_aligned(const at::Tensor& t, const char* fn, const ArgName& name) {
  TORCH_CHECK(!t.defined() || element_aligned(t), fn, ": ", name, " is written in place and its data is not aligned "
              "to its ", t.element_size(), "-byte elements (a view at an odd byte offset, e.g. torch.frombuffer(..., "
              "offset=1)); pass an aligned tensor (", name, ".clone())");
}
}  // namespace

void check_update_args(const at::Tensor& x, const at::Tensor& coef, const std::vector<at::Tensor>& history) {
  TORCH_CHECK(x.defined(), "multistep_update: x is undefined");
  check_dense(x, "multistep_update", "x");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "multistep_update: x must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(history.size() <= static_cast<size_t>(kMaxHistory), "multistep_update: history holds ",
              history.size(), " tensors, at most ", kMaxHistory, " are supported");
  for (size_t k = 0; k < history.size(); ++k) {
    const auto& m = history[k];
    TORCH_CHECK(m.defined(), "multistep_update: history[", k, "] is undefined");
    check_dense(m, "multistep_update", ArgName("history", k));
    TORCH_CHECK(m.scalar_type() == st, "multistep_update: history[", k, "] has dtype ", m.scalar_type(),
                " but x has dtype ", st);
    TORCH_CHECK(m.device() == x.device(), "multistep_update: history[", k, "] is on ", m.device(), " but x is on ",
                x.device());
    TORCH_CHECK(m.sizes() == x.sizes(), "multistep_update: history[", k, "] has shape ", m.sizes(),
                " but x has shape ", x.sizes());
  }
  TORCH_CHECK(coef.defined(), "multistep_update: coef is undefined");
  check_dense(coef, "multistep_update", "coef");
  TORCH_CHECK(coef.scalar_type() == at::kDouble, "multistep_update: coef must be float64, got ", coef.scalar_type());
  TORCH_CHECK(coef.dim() == 1, "multistep_update: coef must be 1-D, got shape ", coef.sizes());
  TORCH_CHECK(coef.numel() >= static_cast<int64_t>(1 + history.size()) && coef.numel() <= kTableWidth,
              "multistep_update: coef has ", coef.numel(), " entries; need between 1 + len(history) = ",
              1 + history.size(), " and ", kTableWidth);
  TORCH_CHECK(coef.device() == x.device(), "multistep_update: coef is on ", coef.device(), " but x is on ",
              x.device());
  check_plain(x, "multistep_update", "x");
  check_plain(coef, "multistep_update", "coef");
  for (size_t k = 0; k < history.size(); ++k)
    check_plain(history[k], "multistep_update", ArgName("history", k));
}

void check_update_out(const at::Tensor& out, const at::Tensor& x, const at::Tensor& coef,
                      const std::vector<at::Tensor>& history) {
  check_dense(out, "multistep_update", "out");
  check_plain(out, "multistep_update", "out");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.device() == x.device() && out.sizes() == x.sizes(),
              "multistep_update: out must match x in shape, dtype and device");
  // at::assert_no_internal_overlap(out) passes strides it cannot decide on, e.g. as_strided((3, 3), (2, 1)),
  // whose elements collide: the result was garbage (fuzz audit); and it named no argument
  TORCH_CHECK(surely_no_internal_overlap(out), "multistep_update: out has elements that share memory, or strides ",
              out.strides(), " that may make them (an expand()ed or as_strided view); pass an out whose elements are "
              "distinct (e.g. torch.empty_like(x))");
  check_aligned(out, "multistep_update", "out");
  // ATen's own overlap error names no argument: say which input out runs into
  for (size_t k = 0; k < history.size(); ++k)
    TORCH_CHECK(at::get_overlap_status(out, history[k]) != at::MemOverlapStatus::Partial,
                "multistep_update: out partially overlaps history[", k, "] (some elements share memory); pass a "
                "separate out, or history[", k, "] itself");
  TORCH_CHECK(at::get_overlap_status(out, x) != at::MemOverlapStatus::Partial,
              "multistep_update: out partially overlaps x (some elements share memory); pass a separate out, or x "
              "itself");
  // the CUDA kernel reads coef (declared __restrict__) while threads write out
  TORCH_CHECK(!out.is_alias_of(coef), "multistep_update: out must not share memory with coef");
}

void check_update_grad(const at::Tensor& grad, const at::Tensor& x) {
  check_dense(grad, "multistep_update_backward", "grad");
  check_plain(grad, "multistep_update_backward", "grad");
  TORCH_CHECK(grad.defined() && grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.device() == x.device(),
              "multistep_update backward: grad must match x in shape, dtype and device");
}

namespace {
void check_like(const at::Tensor& t, const at::Tensor& ref, const ArgName& name) {
  check_dense(t, "multistep_adjoint", name);
  check_plain(t, "multistep_adjoint", name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "multistep_adjoint: ", name, " has dtype ", t.scalar_type(),
              " but lam_prev has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "multistep_adjoint: ", name, " is on ", t.device(), " but lam_prev is on ",
              ref.device());
  TORCH_CHECK(t.sizes() == ref.sizes(), "multistep_adjoint: ", name, " has shape ", t.sizes(),
              " but lam_prev has shape ", ref.sizes());
}
void check_double_vector(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_dense(t, "multistep_adjoint", name);
  check_plain(t, "multistep_adjoint", name);
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 1, "multistep_adjoint: ", name,
              " must be a 1-D float64 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), "multistep_adjoint: ", name, " is on ", t.device(), " but lam_prev is on ",
              ref.device(), " (coefficients are read on the device)");
}
}  // namespace

AdjointArgs check_adjoint_args(const at::Tensor& lam_prev, const at::Tensor& v, const at::Tensor& scale,
                               const std::vector<at::Tensor>& older, const at::Tensor& x, const at::Tensor& m,
                               const at::Tensor& w, const at::Tensor& dots) {
  TORCH_CHECK(lam_prev.defined(), "multistep_adjoint: lam_prev is undefined");
  check_dense(lam_prev, "multistep_adjoint", "lam_prev");
  // before the memory-sharing checks below, which cannot look at a sparse tensor's storage
  check_dense(v, "multistep_adjoint", "v");
  check_dense(scale, "multistep_adjoint", "scale");
  check_dense(x, "multistep_adjoint", "x");
  check_dense(m, "multistep_adjoint", "m");
  check_dense(w, "multistep_adjoint", "w");
  check_dense(dots, "multistep_adjoint", "dots");
  for (size_t k = 0; k < older.size(); ++k) check_dense(older[k], "multistep_adjoint", ArgName("older", k));
  check_plain(lam_prev, "multistep_adjoint", "lam_prev");
  const auto st = lam_prev.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "multistep_adjoint: lam_prev must be float16, bfloat16, float32 or float64, got ", st);
  AdjointArgs a{0, v.defined(), dots.defined()};
  if (a.has_v) {
    check_like(v, lam_prev, "v");
    // the kernel walks storage flatly and writes v in place: no copy of v can stand in for it
    TORCH_CHECK(v.is_non_overlapping_and_dense(), "multistep_adjoint: v is written in place and must be "
                "non-overlapping and dense (e.g. contiguous or channels_last), got strides ", v.strides(),
                " for shape ", v.sizes());
    check_aligned(v, "multistep_adjoint", "v");
    TORCH_CHECK(!v.is_alias_of(lam_prev), "multistep_adjoint: v must not share memory with lam_prev");
    // v is overwritten with L_0 while x and m are read (by other threads, on CUDA)
    TORCH_CHECK(!(x.defined() && v.is_alias_of(x)), "multistep_adjoint: v must not share memory with x");
    TORCH_CHECK(!(m.defined() && v.is_alias_of(m)), "multistep_adjoint: v must not share memory with m");
    TORCH_CHECK(scale.defined() && scale.numel() == 1, "multistep_adjoint: scale must hold one value when v is given");
    check_plain(scale, "multistep_adjoint", "scale");
    TORCH_CHECK(scale.scalar_type() == at::kDouble && scale.device() == lam_prev.device(),
                "multistep_adjoint: scale must be a float64 tensor on lam_prev's device");
    // every CUDA block reads scale and w while earlier blocks already write v
    TORCH_CHECK(!v.is_alias_of(scale) && !(w.defined() && v.is_alias_of(w)),
                "multistep_adjoint: v must not share memory with scale or w");
  }
  TORCH_CHECK(older.size() <= static_cast<size_t>(kMaxHistory), "multistep_adjoint: older holds ", older.size(),
              " tensors, at most ", kMaxHistory);
  for (size_t k = 0; k < older.size(); ++k) {
    TORCH_CHECK(older[k].defined(), "multistep_adjoint: older[", k, "] is undefined");
    check_like(older[k], lam_prev, ArgName("older", k));
    if (a.has_v) TORCH_CHECK(!v.is_alias_of(older[k]), "multistep_adjoint: v must not share memory with older[", k, "]");
  }
  TORCH_CHECK(w.defined(), "multistep_adjoint: w is undefined");
  check_double_vector(w, lam_prev, "w");
  a.J = w.numel();
  const int64_t available = (a.has_v ? 2 : 1) + static_cast<int64_t>(older.size());
  TORCH_CHECK(a.J <= kMaxHistory && a.J <= available, "multistep_adjoint: w has ", a.J,
              " weights but only ", std::min<int64_t>(available, kMaxHistory), " adjoints are given");
  if (a.need_dots) {
    check_double_vector(dots, lam_prev, "dots");
    // each dot product has its own entry: an expand()ed dots would write them all to one
    TORCH_CHECK(at::has_internal_overlap(dots) != at::MemOverlap::Yes, "multistep_adjoint: dots has entries that "
                "share memory (e.g. an expand()ed tensor); each dot product needs its own");
    TORCH_CHECK(dots.numel() >= 1 + a.J, "multistep_adjoint: dots needs at least ", 1 + a.J, " entries, got ",
                dots.numel());
    check_aligned(dots, "multistep_adjoint", "dots");
    TORCH_CHECK(x.defined(), "multistep_adjoint: x is needed for the dot products");
    check_like(x, lam_prev, "x");
    if (a.J > 0) {
      TORCH_CHECK(m.defined(), "multistep_adjoint: m is needed for the dot products");
      check_like(m, lam_prev, "m");
    }
    // the dots are written after the tensor pass has read everything else
    for (const at::Tensor* t : {&lam_prev, &v, &x, &m, &w, &scale}) {
      TORCH_CHECK(!(t->defined() && dots.is_alias_of(*t)), "multistep_adjoint: dots must not share memory with "
                  "lam_prev, v, x, m, w or scale");
    }
    for (const auto& o : older) {
      TORCH_CHECK(!dots.is_alias_of(o), "multistep_adjoint: dots must not share memory with older");
    }
  }
  return a;
}

void check_table_args(const at::Tensor& t, int64_t schedule_kind, int64_t solver, int64_t order) {
  TORCH_CHECK(t.defined(), "coefficient_table: timesteps is undefined");
  check_dense(t, "coefficient_table", "timesteps");
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 1, "coefficient_table: timesteps must be a 1-D float64 tensor");
  TORCH_CHECK(t.numel() >= 2, "coefficient_table: timesteps needs at least 2 entries, got ", t.numel());
  // the table's offsets are int: (N - 1) * 2 * 5 * 4 must fit (samplers take tens of steps)
  TORCH_CHECK(t.numel() <= 10000001, "coefficient_table: at most 10,000,000 steps, got ", t.numel() - 1);
  check_plain(t, "coefficient_table", "timesteps");
  TORCH_CHECK(schedule_kind >= 0 && schedule_kind <= 3, "coefficient_table: unknown schedule kind ", schedule_kind);
  TORCH_CHECK(solver >= 0 && solver <= 3, "coefficient_table: unknown solver id ", solver);
  const int64_t max_order[4] = {1, 3, 3, 4};
  TORCH_CHECK(order >= 1 && order <= max_order[solver], "coefficient_table: order ", order,
              " out of range 1..", max_order[solver], " for solver id ", solver);
}

void check_table_backward_args(const at::Tensor& jac, const at::Tensor& grad) {
  check_dense(jac, "coefficient_table_backward", "jac");
  check_dense(grad, "coefficient_table_backward", "grad");
  TORCH_CHECK(jac.defined() && jac.scalar_type() == at::kDouble && jac.dim() == 4 && jac.size(1) == 2 &&
                  jac.size(2) == kTableWidth && jac.size(3) == kWindow,
              "coefficient_table_backward: jac must be a float64 [N, 2, 5, 4] tensor, got ", jac.sizes());
  TORCH_CHECK(grad.defined() && grad.is_floating_point() && grad.dim() == 3 && grad.size(0) == jac.size(0) &&
                  grad.size(1) == 2 && grad.size(2) == kTableWidth,
              "coefficient_table_backward: grad must be a floating [N, 2, 5] tensor matching jac, got ", grad.sizes());
  TORCH_CHECK(grad.device() == jac.device(), "coefficient_table_backward: grad is on ", grad.device(),
              " but jac is on ", jac.device());
  // the forward's cap: the Jacobian's flat int index (r*kRow + e)*kWindow overflows past it
  TORCH_CHECK(jac.size(0) <= 10000000, "coefficient_table_backward: at most 10,000,000 steps, got ", jac.size(0));
  check_plain(jac, "coefficient_table_backward", "jac");
  check_plain(grad, "coefficient_table_backward", "grad");
}

}  // namespace ld3
