"""The fused solvers evaluate the network exactly once a step, also when the whole-sampler node declines.

The node (ld3_ext/adjoint.py) can only take a solve whose network depends on nothing else requiring grad.
The solvers evaluate step 0 themselves, on x_T and the network times as given, and the node checks that
evaluation before it runs anything: a decline hands it to the per-step loop, so no evaluation is repeated,
a callback never sees a step twice, and a network that draws random numbers (dropout) draws them as on the
reference backend.  When the node is taken, step 0's gradient goes through that evaluation's own graph.
"""
from __future__ import annotations

import pytest
import torch

import ld3_ext
from ld3_ext import _native, adjoint
from conftest import random_decreasing_grid

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not _native.native_available(), reason="needs the native extension")]

SOLVERS = {
    "dpmpp3": lambda b, **kw: ld3_ext.DPMSolverPP(order=3, backend=b, **kw),
    "unipc3": lambda b, **kw: ld3_ext.UniPC(order=3, variant="bh2", backend=b, **kw),
    "unipc2_no_corrector": lambda b, **kw: ld3_ext.UniPC(order=2, use_corrector=False, backend=b, **kw),
    "ipndm4": lambda b, **kw: ld3_ext.IPNDM(order=4, backend=b, **kw),
    "euler": lambda b, **kw: ld3_ext.Euler(backend=b, **kw),
    "heun": lambda b, **kw: ld3_ext.Heun(backend=b, **kw),
}


class Counted(torch.nn.Module):
    """A small network that counts its calls and the step indices it was called for."""

    def __init__(self, trainable: bool, dropout: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(6, 6).double()
        with torch.no_grad():
            self.lin.weight.copy_(0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64))
            self.lin.bias.copy_(0.1 * torch.randn(6, generator=g, dtype=torch.float64))
        self.lin.requires_grad_(trainable)
        self.drop = torch.nn.Dropout(dropout)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.drop(torch.tanh(self.lin(x))) * (1 + 0.01 * t.reshape(-1, 1))


def _sample(solver_name, backend, net, x, t, **kw):
    model = ld3_ext.wrap_model(net, ld3_ext.EDM(), prediction="x0")
    return SOLVERS[solver_name](backend, **kw).sample(model, x, t)


def _inputs(n=6, seed=1):
    t = random_decreasing_grid(80.0, 0.002, n, seed=seed)
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 80.0
    return x, t


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("solver_name", list(SOLVERS))
def test_trainable_network_is_called_once_a_step_and_gradients_match(solver_name, checkpoint):
    x0, t0 = _inputs()
    steps = t0.numel() - 1
    want_calls = 2 * steps if solver_name == "heun" else steps
    grads, outs = {}, {}
    for backend in ("fused", "reference"):
        net = Counted(trainable=True)
        x, t = x0.clone().requires_grad_(), t0.clone().requires_grad_()
        y = _sample(solver_name, backend, net, x, t, checkpoint_model=checkpoint)
        assert net.calls == want_calls, (backend, net.calls)
        assert type(y.grad_fn).__name__ != "_WholeSamplerBackward"  # the weights need their gradient
        outs[backend] = y.detach()
        grads[backend] = torch.autograd.grad(y.square().sum(), [x, t, net.lin.weight, net.lin.bias])
    torch.testing.assert_close(outs["fused"], outs["reference"], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("solver_name", list(SOLVERS))
def test_whole_sampler_takes_the_first_evaluation_made_on_non_leaf_inputs(solver_name, checkpoint):
    """x_T and the times computed from parameters (as in LD3 training): the node is still taken, step 0's
    gradient reaches the parameters through the first evaluation's graph, and every gradient matches."""
    x0, t0 = _inputs(seed=2)
    steps = t0.numel() - 1
    grads = {}
    for backend in ("fused", "reference"):
        net = Counted(trainable=False)
        scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        shift = torch.zeros(t0.numel(), dtype=torch.float64, requires_grad=True)
        x = scale * x0               # a non-leaf x_T
        t = t0 * torch.exp(shift)    # non-leaf times
        y = _sample(solver_name, backend, net, x, t, checkpoint_model=checkpoint)
        if backend == "fused":
            assert type(y.grad_fn).__name__ == "_WholeSamplerBackward"
        # the forward: one call a step; with checkpointing the backward re-evaluates each step once more
        assert net.calls == (2 if solver_name == "heun" else 1) * steps
        grads[backend] = torch.autograd.grad(y.square().sum(), [scale, shift])
    for a, b in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_dropout_draws_the_same_random_numbers_as_the_reference():
    x0, t0 = _inputs(seed=3)
    outs = {}
    for backend in ("fused", "reference"):
        net = Counted(trainable=True, dropout=0.3).train()
        torch.manual_seed(123)
        outs[backend] = _sample("dpmpp3", backend, net, x0.clone().requires_grad_(), t0).detach()
    torch.testing.assert_close(outs["fused"], outs["reference"], rtol=1e-12, atol=1e-12)


def test_a_callback_sees_each_step_once_when_a_condition_requires_grad():
    cond = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def denoiser(x, sigma, c=None):
        return torch.tanh(x + c) * sigma.reshape(-1, 1) / (1 + sigma.reshape(-1, 1))

    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    seen = {}
    for backend in ("fused", "reference"):
        steps = []
        x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
        ld3_ext.sample(denoiser, x, sigmas, solver="dpmpp_3m", extra_args={"c": cond}, backend=backend,
                       callback=lambda info: steps.append(info["i"]))
        seen[backend] = steps
    assert seen["fused"] == seen["reference"] == list(range(len(seen["reference"])))


def test_a_dependency_from_a_later_step_declines_there_with_the_same_results():
    """Documented limit: a network that starts reading a tensor requiring grad only at step k makes the node
    decline at k, and the per-step loop redoes steps 1..k-1 (step 0 is not repeated); results are exact."""
    x0, t0 = _inputs(seed=5)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    res = {}
    for backend in ("fused", "reference"):
        calls = []

        def net(x, t):
            calls.append(float(t.reshape(-1)[0]))
            late = bool(t.reshape(-1)[0] <= t0[2])
            return torch.tanh(x) * (w if late else w.detach())  # w reaches the graph from step 2 on

        x = x0.clone().requires_grad_()
        y = _sample("dpmpp3", backend, net, x, t0)
        res[backend] = (y.detach(), torch.autograd.grad(y.sum(), [x, w]), len(calls))
    steps = t0.numel() - 1
    assert res["reference"][2] == steps
    # the fused forward: steps 0, 1, 2 in the node (declining at 2), then steps 1.. again on the per-step path
    assert res["fused"][2] == steps + 2
    torch.testing.assert_close(res["fused"][0], res["reference"][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(res["fused"][1], res["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _graph_cases():
    """(out, ours, expected) where ours holds non-leaf tensors: the walk stops at their gradient edges."""
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(4, dtype=torch.float64)
    x = a * noise                                   # non-leaf x_T built from a parameter
    t = torch.stack([b, b / 2])                     # non-leaf times
    z = torch.randn(8, dtype=torch.float64, requires_grad=True)
    xa, ya = z.chunk(2)                             # two outputs of one node: only xa is ours
    c = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda v: v, lambda v: v):
        cc = c * c
    alias = cc.grad_fn._saved_self                  # unpacked: not c, but c's accumulator
    assert alias is not c and alias.grad_fn is None and alias.requires_grad
    return [
        (torch.tanh(x) * t[0], (x, t), False),      # x's own parameter is not a foreign dependency
        (x, (x, t), False),                         # the output is one of ours itself
        (torch.tanh(x) * a, (x, t), True),          # ... but the same parameter read directly is
        (torch.tanh(xa), (xa, t), False),
        (torch.tanh(xa) + ya, (xa, t), True),       # another output of the node that made xa
        (xa * t[1], (xa, t), False),
        (x * 0 + z.sum(), (x, t), True),
        # a leaf unpacked through saved-tensor hooks: another object sharing the original's accumulator (kept
        # alive by cc's graph, as a checkpointed forward's graph keeps it) is ours
        (torch.sin(alias) * 2 + 0 * cc, (alias, t), False),
        (torch.sin(alias) + c + 0 * cc, (alias, t), False),
        (torch.sin(alias) * a + 0 * cc, (alias, t), True),
    ]


def test_graph_walk_stops_at_non_leaf_inputs_native_and_python_agree():
    for k, (out, ours, want) in enumerate(_graph_cases()):
        assert adjoint._depends_on_other_leaves_reference(out, ours) == want, k
        assert _native._C.depends_on_other_leaves(out, list(ours)) == want, k


def test_whole_sampler_checks_first():
    x, t = _inputs()
    table = ld3_ext.ops.coefficient_table(ld3_ext.EDM(), t, ld3_ext.DPMSolverPP(order=2).spec())
    xr = x.clone().requires_grad_()
    for bad in (torch.zeros(2, 6, dtype=torch.float64), torch.zeros(3, 6), "x0"):
        with pytest.raises(ValueError, match="first must be step 0's output"):
            adjoint.whole_sampler(lambda xx, tt, i: xx, [1] * (t.numel() - 1), 2, False, xr, table, t, first=bad)


# ---- step 0's gradient goes back through the caller's own graph of that evaluation ---------------------------
def _grads_both(solver_name, make_inputs, net_of, checkpoint=False, create_graph=False):
    """(fused output, reference output, fused grads, reference grads) w.r.t. the leaves make_inputs returns."""
    res = {}
    for backend in ("fused", "reference"):
        leaves, x, t = make_inputs()
        model = ld3_ext.wrap_model(net_of(x, t), ld3_ext.EDM(), prediction="x0")
        y = SOLVERS[solver_name](backend, checkpoint_model=checkpoint).sample(model, x, t)
        if backend == "fused":
            assert type(y.grad_fn).__name__ == "_WholeSamplerBackward"
        gs = torch.autograd.grad(y.square().sum(), leaves, create_graph=create_graph)
        if create_graph:  # a Hessian-vector product through the node's double backward
            gs = torch.autograd.grad(sum((g * torch.ones_like(g)).sum() for g in gs), leaves)
        res[backend] = (y.detach(), gs)
    return res


def _assert_same(res, tol=1e-10):
    torch.testing.assert_close(res["fused"][0], res["reference"][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(res["fused"][1], res["reference"][1]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _pure(x, t):
    return lambda xx, tt: torch.tanh(xx) * (1 + 0.01 * tt.reshape(-1, 1))


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("how", ["product", "sum"])
@pytest.mark.parametrize("solver_name", list(SOLVERS))
def test_x_T_made_from_the_times(solver_name, how, checkpoint):
    """x_T computed from the timesteps: step 0's VJP taken inside the node went on into the caller's graph
    (a crash, "backward through the graph a second time") or counted t's path through x_T twice."""
    x0, t0 = _inputs(seed=7)

    def make():
        t = t0.clone().requires_grad_()
        x = x0 / 80.0 * t[0] if how == "product" else x0 + 0.1 * t[0]
        return [t], x, t

    _assert_same(_grads_both(solver_name, make, _pure, checkpoint))


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("reads", ["t", "x_T"])
def test_a_one_step_network_reading_the_inputs_directly(reads, checkpoint):
    """One step (no later evaluation to decline at) whose network also reads t or x_T itself (a closure): the
    node is taken, and that path of step 0's gradient was dropped."""
    x0, t0 = _inputs(n=1, seed=8)

    def make():
        t, x = t0.clone().requires_grad_(), x0.clone().requires_grad_()
        return [x, t], x, t

    def net_of(x, t):
        if reads == "t":
            return lambda xx, tt: torch.tanh(xx) * (1 + 0.01 * t[-1])
        return lambda xx, tt: torch.tanh(xx) + 0.01 * x

    _assert_same(_grads_both("euler", make, net_of, checkpoint))


@pytest.mark.parametrize("solver_name", ["dpmpp3", "unipc3", "heun"])
def test_double_backward_with_x_T_made_from_the_times(solver_name):
    x0, t0 = _inputs(seed=9)

    def make():
        t = t0.clone().requires_grad_()
        return [t], x0 / 80.0 * t[0], t

    _assert_same(_grads_both(solver_name, make, _pure, create_graph=True), tol=1e-9)
