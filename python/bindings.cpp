// pybind11 module ld3_ext._C: the Python names of the fused kernels (device dispatch: device_dispatch.cpp).
// The only TU that includes torch/extension.h (slow to compile); kernels live in csrc/.
#include <torch/extension.h>

#include "autograd_graph.h"
#include "cpu/cpu_isa.h"
#include "device_dispatch.h"
#include "ld3_ops.h"
#include "table_autograd.h"
#include "update_autograd.h"

namespace {

bool is_cuda(const at::Tensor& t) { return t.defined() && t.device().is_cuda(); }

using ld3::bump_version;
using ld3::check_written;
using ld3::no_cuda;

at::Tensor multistep_update(const at::Tensor& x, const at::Tensor& coef, const std::vector<at::Tensor>& history,
                            const std::optional<at::Tensor>& out) {
  return ld3::update_forward(x, coef, history, out.has_value() ? *out : at::Tensor());
}

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

std::optional<at::Tensor> multistep_adjoint(const at::Tensor& lam_prev, const std::optional<at::Tensor>& v,
                                            const std::optional<at::Tensor>& scale,
                                            const std::vector<at::Tensor>& older, const std::optional<at::Tensor>& x,
                                            const std::optional<at::Tensor>& m, const at::Tensor& w,
                                            const std::optional<at::Tensor>& dots) {
  at::Tensor gm;
  check_written(opt(v), "multistep_adjoint: v");
  check_written(opt(dots), "multistep_adjoint: dots");
  if (is_cuda(lam_prev)) {
#ifdef LD3_WITH_CUDA_KERNELS
    gm = ld3::multistep_adjoint_cuda(lam_prev, opt(v), opt(scale), older, opt(x), opt(m), w, opt(dots));
#else
    no_cuda("multistep_adjoint");
#endif
  } else {
    gm = ld3::multistep_adjoint_cpu(lam_prev, opt(v), opt(scale), older, opt(x), opt(m), w, opt(dots));
  }
  bump_version(opt(v));
  bump_version(opt(dots));
  if (!gm.defined()) return std::nullopt;
  return gm;
}

ld3::TableArgs table_args(int64_t schedule_kind, double p0, double p1, int64_t solver, int64_t order,
                          bool lower_order_final, bool heun, bool bh2, bool use_corrector) {
  return ld3::TableArgs{schedule_kind, p0, p1, solver, order, lower_order_final, heun, bh2, use_corrector};
}

std::tuple<at::Tensor, at::Tensor> coefficient_table(const at::Tensor& t, int64_t schedule_kind, double p0,
                                                     double p1, int64_t solver, int64_t order,
                                                     bool lower_order_final, bool heun, bool bh2,
                                                     bool use_corrector) {
  return ld3::table_forward(
      t, table_args(schedule_kind, p0, p1, solver, order, lower_order_final, heun, bh2, use_corrector));
}

at::Tensor coefficient_table_autograd(const at::Tensor& t, int64_t schedule_kind, double p0, double p1,
                                      int64_t solver, int64_t order, bool lower_order_final, bool heun, bool bh2,
                                      bool use_corrector) {
  return ld3::coefficient_table_autograd(
      t, table_args(schedule_kind, p0, p1, solver, order, lower_order_final, heun, bh2, use_corrector));
}

// The table node's create_graph=True backward: the Python reference's VJP (ld3_ext.fused), looked up on
// each call so that no Python object outlives the interpreter in a C++ static.
at::Tensor table_vjp_create_graph(const at::Tensor& t, const at::Tensor& grad_table, const ld3::TableArgs& a) {
  namespace py = pybind11;
  py::gil_scoped_acquire gil;
  try {
    py::object fn = py::module_::import("ld3_ext.fused").attr("_table_vjp_create_graph");
    return fn(t, grad_table, a.schedule_kind, a.p0, a.p1, a.solver, a.order, a.lower_order_final, a.heun, a.bh2,
              a.use_corrector)
        .cast<at::Tensor>();
  } catch (py::error_already_set& e) {
    // torch's carrier of a Python exception through the autograd engine: the caller gets the original
    // exception (its type too), as from a Python Function's backward
    e.restore();
    throw python_error();
  }
}

bool has_cuda() {
#ifdef LD3_WITH_CUDA_KERNELS
  return true;
#else
  return false;
#endif
}

// The CUDA architectures the kernels were compiled for, in CMake's syntax, comma-separated ("75-real,90");
// empty without CUDA kernels.
std::string cuda_archs() {
#ifdef LD3_CUDA_ARCHS_BUILT
  return LD3_CUDA_ARCHS_BUILT;
#else
  return "";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "ld3_ext native kernels: fused multistep update and solver coefficient tables";
  // The kernels read only tensors: the GIL is released while they run (as torch's own ops do), so other Python
  // threads go on and kernels of several threads run at once (they held it: a serving thread's 1 ms sleep took up
  // to 98 ms; concurrency audit).  Errors and the create_graph table VJP take it back themselves.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("multistep_update", &multistep_update, nogil, py::arg("x"), py::arg("coef"), py::arg("history"),
        py::arg("out") = py::none(),
        "x_next = coef[0]*x + sum_k coef[1+k]*history[k] (coef float64 on x's device); out may alias x");
  m.def("multistep_update_autograd", &ld3::multistep_update_autograd, nogil, py::arg("x"), py::arg("coef"),
        py::arg("history"),
        "multistep_update recorded as one C++ autograd node (its backward: multistep_update_backward)");
  m.def("multistep_update_backward", &ld3::update_backward, nogil, py::arg("grad"), py::arg("x"), py::arg("coef"),
        py::arg("history"), py::arg("need_x") = true, py::arg("need_coef") = true, py::arg("need_history") = true,
        "(grad_x, grad_coef, grad_history) in one pass; None where not requested");
  m.def("multistep_adjoint", &multistep_adjoint, nogil, py::arg("lam_prev"), py::arg("v"), py::arg("scale"),
        py::arg("older"), py::arg("x"), py::arg("m"), py::arg("w"), py::arg("dots"),
        "one reverse step of the whole-sampler adjoint: returns gm = sum_j w_j L_j (None when w is empty); "
        "writes L_0 = scale*lam_prev + v into v and [<L_0,x>, <L_j,m>...] into dots when given");
  m.def("coefficient_table", &coefficient_table, nogil, py::arg("timesteps"), py::arg("schedule_kind"), py::arg("p0"),
        py::arg("p1"), py::arg("solver"), py::arg("order"), py::arg("lower_order_final"), py::arg("heun"),
        py::arg("bh2"), py::arg("use_corrector"),
        "([N,2,5] table, [N,2,5,4] d table / d t_{i-3..i}) in float64");
  m.def("coefficient_table_autograd", &coefficient_table_autograd, nogil, py::arg("timesteps"), py::arg("schedule_kind"),
        py::arg("p0"), py::arg("p1"), py::arg("solver"), py::arg("order"), py::arg("lower_order_final"),
        py::arg("heun"), py::arg("bh2"), py::arg("use_corrector"),
        "the [N,2,5] table recorded as one C++ autograd node (backward: coefficient_table_backward)");
  ld3::set_table_create_graph_vjp(&table_vjp_create_graph);
  m.def("schedule_lambda", &ld3::schedule_lambda_cpu, nogil, py::arg("schedule_kind"), py::arg("p0"), py::arg("p1"),
        py::arg("t"), "lambda(t) = log alpha - log sigma at each of the host times t, as the table computes it");
  m.def("coefficient_table_backward", &ld3::table_backward, nogil, py::arg("jac"), py::arg("grad_table"),
        "grad_t = J^T grad_table scattered to t_0..t_N (gather, fixed order)");
  m.def("set_stream_min_bytes", &ld3::set_stream_min_bytes, py::arg("bytes"),
        "float32 CPU update outputs of at least `bytes` use non-temporal stores (-1: never; default: the "
        "L2 size, at least 8 MiB); returns the previous value");
  m.def("cpu_isa", [] { return std::string(ld3::cpu_isa_name(ld3::cpu_isa())); },
        "instruction set the CPU loops run with now: 'base' (the build target's baseline) or 'avx2'");
  m.def("available_cpu_isas", &ld3::available_cpu_isas, "instruction sets this build and CPU can run");
  m.def("set_cpu_isa", &ld3::set_cpu_isa, py::arg("isa"),
        "select the CPU loops' instruction set: 'base', 'avx2' or 'auto' (LD3_CPU_ISA does it at load); "
        "returns the previous one");
  m.def("depends_on_other_leaves", &ld3::depends_on_other_leaves, py::arg("out"), py::arg("ours"),
        "True when out's autograd graph reaches a tensor requiring grad other than those in ours");
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels are linked in");
  m.def("cuda_archs", &cuda_archs,
        "CUDA architectures the kernels were compiled for (CMake syntax, comma-separated; empty without CUDA)");
  m.attr("reduce_chunk") = ld3::kReduceChunk;
#ifdef _OPENMP
  m.attr("openmp") = true;  // at::parallel_for in our loops uses the torch.set_num_threads threads
#else
  m.attr("openmp") = false;  // built without OpenMP (CMakeLists.txt): the CPU loops run on one thread
#endif
}
