// Coefficient table + Jacobian on the host: a thin loop over the shared header.
#include <ATen/ATen.h>

#include <vector>

#include "dense_layout.h"
#include "ld3_ops.h"
#include "solver_coefficients.h"

namespace ld3 {

std::tuple<at::Tensor, at::Tensor> coefficient_table_cpu(const at::Tensor& t_in, int64_t schedule_kind, double p0,
                                                         double p1, int64_t solver, int64_t order,
                                                         bool lower_order_final, bool heun, bool bh2,
                                                         bool use_corrector) {
  check_table_args(t_in, schedule_kind, solver, order);
  TORCH_CHECK(t_in.device().is_cpu(), "coefficient_table_cpu: timesteps must be on the CPU");
  const at::Tensor t = contiguous_aligned(t_in);
  const int n = static_cast<int>(t.numel() - 1);
  auto opts = t.options();
  at::Tensor table = at::empty({n, 2, kTableWidth}, opts);
  at::Tensor jac = at::empty({n, 2, kTableWidth, kWindow}, opts);
  const ScheduleParams sched{static_cast<int>(schedule_kind), p0, p1};
  const SolverParams sp{static_cast<int>(solver), static_cast<int>(order), lower_order_final, heun, bh2,
                        use_corrector};
  const double* tp = t.const_data_ptr<double>();
  double* tab = table.mutable_data_ptr<double>();
  double* jp = jac.mutable_data_ptr<double>();
  for (int i = 1; i <= n; ++i)
    step_coefficients(sched, sp, tp, i, n, tab + (i - 1) * 2 * kTableWidth, jp + (i - 1) * 2 * kTableWidth * kWindow);
  return {table, jac};
}

std::vector<double> schedule_lambda_cpu(int64_t schedule_kind, double p0, double p1, const std::vector<double>& t) {
  TORCH_CHECK(schedule_kind >= 0 && schedule_kind <= 3, "schedule_lambda: unknown schedule kind ", schedule_kind);
  const ScheduleParams sched{static_cast<int>(schedule_kind), p0, p1};
  std::vector<double> lam(t.size());
  for (size_t k = 0; k < t.size(); ++k) lam[k] = schedule_lambda(sched, t[k]);
  return lam;
}

at::Tensor coefficient_table_backward_cpu(const at::Tensor& jac_in, const at::Tensor& grad_in) {
  check_table_backward_args(jac_in, grad_in);
  TORCH_CHECK(jac_in.device().is_cpu(), "coefficient_table_backward (CPU kernel): jac must be on the CPU, got ",
              jac_in.device());
  const at::Tensor jac = contiguous_aligned(jac_in);
  const at::Tensor grad = contiguous_aligned(grad_in.to(at::kDouble));
  const int n = static_cast<int>(jac.size(0));
  at::Tensor grad_t = at::empty({n + 1}, jac.options());
  const double* jp = jac.const_data_ptr<double>();
  const double* gp = grad.const_data_ptr<double>();
  double* out = grad_t.mutable_data_ptr<double>();
  for (int k = 0; k <= n; ++k) out[k] = timestep_grad(jp, gp, k, n);
  return grad_t;
}

}  // namespace ld3
