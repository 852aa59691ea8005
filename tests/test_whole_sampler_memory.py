"""The whole-sampler node (adjoint.py) frees its per-step states after a backward without retain_graph, as autograd
frees saved tensors (memory audit): kept as plain ctx attributes they lived as long as the output, so a training
loop (``loss = ...; loss.backward()``, loss rebound only after the next forward) held 2N-1 states of the last
iteration through the next one (+304 MiB at 16 MiB states, NFE 10)."""
import gc

import pytest
import torch

import ld3_ext
from ld3_ext import discretizations

SHAPE = (3, 7, 5, 2)  # unusual: no other tensor of the test process has it


def _live_states():
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and tuple(o.shape) == SHAPE)


def _net(x, t):
    return torch.tanh(x) * 0.5 + 0.1 * x * t.reshape(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("solver", [ld3_ext.DPMSolverPP(3), ld3_ext.UniPC(3), ld3_ext.IPNDM(4), ld3_ext.Heun(),
                                    ld3_ext.DPMSolverPP(3, checkpoint_model=True)],
                         ids=["dpmpp3", "unipc3", "ipndm4", "heun", "dpmpp3-checkpoint"])
def test_states_are_freed_by_a_backward_and_kept_for_a_retained_one(solver):
    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(_net, s, prediction="x0")
    t = discretizations.logsnr_uniform(s, 8).requires_grad_()
    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    base = _live_states()  # x
    y = solver.sample(model, x, t)
    assert type(y.grad_fn).__name__.startswith("_WholeSampler"), "this test is about the fused node"
    held = _live_states() - base
    assert held >= 8, held  # the forward keeps its states for the backward (y among them)
    g1 = torch.autograd.grad(y.sum(), [x, t], retain_graph=True)
    g2 = torch.autograd.grad(y.sum(), [x, t])
    for a, b in zip(g1, g2):  # the retained states give the same gradients a second time
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    del g1, g2
    # freed: only y is left of the solve (x is not counted: it was there before); it was 2N = 16 here
    assert _live_states() - base == 1, _live_states() - base
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(y.sum(), [x, t])


def test_saved_tensor_hooks_see_the_states():
    """Through save_for_backward the states reach the user's saved-tensor hooks (save_on_cpu, offloading), as the
    reference path's do."""
    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(_net, s, prediction="x0")
    t = discretizations.logsnr_uniform(s, 6).requires_grad_()
    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    packed = set()

    def pack(v):
        packed.add(v.data_ptr())
        return v
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        y = ld3_ext.DPMSolverPP(3).sample(model, x, t)
    assert type(y.grad_fn).__name__.startswith("_WholeSampler")
    saved = y.grad_fn.saved_tensors
    states = [v for v in saved if v is not None and tuple(v.shape) == SHAPE]
    assert len(states) == 1 + 5 + 6 + 1, len(states)  # x_T, x_1..x_5, m_0..m_5, step 0's output (the caller's)
    assert all(v.data_ptr() in packed for v in states)
    ref_grad = torch.autograd.grad(ld3_ext.DPMSolverPP(3, backend="reference").sample(model, x, t).sum(), [x, t])
    got_grad = torch.autograd.grad(y.sum(), [x, t])
    for a, b in zip(got_grad, ref_grad):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
