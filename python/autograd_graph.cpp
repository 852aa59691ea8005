// Autograd-graph walk in C++: the Python walk of ld3_ext/adjoint.py creates a wrapper object for
// every node and edge it visits, which costs ~1 us a node -- milliseconds a step for a UNet.
#include "autograd_graph.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>

#include <unordered_set>

namespace ld3 {

bool depends_on_other_leaves(const at::Tensor& out, const std::vector<at::Tensor>& ours) {
  auto is_ours = [&](const at::TensorBase& t) {
    for (const auto& o : ours)
      if (o.defined() && o.unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) return true;
    return false;
  };
  // A leaf of ours may be another tensor object than the one its gradient accumulator holds: a saved
  // tensor unpacked through saved-tensor hooks (the inputs torch.utils.checkpoint re-runs a function
  // with under save_on_cpu) is a new variable that shares the original's accumulator.  Same accumulator,
  // same leaf.
  std::vector<const torch::autograd::Node*> our_accumulators;
  for (const auto& o : ours)
    if (o.defined() && o.requires_grad() && !o.grad_fn())
      if (auto acc = torch::autograd::impl::try_get_grad_accumulator(o)) our_accumulators.push_back(acc.get());
  auto is_our_accumulator = [&](const torch::autograd::Node* node) {
    for (const auto* a : our_accumulators)
      if (a == node) return true;
    return false;
  };
  // a non-leaf of ours ends the walk at its own gradient edge: what it was computed from is the
  // caller's graph, which the whole-sampler node's gradient reaches through it
  std::vector<std::pair<const torch::autograd::Node*, uint32_t>> stops;
  for (const auto& o : ours)
    if (o.defined() && o.grad_fn()) stops.emplace_back(o.grad_fn().get(), static_cast<uint32_t>(o.output_nr()));
  auto is_stop = [&](const torch::autograd::Node* fn, uint32_t nr) {
    for (const auto& s : stops)
      if (s.first == fn && s.second == nr) return true;
    return false;
  };
  const auto& root = out.grad_fn();
  if (!root) return out.requires_grad() && !is_ours(out);
  if (is_stop(root.get(), out.output_nr())) return false;
  std::vector<torch::autograd::Node*> stack{root.get()};
  std::unordered_set<torch::autograd::Node*> seen;
  while (!stack.empty()) {
    torch::autograd::Node* node = stack.back();
    stack.pop_back();
    if (node == nullptr || !seen.insert(node).second) continue;
    if (auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(node)) {
      if (!is_ours(acc->variable) && !is_our_accumulator(acc)) return true;
      continue;
    }
    for (const auto& edge : node->next_edges())
      if (edge.function && !is_stop(edge.function.get(), edge.input_nr)) stack.push_back(edge.function.get());
  }
  return false;
}

}  // namespace ld3
