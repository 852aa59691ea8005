// Why C++: as for the update node (update_autograd.cpp), the Python side of an autograd.Function runs cold
// after a kernel has swept the caches; the table node is built on every step of a differentiated sampler.
#include "table_autograd.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <utility>

#include "plain_grad.h"

namespace ld3 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

TableVjpFn& create_graph_vjp() {
  static TableVjpFn fn;
  return fn;
}

// TableArgs through the context's IValue map (all the node keeps besides t and the Jacobian)
void save_args(AutogradContext* ctx, const TableArgs& a) {
  ctx->saved_data["ints"] = std::vector<int64_t>{a.schedule_kind, a.solver, a.order, a.lower_order_final, a.heun,
                                                 a.bh2, a.use_corrector};
  ctx->saved_data["params"] = std::vector<double>{a.p0, a.p1};
}

TableArgs load_args(AutogradContext* ctx) {
  const auto i = ctx->saved_data["ints"].toIntVector();
  const auto p = ctx->saved_data["params"].toDoubleVector();
  return TableArgs{i[0], p[0], p[1], i[1], i[2], i[3] != 0, i[4] != 0, i[5] != 0, i[6] != 0};
}

}  // namespace

void set_table_create_graph_vjp(TableVjpFn fn) { create_graph_vjp() = std::move(fn); }

// The node's name (grad_fn.name()) is torch::autograd::CppNode<ld3::FusedCoefficientTable>.
struct FusedCoefficientTable : public torch::autograd::Function<FusedCoefficientTable> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& t, const TableArgs& args) {
    auto [table, jac] = table_forward(t, args);
    ctx->save_for_backward({t, jac});
    save_args(ctx, args);
    return table;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& t = saved[0];
    const at::Tensor& jac = saved[1];
    // materialized (zeros where the table was not used); a user's sparse or negated-view grad_outputs made plain
    const at::Tensor g = plain_grad(grads[0]);
    // create_graph=True, or a grad wrapped by a torch.func transform (is_grads_batched, vectorized jacobian):
    // the reference's VJP (the kernel cannot read a wrapped grad)
    if (at::GradMode::is_enabled() || g.key_set().has_any(c10::functorch_transforms_ks)) {
      const TableVjpFn& fn = create_graph_vjp();
      TORCH_CHECK(static_cast<bool>(fn), "coefficient_table: this backward needs ld3_ext.fused imported");
      return {fn(t, g, load_args(ctx)), at::Tensor()};
    }
    return {table_backward(jac, g), at::Tensor()};  // none for args
  }
};

at::Tensor coefficient_table_autograd(const at::Tensor& t, const TableArgs& args) {
  return FusedCoefficientTable::apply(t, args);
}

}  // namespace ld3
