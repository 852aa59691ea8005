"""The C++ autograd node of the fused coefficient table (python/table_autograd.cpp) against the Python Function
it replaced (fused._CoefficientTable, kept as its reference) and the plain-torch reference table: values and
gradients (bitwise against the Python Function: both run the same kernels), double backward through the
Python fallback the node calls under create_graph=True, and the saved-tensor rules of autograd."""
from __future__ import annotations

import pytest
import torch

from ld3_ext import _native

if not _native.native_available():  # only a missing build may skip this file
    pytest.skip(f"ld3_ext._C is not built: {_native.load_error()}", allow_module_level=True)

from ld3_ext import fused, ops  # noqa: E402
from ld3_ext import schedules as S  # noqa: E402
from ld3_ext.coefficients import MAX_ORDER, SOLVER_IDS, SolverSpec, coefficient_table_reference  # noqa: E402

C = _native.get()
NODE_NAME = "torch::autograd::CppNode<ld3::FusedCoefficientTable>"
# non-default parameters too: the create_graph fallback rebuilds the schedule from them
SCHEDULES = [S.EDM(), S.VPLinear(), S.VPLinear(beta_min=0.3, beta_max=12.0), S.VPCosine(), S.VPCosine(s=0.02),
             S.FlowMatching()]
IDS = ["edm", "vp_linear", "vp_linear_b", "vp_cosine", "vp_cosine_s", "flow"]


def _specs():
    for kind in SOLVER_IDS:
        for order in range(1, MAX_ORDER[kind] + 1):
            yield SolverSpec(kind, order)
    yield SolverSpec("dpmpp", 2, solver_type="heun", lower_order_final=False)
    yield SolverSpec("unipc", 3, variant="bh2", use_corrector=False)


def _grid(schedule, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    inner = torch.rand(n - 1, generator=g, dtype=torch.float64).sort(descending=True).values
    u = torch.cat([torch.ones(1, dtype=torch.float64), 0.05 + 0.9 * inner, torch.zeros(1, dtype=torch.float64)])
    return schedule.t_min + (schedule.t_max - schedule.t_min) * u


def _python_function(schedule, t, spec):
    return fused._CoefficientTable.apply(t, fused._table_args(schedule.native_spec(), spec), schedule, spec)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_node_matches_the_python_function_bitwise_and_the_reference(schedule):
    for k, spec in enumerate(_specs()):
        grid = _grid(schedule, seed=k)
        w = torch.randn(grid.numel() - 1, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        results = []
        for make in (fused.coefficient_table, _python_function, coefficient_table_reference):
            t = grid.clone().requires_grad_()
            table = make(schedule, t, spec)
            results.append((table, *torch.autograd.grad(table, t, w)))
        (tab, g), (tab_py, g_py), (tab_ref, g_ref) = results
        assert torch.equal(tab, tab_py) and torch.equal(g, g_py), spec
        torch.testing.assert_close(tab, tab_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_the_fused_table_records_the_cpp_node_only_when_it_must():
    schedule, spec = S.EDM(), SolverSpec("dpmpp", 3)
    t = _grid(schedule).requires_grad_()
    assert fused.coefficient_table(schedule, t, spec).grad_fn.name() == NODE_NAME
    assert ops.coefficient_table(schedule, t, spec, "fused").grad_fn.name() == NODE_NAME
    assert fused.coefficient_table(schedule, t.detach(), spec).grad_fn is None
    with torch.no_grad():
        assert fused.coefficient_table(schedule, t, spec).grad_fn is None


def test_gradcheck_and_gradgradcheck_through_the_node():
    for schedule, spec in [(S.VPLinear(), SolverSpec("unipc", 3, variant="bh2")), (S.EDM(), SolverSpec("dpmpp", 3)),
                           (S.FlowMatching(), SolverSpec("ipndm", 4)), (S.VPCosine(), SolverSpec("euler", 1))]:
        args = fused._table_args(schedule.native_spec(), spec)

        def f(t):
            table = C.coefficient_table_autograd(t, *args)
            assert table.grad_fn.name() == NODE_NAME
            return table

        t = _grid(schedule, n=5).requires_grad_()
        assert torch.autograd.gradcheck(f, (t,))
        assert torch.autograd.gradgradcheck(f, (t,))


# beta_max = 5000 on t <= 0.1: valid, though alpha underflows at VPLinear's default t_max = 1, which the
# create_graph fallback's rebuilt schedule used to get (its constructor then refused it)
STEEP = S.VPLinear(beta_min=0.1, beta_max=5000.0, t_max=0.1)


@pytest.mark.parametrize("schedule", SCHEDULES + [STEEP], ids=IDS + ["vp_linear_steep"])
def test_double_backward_matches_the_reference_hessian_vector_product(schedule):
    """create_graph=True: the node hands the VJP to the reference table of the schedule rebuilt from its
    native parameters; a Hessian-vector product w.r.t. the grid equals plain torch's on the user's schedule."""
    spec = SolverSpec("dpmpp", 3)
    grid = _grid(schedule, n=7, seed=4)
    v = torch.randn(grid.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def hvp(make):
        t = grid.clone().requires_grad_()
        table = make(schedule, t, spec)
        gt, = torch.autograd.grad(table.pow(2).sum(), t, create_graph=True)
        return torch.autograd.grad((gt * v).sum(), t)[0]

    torch.testing.assert_close(hvp(fused.coefficient_table), hvp(coefficient_table_reference), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_the_schedule_rebuilt_from_its_native_form_gives_the_same_reference_table(schedule):
    kind, (p0, p1) = schedule.native_spec()
    grid = _grid(schedule, n=8, seed=1)
    rebuilt = fused._native_schedule(kind, p0, p1, float(grid.min()), float(grid.max()))
    assert type(rebuilt) is type(schedule)
    for spec in (SolverSpec("dpmpp", 3), SolverSpec("unipc", 2)):
        assert torch.equal(coefficient_table_reference(rebuilt, grid, spec),
                           coefficient_table_reference(schedule, grid, spec))


def test_an_error_in_the_create_graph_fallback_reaches_the_caller_as_itself(monkeypatch):
    """The Python exception crosses the C++ node and the autograd engine with its type (it came out as a
    RuntimeError carrying only the text)."""
    class Boom(ValueError):
        pass

    def boom(*args):
        raise Boom("fallback failed on purpose")

    monkeypatch.setattr(fused, "_table_vjp_create_graph", boom)
    t = _grid(S.EDM()).requires_grad_()
    table = fused.coefficient_table(S.EDM(), t, SolverSpec("dpmpp", 2))
    with pytest.raises(Boom, match="fallback failed on purpose"):
        torch.autograd.grad(table.sum(), t, create_graph=True)
    # without create_graph the C++ J^T g serves, the fallback is not called
    table = fused.coefficient_table(S.EDM(), t, SolverSpec("dpmpp", 2))
    assert torch.autograd.grad(table.sum(), t)[0].shape == t.shape


def test_a_grid_modified_in_place_after_the_forward_is_refused():
    t = _grid(S.EDM()).requires_grad_()
    tt = t * 1.0
    table = fused.coefficient_table(S.EDM(), tt, SolverSpec("dpmpp", 2))
    with torch.no_grad():
        tt.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(table.sum(), t)


def test_saved_tensor_hooks_see_the_grid_and_the_jacobian():
    schedule, spec = S.VPLinear(), SolverSpec("unipc", 3)
    packed, unpacked = [], []

    def pack(x):
        packed.append(x)
        return x.clone()

    def unpack(x):
        unpacked.append(x)
        return x

    t = _grid(schedule).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        table = fused.coefficient_table(schedule, t, spec, validate=False)
    assert len(packed) == 2 and packed[0] is t and packed[1].shape == (*table.shape, 4)
    g = torch.autograd.grad(table.sum(), t)[0]
    assert len(unpacked) == 2
    t2 = _grid(schedule).requires_grad_()
    assert torch.equal(g, torch.autograd.grad(_python_function(schedule, t2, spec).sum(), t2)[0])


def test_retain_graph_and_a_second_backward():
    t = _grid(S.FlowMatching()).requires_grad_()
    table = fused.coefficient_table(S.FlowMatching(), t, SolverSpec("ipndm", 3))
    first = torch.autograd.grad(table.sum(), t, retain_graph=True)[0]
    assert torch.equal(first, torch.autograd.grad(table.sum(), t, retain_graph=True)[0])
    torch.autograd.grad(table.sum(), t)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(table.sum(), t)


def test_compiled_autograd_runs_the_node():
    import torch._dynamo.compiled_autograd as ca
    schedule, spec = S.VPCosine(), SolverSpec("dpmpp", 3)
    grads = []
    for compiled in (False, True):
        t = _grid(schedule).requires_grad_()
        table = fused.coefficient_table(schedule, t, spec)
        if compiled:
            with ca._enable(torch.compile(backend="eager")):
                (table * table).sum().backward()
        else:
            (table * table).sum().backward()
        grads.append(t.grad)
    assert torch.equal(*grads)


@pytest.mark.parametrize("make", [fused.coefficient_table, _python_function], ids=["cpp_node", "python_function"])
def test_batched_grads_and_a_vectorized_jacobian_go_through_the_reference_vjp(make):
    """is_grads_batched (and autograd.functional.jacobian(vectorize=True), built on it) hands the node a batched
    grad with no storage: the kernel failed on it ("Cannot access data pointer"); the reference VJP serves."""
    schedule, spec = S.VPCosine(s=0.02), SolverSpec("unipc", 3, variant="bh2")
    grid = _grid(schedule, n=6, seed=3)
    v = torch.randn(3, grid.numel() - 1, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t, t_ref = grid.clone().requires_grad_(), grid.clone().requires_grad_()
    got, = torch.autograd.grad(make(schedule, t, spec), t, v, is_grads_batched=True)
    want, = torch.autograd.grad(coefficient_table_reference(schedule, t_ref, spec), t_ref, v, is_grads_batched=True)
    assert got.shape == (3, grid.numel()) and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda tt: make(schedule, tt, spec), grid, vectorize=True)
    jac_ref = torch.autograd.functional.jacobian(lambda tt: coefficient_table_reference(schedule, tt, spec), grid)
    torch.testing.assert_close(jac, jac_ref, rtol=1e-10, atol=1e-10)
