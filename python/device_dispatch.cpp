#include "device_dispatch.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/variable.h>

namespace ld3 {

namespace {
bool is_cuda(const at::Tensor& t) { return t.defined() && t.device().is_cuda(); }
}  // namespace

void no_cuda(const char* what) {
  TORCH_CHECK(false, what, ": ld3_ext._C was built without CUDA kernels (rebuild with LD3_WITH_CUDA=ON)");
}

// A tensor these functions write in place, as ATen's in-place ops treat theirs: autograd cannot record the
// write (so no tensor requiring grad), an inference tensor only inside InferenceMode, and its version
// counter goes up afterwards, so a graph that saved it refuses to backward through stale values.
void check_written(const at::Tensor& t, const char* what) {
  if (!t.defined()) return;
  TORCH_CHECK(!(t.requires_grad() && at::GradMode::is_enabled()), what,
              " is written in place and must not require grad (autograd cannot record this write)");
  TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), what,
              " is an inference tensor: it can be written in place only inside torch.inference_mode()");
}

void bump_version(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) torch::autograd::impl::bump_version(t);
}

at::Tensor update_forward(const at::Tensor& x, const at::Tensor& coef, const std::vector<at::Tensor>& history,
                          const at::Tensor& out) {
  check_written(out, "multistep_update: out");
  at::Tensor res;
  if (is_cuda(x)) {
#ifdef LD3_WITH_CUDA_KERNELS
    res = multistep_forward_cuda(x, coef, history, out);
#else
    no_cuda("multistep_update");
#endif
  } else {
    res = multistep_forward_cpu(x, coef, history, out);
  }
  bump_version(out);
  return res;
}

GradTuple update_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& coef,
                          const std::vector<at::Tensor>& history, bool need_x, bool need_coef, bool need_history) {
  if (is_cuda(x)) {
#ifdef LD3_WITH_CUDA_KERNELS
    return multistep_backward_cuda(grad, x, coef, history, need_x, need_coef, need_history);
#else
    no_cuda("multistep_update_backward");
#endif
  }
  return multistep_backward_cpu(grad, x, coef, history, need_x, need_coef, need_history);
}

std::tuple<at::Tensor, at::Tensor> table_forward(const at::Tensor& t, const TableArgs& a) {
  if (is_cuda(t)) {
#ifdef LD3_WITH_CUDA_KERNELS
    return coefficient_table_cuda(t, a.schedule_kind, a.p0, a.p1, a.solver, a.order, a.lower_order_final, a.heun,
                                  a.bh2, a.use_corrector);
#else
    no_cuda("coefficient_table");
#endif
  }
  return coefficient_table_cpu(t, a.schedule_kind, a.p0, a.p1, a.solver, a.order, a.lower_order_final, a.heun, a.bh2,
                               a.use_corrector);
}

at::Tensor table_backward(const at::Tensor& jac, const at::Tensor& grad_table) {
  if (is_cuda(jac)) {
#ifdef LD3_WITH_CUDA_KERNELS
    return coefficient_table_backward_cuda(jac, grad_table);
#else
    no_cuda("coefficient_table_backward");
#endif
  }
  return coefficient_table_backward_cpu(jac, grad_table);
}

}  // namespace ld3
