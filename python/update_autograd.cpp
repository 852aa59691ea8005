// Why C++: in a training step the kernels sweep megabytes through the caches, and the Python side of
// an autograd.Function (ctx object, saved-tensor wrappers, the Python backward and its tuple) then runs
// cold -- ~90 us a forward+backward after a 64x3x32x32 sweep on a 2-core Xeon, against ~30 us warm.
// A C++ node skips the Python part (benchmarks/bench_kernels.py, case update_fwdbwd).
#include "update_autograd.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "device_dispatch.h"
#include "plain_grad.h"

namespace ld3 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::ScalarType opmath(at::ScalarType t) { return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t; }

// t, or one copy of it in like's layout when like is dense and t is laid out otherwise (as
// ld3_ext.layout.in_layout_of): one copy of the incoming grad, not one of it per history term.
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() || t.sizes() != like.sizes() || t.device() != like.device()) return t;
  bool same = true;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1 && t.stride(d) != like.stride(d)) same = false;
  if (same || !like.is_non_overlapping_and_dense()) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

// create_graph=True: the gradient must itself be differentiable (e.g. a Hessian-vector product), so it is
// built from ATen ops: grad_x = a g, grad_m_k = b_k g, grad_coef = [<g, x>, <g, m_k>..., 0...] in float64.
variable_list differentiable_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& coef,
                                      const std::vector<at::Tensor>& history, const std::vector<bool>& needs) {
  const auto acc = opmath(x.scalar_type());
  const at::Tensor ga = g.to(acc), c = coef.to(acc);
  variable_list out(2 + history.size());
  if (needs[0]) out[0] = (c.select(0, 0) * ga).to(x.scalar_type());
  if (needs[1]) {
    const at::Tensor gd = g.to(at::kDouble);
    std::vector<at::Tensor> dots{(gd * x.to(at::kDouble)).sum()};
    for (const auto& m : history) dots.push_back((gd * m.to(at::kDouble)).sum());
    const int64_t pad = coef.size(0) - static_cast<int64_t>(dots.size());
    out[1] = at::cat({at::stack(dots), at::zeros({pad}, coef.options())}).to(coef.scalar_type());
  }
  for (size_t k = 0; k < history.size(); ++k)
    if (needs[2 + k]) out[2 + k] = (c.select(0, 1 + k) * ga).to(history[k].scalar_type());
  return out;
}

}  // namespace

// The node's name (grad_fn.name()) is torch::autograd::CppNode<ld3::FusedMultistepUpdate>.
struct FusedMultistepUpdate : public torch::autograd::Function<FusedMultistepUpdate> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& coef,
                            at::TensorList history) {
    std::vector<at::Tensor> hist(history.begin(), history.end());
    variable_list saved{x, coef};
    saved.insert(saved.end(), hist.begin(), hist.end());
    ctx->save_for_backward(saved);
    return update_forward(x, coef, hist, at::Tensor());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& coef = saved[1];
    const std::vector<at::Tensor> history(saved.begin() + 2, saved.end());
    std::vector<bool> needs(saved.size());
    bool need_hist = false;
    for (size_t i = 0; i < saved.size(); ++i) {
      needs[i] = ctx->needs_input_grad(i);
      if (i >= 2) need_hist = need_hist || needs[i];
    }
    // create_graph=True, or a grad wrapped by a torch.func transform (is_grads_batched, vectorized jacobian: no
    // storage for the kernels to read): the ATen composition
    const at::Tensor g = plain_grad(grads[0]);  // a user's sparse or negated-view grad_outputs
    if (at::GradMode::is_enabled() || g.key_set().has_any(c10::functorch_transforms_ks))
      return differentiable_backward(g, x, coef, history, needs);
    auto [gx, gc, gms] = update_backward(in_layout_of(g, x), x, coef, history, needs[0], needs[1], need_hist);
    variable_list out{needs[0] ? gx : at::Tensor(), needs[1] ? gc : at::Tensor()};
    for (size_t k = 0; k < history.size(); ++k) out.push_back(need_hist && needs[2 + k] ? gms[k] : at::Tensor());
    return out;
  }
};

at::Tensor multistep_update_autograd(const at::Tensor& x, const at::Tensor& coef,
                                     const std::vector<at::Tensor>& history) {
  return FusedMultistepUpdate::apply(x, coef, at::TensorList(history));
}

}  // namespace ld3
