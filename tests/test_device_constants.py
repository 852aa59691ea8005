"""device_constants: constant tensors made on a device once (a host-to-GPU copy waits for the stream and cannot
be captured in a CUDA graph), never kept when made under a trace, a fake mode or a torch.func transform."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ld3_ext
from ld3_ext import coefficients
from ld3_ext.device_constants import cached_constants, plain_context


def _maker(calls):
    def make(device, dtype):
        calls.append((device, dtype))
        return (torch.arange(3, device=device, dtype=dtype),)
    return make


def test_made_once_per_key_device_and_dtype_as_plain_tensors():
    cache, calls = {}, []
    cpu = torch.device("cpu")
    with torch.inference_mode():
        (a,) = cached_constants(cache, "k", cpu, torch.float32, _maker(calls))
    (b,) = cached_constants(cache, "k", cpu, torch.float32, _maker(calls))
    assert a is b and not b.is_inference() and calls == [(cpu, torch.float32)]
    cached_constants(cache, "k", cpu, torch.float64, _maker(calls))
    cached_constants(cache, "other", cpu, torch.float32, _maker(calls))
    assert len(calls) == 3 and len(cache) == 3


@pytest.mark.parametrize("context", ["vmap", "grad", "fake"])
def test_never_kept_from_a_transform_or_a_fake_mode(context):
    cache, calls = {}, []
    cpu = torch.device("cpu")

    def ask(x):
        assert not plain_context() or context == "fake"
        return x * cached_constants(cache, "k", cpu, torch.float32, _maker(calls))[0].sum()
    if context == "vmap":
        torch.func.vmap(ask)(torch.ones(2))
    elif context == "grad":
        torch.func.grad(lambda x: ask(x).sum())(torch.ones(2))
    else:
        with FakeTensorMode():
            ask(torch.ones(2))
    assert cache == {} and len(calls) == 1
    cached_constants(cache, "k", cpu, torch.float32, _maker(calls))
    assert len(cache) == 1  # outside it, kept


def test_a_table_under_torch_func_first_leaves_later_tables_right():
    """The failure the per-call tensors were for: constants first made under grad (or vmap) must not be reused
    outside it.  A DPM-Solver++(3M) and a UniPC table read the phi and factorial constants."""
    coefficients._ON_DEVICE.clear()
    s = ld3_ext.VPDiscrete.linear(0.00085, 0.012)
    t = ld3_ext.discretizations.logsnr_uniform(s, 6)
    m = ld3_ext.wrap_model(lambda x, tt: 0.3 * torch.tanh(x), s, prediction="eps")
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for solver in (ld3_ext.DPMSolverPP(order=3), ld3_ext.UniPC(order=3)):
        want = torch.func.grad(lambda xx: solver.sample(m, xx, t).sum())(x)
        xs = x.clone().requires_grad_()
        solver.sample(m, xs, t).sum().backward()
        torch.testing.assert_close(xs.grad, want, rtol=1e-12, atol=1e-12)
    assert {k[0] for k in coefficients._ON_DEVICE} == {"phi", "k!"}
    assert all(type(v) is torch.Tensor for vals in coefficients._ON_DEVICE.values() for v in vals)


def test_first_made_inside_a_cuda_graph_capture_is_refused_with_a_hint(monkeypatch):
    """A constant first needed inside a capture would be a host-to-device copy there, which CUDA refuses with a
    generic error; it is named, with the remedy (a warm-up call), and nothing is made or kept.  Shown without a GPU:
    the capture flag is patched, and the refusal comes before any copy."""
    cache, calls = {}, []
    from ld3_ext import device_constants
    monkeypatch.setattr(device_constants, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"first needed on cuda:0 .*inside a CUDA-graph capture.*run the "
                                           r"same call once before capturing"):
        cached_constants(cache, "knots", torch.device("cuda:0"), torch.float32, _maker(calls))
    assert calls == [] and cache == {}
    # a copy made before the capture is served during it; CPU constants are never refused
    cache[("knots", torch.device("cuda:0"), torch.float32)] = (torch.zeros(1),)
    assert cached_constants(cache, "knots", torch.device("cuda:0"), torch.float32, _maker(calls))[0].numel() == 1
    cached_constants(cache, "knots", torch.device("cpu"), torch.float32, _maker(calls))
    assert len(calls) == 1
