"""The whole-sampler node replays the forward's random numbers when its backward evaluates the network again.

A network in train mode with dropout (weights frozen, so the node is taken) draws random numbers.  The node's
backward evaluates it again under checkpointing, on a second backward and under create_graph; without the
generator states of the forward it differentiated another function (x_T gradient 2.3e-2 off, Heun's changing
by 130 % between two backwards).  torch.utils.checkpoint, which the reference backend uses, replays them too.
"""
from __future__ import annotations

import pytest
import torch

import ld3_ext
from ld3_ext import _native
from conftest import random_decreasing_grid
from test_whole_sampler_first_evaluation import Counted

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not _native.native_available(), reason="needs the native extension")]

SOLVERS = {
    "dpmpp3": lambda b, **kw: ld3_ext.DPMSolverPP(order=3, backend=b, **kw),
    "unipc3": lambda b, **kw: ld3_ext.UniPC(order=3, backend=b, **kw),
    "ipndm3": lambda b, **kw: ld3_ext.IPNDM(order=3, backend=b, **kw),
    "euler": lambda b, **kw: ld3_ext.Euler(backend=b, **kw),
    "heun": lambda b, **kw: ld3_ext.Heun(backend=b, **kw),
}


def DropoutNet():
    """A frozen network with dropout: the fused node is taken, and its forward draws random numbers."""
    return Counted(trainable=False, dropout=0.3)


def _grads(solver_name, backend, checkpoint=False, backwards=1, create_graph=False, seed=7):
    net = DropoutNet().train()
    model = ld3_ext.wrap_model(net, ld3_ext.EDM(), prediction="x0")
    t = random_decreasing_grid(80.0, 0.002, 4, seed=3).requires_grad_()
    x = (torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80.0).requires_grad_()
    w = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(seed)
    y = SOLVERS[solver_name](backend, checkpoint_model=checkpoint).sample(model, x, t)
    after = torch.rand(1)  # the stream the caller sees after sampling: a backward must not move it
    torch.manual_seed(seed + 1)
    runs = [torch.autograd.grad((y * w).sum(), [x, t], retain_graph=k + 1 < backwards, create_graph=create_graph)
            for k in range(backwards)]
    return y.detach(), runs, after


@pytest.mark.parametrize("solver_name", sorted(SOLVERS))
def test_checkpointed_backward_differentiates_the_forward(solver_name):
    y_ref, (g_ref,), after_ref = _grads(solver_name, "reference")
    y, (g,), after = _grads(solver_name, "fused", checkpoint=True)
    assert torch.equal(after, after_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver_name", ["dpmpp3", "heun"])
def test_a_second_backward_gives_the_first_gradients(solver_name):
    _, (g_ref,), _ = _grads(solver_name, "reference")
    _, runs, _ = _grads(solver_name, "fused", backwards=2)
    for g in runs:
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_create_graph_backward_replays_them_too():
    _, (g_ref,), _ = _grads("dpmpp3", "reference")
    _, (g,), _ = _grads("dpmpp3", "fused", create_graph=True)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-10)


def test_backward_leaves_the_callers_generator_alone():
    """Replays run on a forked generator: after the backward the global stream is where the caller left it."""
    _, _, _ = _grads("dpmpp3", "fused", checkpoint=True, seed=11)
    nxt = torch.rand(3)
    torch.manual_seed(12)  # _grads seeds seed + 1 before its backward, which draws nothing itself
    torch.testing.assert_close(nxt, torch.rand(3), rtol=0, atol=0)


def test_a_later_decline_redoes_the_steps_with_the_same_random_numbers():
    """A dependency that first shows at step 2 declines there; the per-step loop redoes steps 1.. from the
    generator state before step 1, so the sample is the reference backend's, dropout masks included."""
    t0 = random_decreasing_grid(80.0, 0.002, 5, seed=5)
    x0 = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 80.0
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    res = {}
    for backend in ("fused", "reference"):
        net = DropoutNet().train()

        def fn(x, t):
            late = bool(t.reshape(-1)[0] <= t0[2])
            return net(x, t) * (scale if late else scale.detach())

        model = ld3_ext.wrap_model(fn, ld3_ext.EDM(), prediction="x0")
        torch.manual_seed(21)
        x = x0.clone().requires_grad_()
        y = ld3_ext.DPMSolverPP(order=3, backend=backend).sample(model, x, t0)
        res[backend] = (y.detach(), torch.rand(2))
    torch.testing.assert_close(res["fused"][0], res["reference"][0], rtol=1e-12, atol=1e-12)
    assert torch.equal(res["fused"][1], res["reference"][1])


@pytest.mark.parametrize("dropout", [False, True])
def test_only_a_network_that_drew_has_its_generator_replayed(dropout, monkeypatch):
    """A backward replaying the forward's generator states sets the process-wide generator back (under fork_rng)
    for the time of the re-evaluation: another thread drawing meanwhile got numbers it had already drawn
    (concurrency audit).  A network that drew nothing has nothing to replay: its re-evaluations now leave the
    generators alone; a dropout network's are replayed as before (gradients as the reference's)."""
    forks = []
    real = torch.random.fork_rng

    def counting(*a, **k):
        if k.get("enabled", True):  # torch.utils.checkpoint calls it with enabled=preserve_rng_state
            forks.append(1)
        return real(*a, **k)
    monkeypatch.setattr(torch.random, "fork_rng", counting)
    net = Counted(trainable=False, dropout=0.3 if dropout else 0.0).train()
    model = ld3_ext.wrap_model(net, ld3_ext.EDM(), prediction="x0")
    t = random_decreasing_grid(80.0, 0.002, 4, seed=3).requires_grad_()
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80.0
    for backend in ("fused", "reference"):  # the node's re-evaluations; the per-step checkpoints (and step 0's)
        y = ld3_ext.DPMSolverPP(order=3, checkpoint_model=True, backend=backend).sample(model, x, t)
        assert (type(y.grad_fn).__name__ == "_WholeSamplerBackward") == (backend == "fused")
        before = len(forks)
        y.sum().backward()
        assert (len(forks) > before) == dropout, backend
