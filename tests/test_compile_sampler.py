"""A whole sampler built on the fused ops traces with torch.compile(fullgraph=True)."""
import pytest
import torch

import ld3_ext
from ld3_ext import discretizations as D

pytestmark = pytest.mark.skipif(not ld3_ext.native_available(), reason="needs the native extension")


@pytest.mark.parametrize("solver", [ld3_ext.DPMSolverPP(order=3, backend="fused"),
                                    ld3_ext.UniPC(order=3, variant="bh2", backend="fused"),
                                    ld3_ext.DPMSolverPP(order=3, backend="fused", checkpoint_model=True)],
                         ids=["dpmpp3m", "unipc3", "dpmpp3m-checkpointed"])
def test_fullgraph_compile_matches_eager_with_gradients(solver):
    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(lambda x, t: x / (1.0 + t.reshape(-1, 1, 1, 1) ** 2), s, prediction="x0")
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t_eager = D.logsnr_uniform(s, 5).requires_grad_(True)
    t_comp = t_eager.detach().clone().requires_grad_(True)
    ref = solver.sample(model, x, t_eager)
    ref.square().sum().backward()
    fn = torch.compile(lambda x, t: solver.sample(model, x, t), fullgraph=True, backend="aot_eager")
    out = fn(x, t_comp)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t_comp.grad, t_eager.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", [ld3_ext.DPMSolverPP(order=3, backend="fused"),
                                    ld3_ext.UniPC(order=3, backend="fused")], ids=["dpmpp3m", "unipc3"])
def test_fullgraph_compile_of_a_vmapped_sampler(solver):
    """Inside a traced torch.func.vmap the custom ops (no batching rule) give way to the reference's ops."""
    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(lambda x, t: x / (1.0 + t.reshape(-1, 1) ** 2), s, prediction="x0")
    xs = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = D.logsnr_uniform(s, 5)
    grids = torch.stack([t, 0.9 * t + 0.1 * t[-1]])  # both in the schedule's range
    by_x = torch.compile(torch.func.vmap(lambda x: solver.sample(model, x, t)), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(by_x(xs), torch.stack([solver.sample(model, x, t) for x in xs]), rtol=1e-12, atol=1e-12)
    by_t = torch.compile(torch.func.vmap(lambda g: solver.sample(model, xs[0], g)), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(by_t(grids), torch.stack([solver.sample(model, xs[0], g) for g in grids]),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_compile_of_torch_func_transforms_with_checkpoint_model(backend):
    """Inside a traced torch.func transform the network evaluations are not checkpointed (as in eager: grad
    disables the saved-tensor hooks checkpointing needs); the results are the uncompiled transform's."""
    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(lambda x, t: x / (1.0 + t.reshape(-1, 1) ** 2), s, prediction="x0")
    solver = ld3_ext.DPMSolverPP(order=3, backend=backend, checkpoint_model=True)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = D.logsnr_uniform(s, 5)
    for transform, arg in ((torch.func.grad(lambda x: solver.sample(model, x, t).square().sum()), x),
                           (torch.func.vmap(lambda x: solver.sample(model, x, t)), x[:, None])):
        want = transform(arg)
        torch._dynamo.reset()  # a fresh trace for each transform
        got = torch.compile(transform, backend="aot_eager")(arg)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", [ld3_ext.DPMSolverPP(order=3, backend="fused"), ld3_ext.Heun(backend="fused")],
                         ids=["dpmpp3m", "heun"])
def test_fullgraph_dynamic_compile_with_outputs_in_another_layout(solver):
    """A channels_last state with contiguous network outputs traces with dynamic shapes (symbolic strides: the
    layout conversion of ld3_ext/layout.py stays out of traced code) and matches eager."""
    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(lambda x, t: (torch.tanh(0.02 * x) * (1.0 + 0.01 * t.reshape(-1, 1, 1, 1))).contiguous(),
                               s, prediction="x0")
    t = D.logsnr_uniform(s, 5)
    x = (80 * torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).contiguous(
        memory_format=torch.channels_last)
    fn = torch.compile(lambda xx: solver.sample(model, xx, t), fullgraph=True, dynamic=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), solver.sample(model, x, t), rtol=1e-12, atol=1e-12)


def test_the_traced_graph_holds_the_fused_ops():
    """fullgraph=True could also pass on a trace of the per-step torch ops (a fallback to the reference path would
    trace just as well): the graph Dynamo hands to the backend must call the registered ld3_ext ops."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(lambda x, t: x / (1.0 + t.reshape(-1, 1, 1, 1) ** 2), s, prediction="x0")
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = D.logsnr_uniform(s, 5)
    solver = ld3_ext.DPMSolverPP(order=3, backend="fused")
    torch._dynamo.reset()
    out = torch.compile(lambda x, t: solver.sample(model, x, t), fullgraph=True, backend=recording_backend)(x, t)
    torch.testing.assert_close(out, solver.sample(model, x, t), rtol=1e-12, atol=1e-12)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert len(graphs) == 1
    assert sum("ld3_ext.multistep_update" in tg for tg in targets) >= 4, targets  # one update per step
    assert any("ld3_ext.coefficient_table" in tg for tg in targets), targets


@pytest.mark.parametrize("solver", [ld3_ext.DPMSolverPP(order=3, backend="fused"),
                                    ld3_ext.IPNDM(order=3, backend="reference")], ids=["dpmpp3m-fused", "ipndm3-ref"])
def test_forward_mode_ad_under_compile_carries_the_tangent(solver):
    """Under a compiled graph the custom ops ran on dual tensors (composite_only ignored the forward-AD level while
    compiling): the fused sampler's tangent was dropped, and the reference iPNDM's wrong (its x0 <-> eps conversion
    takes the fused update), with no error.  Oracle: torch.func.jvp, eager."""
    import torch.autograd.forward_ad as fwAD
    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(lambda x, t: torch.tanh(0.3 * x) / (1 + 0.05 * t.reshape(-1, 1, 1) ** 2), s,
                               prediction="x0")
    t = D.logsnr_uniform(s, 5)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torch.func.jvp(lambda xx: solver.sample(model, xx, t), (x,), (v,))[1]
    fn = torch.compile(lambda xx, tt: solver.sample(model, xx, tt), fullgraph=True, backend="aot_eager")
    with fwAD.dual_level():
        got = fwAD.unpack_dual(fn(fwAD.make_dual(x, v), t)).tangent
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_table_ops_jacobian_output_is_not_differentiable():
    """The op's second output (the Jacobian its backward reads) said requires_grad=True and took a zero gradient
    (finite differences: up to 113); it is marked non-differentiable, and the table itself still differentiates."""
    from ld3_ext.coefficients import SOLVER_IDS
    import ld3_ext.fused  # noqa: F401  (registers the ops)
    args = (0, 0.0, 0.0, SOLVER_IDS["dpmpp"], 3, True, False, False, True)  # EDM, DPM-Solver++(3M)
    t = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.2, 0.002], dtype=torch.float64, requires_grad=True)
    table, jac = torch.ops.ld3_ext.coefficient_table(t, *args)
    assert table.requires_grad and not jac.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(jac.sum(), t)
    torch.autograd.gradcheck(lambda tt: torch.ops.ld3_ext.coefficient_table(tt, *args)[0], (t,))
