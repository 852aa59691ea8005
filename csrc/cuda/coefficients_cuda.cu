// Coefficient table + Jacobian on the device: one thread per solver step, same header as the CPU,
// so a sampler on the GPU never copies its timesteps to the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dense_layout.h"
#include "ld3_ops.h"
#include "solver_coefficients.h"

namespace ld3 {
namespace {

__global__ void coefficient_table_kernel(ScheduleParams sched, SolverParams sp, const double* __restrict__ t, int n,
                                         double* __restrict__ table, double* __restrict__ jac) {
  const int i = 1 + blockIdx.x * blockDim.x + threadIdx.x;
  if (i > n) return;
  step_coefficients(sched, sp, t, i, n, table + (i - 1) * 2 * kTableWidth, jac + (i - 1) * 2 * kTableWidth * kWindow);
}

__global__ void timestep_grad_kernel(const double* __restrict__ jac, const double* __restrict__ grad, int n,
                                     double* __restrict__ grad_t) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k <= n) grad_t[k] = timestep_grad(jac, grad, k, n);
}

}  // namespace

at::Tensor coefficient_table_backward_cuda(const at::Tensor& jac_in, const at::Tensor& grad_in) {
  check_table_backward_args(jac_in, grad_in);
  const c10::cuda::CUDAGuard guard(jac_in.device());
  const at::Tensor jac = contiguous_aligned(jac_in);
  const at::Tensor grad = contiguous_aligned(grad_in.to(at::kDouble));
  const int n = static_cast<int>(jac.size(0));
  at::Tensor grad_t = at::empty({n + 1}, jac.options());
  constexpr int kThreads = 64;
  timestep_grad_kernel<<<(n + kThreads) / kThreads, kThreads, 0, c10::cuda::getCurrentCUDAStream(jac.device().index())>>>(
      jac.const_data_ptr<double>(), grad.const_data_ptr<double>(), n, grad_t.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_t;
}

std::tuple<at::Tensor, at::Tensor> coefficient_table_cuda(const at::Tensor& t_in, int64_t schedule_kind, double p0,
                                                          double p1, int64_t solver, int64_t order,
                                                          bool lower_order_final, bool heun, bool bh2,
                                                          bool use_corrector) {
  check_table_args(t_in, schedule_kind, solver, order);
  TORCH_CHECK(t_in.device().is_cuda(), "coefficient_table_cuda: timesteps must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(t_in.device());
  const at::Tensor t = contiguous_aligned(t_in);
  const int n = static_cast<int>(t.numel() - 1);
  at::Tensor table = at::empty({n, 2, kTableWidth}, t.options());
  at::Tensor jac = at::empty({n, 2, kTableWidth, kWindow}, t.options());
  const ScheduleParams sched{static_cast<int>(schedule_kind), p0, p1};
  const SolverParams sp{static_cast<int>(solver), static_cast<int>(order), lower_order_final, heun, bh2,
                        use_corrector};
  constexpr int kThreads = 64;
  const int grid = (n + kThreads - 1) / kThreads;
  coefficient_table_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream(t.device().index())>>>(
      sched, sp, t.const_data_ptr<double>(), n, table.mutable_data_ptr<double>(), jac.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {table, jac};
}

}  // namespace ld3
