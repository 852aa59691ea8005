// Autograd-graph walk in C++: the Python walk of ld3_ext/adjoint.py creates a wrapper object for
// every node and edge it visits, which costs ~1 us a node -- milliseconds a step for a UNet.
#include "autograd_graph.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>

#include <unordered_set>

namespace ld3 {

bool depends_on_other_leaves(const at::Tensor& out, const std::vector<at::Tensor>& ours) {
  auto is_ours = [&](const at::TensorBase& t) {
    for (const auto& o : ours)
      if (o.defined() && o.unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) return true;
    return false;
  };
  const auto& root = out.grad_fn();
  if (!root) return out.requires_grad() && !is_ours(out);
  std::vector<torch::autograd::Node*> stack{root.get()};
  std::unordered_set<torch::autograd::Node*> seen;
  while (!stack.empty()) {
    torch::autograd::Node* node = stack.back();
    stack.pop_back();
    if (node == nullptr || !seen.insert(node).second) continue;
    if (auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(node)) {
      if (!is_ours(acc->variable)) return true;
      continue;
    }
    for (const auto& edge : node->next_edges())
      if (edge.function) stack.push_back(edge.function.get());
  }
  return false;
}

}  // namespace ld3
