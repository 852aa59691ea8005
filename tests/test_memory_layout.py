"""Memory layouts in the fused kernels (csrc/dense_layout.h): inputs that are all non-overlapping and
dense with the same strides (channels_last, any permutation) are walked in place and the outputs keep
that layout, as the eager reference ops do; mixed and sliced layouts are copied and stay correct."""
from __future__ import annotations

import pytest
import torch

import ld3_ext
from ld3_ext import _native, adjoint, fused
from ld3_ext.ops import multistep_update_reference
from conftest import random_decreasing_grid

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not _native.native_available(), reason="needs the native extension")]

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
SHAPE4 = (3, 5, 6, 7)  # N, C, H, W
SHAPE3 = (6, 5, 7)


def _channels_last(gen, dtype):
    return torch.randn(SHAPE4, generator=gen, dtype=torch.float64).to(dtype).to(memory_format=torch.channels_last)


def _permuted3(gen, dtype):
    # dense, but in the storage order (dim 1, dim 2, dim 0): no memory_format names it
    return torch.randn(SHAPE3[1], SHAPE3[2], SHAPE3[0], generator=gen, dtype=torch.float64).to(dtype).permute(2, 0, 1)


LAYOUTS = {"channels_last": _channels_last, "permuted3": _permuted3}


def _inputs(layout, dtype, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = LAYOUTS[layout]
    x = make(gen, dtype)
    hist = [make(gen, dtype) for _ in range(K)]
    coef = torch.randn(1 + K, generator=gen, dtype=torch.float64)
    return x, coef, hist


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def _dots_close(a, b, dtype, g, terms):
    """Dot products: float32 sums round at the scale of sum |g * t|, not of the result."""
    scale = max(float((g.double() * t.double()).abs().sum()) for t in terms)
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [0, 2, 4])
def test_forward_keeps_the_inputs_layout(layout, dtype, K):
    x, coef, hist = _inputs(layout, dtype, K)
    want = multistep_update_reference(x, coef, hist)
    got = fused.multistep_update(x, coef, hist)
    assert got.stride() == want.stride() == x.stride()
    _close(got, want, dtype)
    # the values do not depend on the layout: bitwise those of contiguous inputs
    assert torch.equal(got, fused.multistep_update(x.contiguous(), coef, [m.contiguous() for m in hist]))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_out_in_the_inputs_layout_is_written_directly(layout):
    x, coef, hist = _inputs(layout, torch.float32, 3)
    want = multistep_update_reference(x, coef, hist)
    out = torch.empty_like(x)
    assert fused.multistep_update(x, coef, hist, out=out) is out
    assert out.stride() == x.stride()
    _close(out, want, torch.float32)
    # out=x: updated in place, layout kept
    x2 = x.clone()
    assert fused.multistep_update(x2, coef, hist, out=x2) is x2
    assert x2.stride() == x.stride()
    _close(x2, want, torch.float32)
    # an out laid out otherwise gets the same values
    out_c = torch.empty(x.shape)
    fused.multistep_update(x, coef, hist, out=out_c)
    assert out_c.is_contiguous()
    _close(out_c, want, torch.float32)


@pytest.mark.parametrize("case", ["x_cl_hist_contig", "x_contig_hist_cl", "hist_sliced", "x_sliced",
                                  "x_expanded"])
def test_mixed_layouts_are_still_correct(case):
    gen = torch.Generator().manual_seed(3)
    cl = lambda: _channels_last(gen, torch.float64)  # noqa: E731
    contig = lambda: torch.randn(SHAPE4, generator=gen, dtype=torch.float64)  # noqa: E731
    coef = torch.randn(3, generator=gen, dtype=torch.float64)
    if case == "x_cl_hist_contig":
        x, hist = cl(), [contig(), cl()]
    elif case == "x_contig_hist_cl":
        x, hist = contig(), [cl(), contig()]
    elif case == "hist_sliced":
        x, hist = cl(), [cl(), torch.randn(3, 5, 6, 14, generator=gen, dtype=torch.float64)[..., ::2]]
    elif case == "x_sliced":
        x, hist = torch.randn(3, 10, 6, 7, generator=gen, dtype=torch.float64)[:, ::2], [cl(), contig()]
    else:
        x, hist = torch.randn(1, 5, 6, 7, generator=gen, dtype=torch.float64).expand(SHAPE4), [cl(), cl()]
    want = multistep_update_reference(x, coef, hist)
    got = fused.multistep_update(x, coef, hist)
    _close(got, want, torch.float64)
    if case.startswith("x_c"):  # a dense x: its layout, as the reference's output
        assert got.stride() == want.stride() == x.stride()
    # and the same through out= in each layout
    for out in (torch.empty(SHAPE4, dtype=torch.float64), torch.empty_like(cl())):
        fused.multistep_update(x, coef, hist, out=out)
        _close(out, want, torch.float64)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_grads_keep_the_layout(layout, dtype):
    x, coef, hist = _inputs(layout, dtype, 3, seed=1)
    gen = torch.Generator().manual_seed(2)
    g = torch.empty_like(x).copy_(torch.randn(x.shape, generator=gen, dtype=torch.float64))  # grad in x's layout

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, coef, *hist)]
        y = fn(leaves[0], leaves[1], leaves[2:])
        return y, torch.autograd.grad(y, leaves, g)

    y_f, got = grads(fused.multistep_update)
    y_r, want = grads(multistep_update_reference)
    assert y_f.stride() == y_r.stride()
    for name, a, b in zip(["x", "coef", "m0", "m1", "m2"], got, want):
        assert a.stride() == b.stride(), name
        if name == "coef":
            _dots_close(a, b, dtype, g, (x, *hist))
        else:
            _close(a, b, dtype)
    # the kernel itself, for each set of wanted grads
    for need in [(True, True, True), (True, False, False), (False, False, True), (False, True, False)]:
        gx, gc, gms = _native._C.multistep_update_backward(g, x, coef, hist, *need)
        if need[0]:
            assert gx.stride() == x.stride()
            _close(gx, want[0], dtype)
        if need[1]:
            _dots_close(gc, want[1], dtype, g, (x, *hist))
        for gm, w in zip(gms, want[2:]):
            assert gm.stride() == x.stride()
            _close(gm, w, dtype)


def test_backward_with_a_grad_laid_out_otherwise():
    x, coef, hist = _inputs("channels_last", torch.float64, 2, seed=4)
    g = torch.randn(1, *SHAPE4[1:], dtype=torch.float64).expand(SHAPE4)  # e.g. from a broadcast: not dense
    gx, gc, gms = _native._C.multistep_update_backward(g, x, coef, hist, True, True, True)
    _close(gx, coef[0] * g, torch.float64)
    _close(gms[1], coef[2] * g, torch.float64)
    want = torch.stack([(g * t).sum() for t in (x, *hist)])
    _close(gc[:3], want, torch.float64)


# ----------------------------------------------------------------------------------------------
# the whole-sampler adjoint step
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mixed", [False, True])
def test_adjoint_step_keeps_the_layout(layout, dtype, mixed):
    gen = torch.Generator().manual_seed(5)
    make = lambda: LAYOUTS[layout](gen, dtype)  # noqa: E731
    lam_prev, v, x, m = make(), make(), make(), make()
    older = [make(), make()]
    if mixed:  # everything but v in another layout: read through copies in v's layout
        lam_prev, x, older[1] = lam_prev.contiguous(), x.contiguous(), older[1].contiguous()
    w = torch.randn(4, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.7], dtype=torch.float64)
    v_n, v_r = v.clone(), v.clone()
    d_n, d_r = (torch.zeros(5, dtype=torch.float64) for _ in range(2))
    gm_n = _native._C.multistep_adjoint(lam_prev, v_n, scale, older, x, m, w, d_n)
    gm_r = adjoint.adjoint_step_reference(lam_prev, v_r, scale, older, x, m, w, d_r)
    assert v_n.stride() == v.stride() and gm_n.stride() == v.stride()
    _close(v_n, v_r, dtype)
    _close(gm_n, gm_r, dtype)
    scale = max(float((a.double() * b.double()).abs().sum()) for a in (v_r, lam_prev, *older) for b in (x, m))
    torch.testing.assert_close(d_n, d_r, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    # without v the step runs in lam_prev's layout
    gm_n = _native._C.multistep_adjoint(lam_prev, None, None, older[:1], x, m, w[:2], None)
    gm_r = adjoint.adjoint_step_reference(lam_prev, None, None, older[:1], x, m, w[:2], None)
    assert gm_n.stride() == lam_prev.stride()
    _close(gm_n, gm_r, dtype)


# ----------------------------------------------------------------------------------------------
# a whole sample call in channels_last
# ----------------------------------------------------------------------------------------------
def _layout_recording_model(schedule, seen):
    gen = torch.Generator().manual_seed(0)
    scale = 0.5 + torch.rand(1, SHAPE4[1], 1, 1, generator=gen, dtype=torch.float64)

    def net(x, t):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        # element-wise (keeps the layout, as a channels_last UNet does), non-linear in x and t
        return torch.tanh(x * scale) * (1.0 + 0.05 * torch.log1p(t.reshape(-1, 1, 1, 1).abs()))
    return ld3_ext.wrap_model(net, schedule, prediction="x0")


@pytest.mark.parametrize("solver", [lambda b: ld3_ext.DPMSolverPP(order=3, backend=b),
                                    lambda b: ld3_ext.UniPC(order=2, backend=b)], ids=["dpmpp3", "unipc2"])
def test_sampler_keeps_channels_last_end_to_end(solver):
    schedule = ld3_ext.EDM()
    t = random_decreasing_grid(80.0, 0.002, 6, seed=1)
    x_T = 80.0 * _channels_last(torch.Generator().manual_seed(6), torch.float64)
    g = torch.empty_like(x_T).copy_(torch.randn(SHAPE4, generator=torch.Generator().manual_seed(7),
                                                dtype=torch.float64))
    results = {}
    for backend in ("fused", "reference"):
        seen = []
        model = _layout_recording_model(schedule, seen)
        with torch.no_grad():
            y = solver(backend).sample(model, x_T, t)
        assert all(seen) and len(seen) >= 6, (backend, seen)  # every model call saw channels_last
        assert y.is_contiguous(memory_format=torch.channels_last), backend
        # the backward: the whole-sampler adjoint on the fused path
        xx, tt = x_T.clone().requires_grad_(), t.clone().requires_grad_()
        seen.clear()
        y = solver(backend).sample(model, xx, tt)
        gx, gt = torch.autograd.grad(y, [xx, tt], g)
        assert all(seen), (backend, seen)  # the backward's re-evaluations too
        assert gx.is_contiguous(memory_format=torch.channels_last), backend
        results[backend] = (y.detach(), gx, gt)
    for a, b in zip(results["fused"], results["reference"]):
        assert (a - b).abs().max().item() <= 1e-12 * b.abs().max().item() + 1e-13


# ----------------------------------------------------------------------------------------------
# torch.compile: the fake implementations (ld3_ext/fused.py) promise the kernels' strides
# ----------------------------------------------------------------------------------------------
def _sliced(gen, dtype, dims):
    """Not dense: every other element of the last dimension of a buffer stored in `dims` order."""
    buf = torch.randn(SHAPE4[:3] + (2 * SHAPE4[3],), generator=gen, dtype=torch.float64).to(dtype)
    return buf.permute(*dims).contiguous().permute(*[dims.index(d) for d in range(4)])[..., ::2]


def _fake_case(case):
    """x, history, grad for the stride comparison of the fake and the real kernels."""
    gen = torch.Generator().manual_seed(8)
    if case in LAYOUTS:
        x, coef, hist = _inputs(case, torch.float32, 2, seed=9)
        return x, coef, hist, LAYOUTS[case](gen, torch.float32)
    coef = torch.randn(3, generator=gen, dtype=torch.float64)
    contig = lambda: torch.randn(SHAPE4, generator=gen)  # noqa: E731
    if case == "sliced":  # x and grad sliced, in two dimension orders: outputs dense in each one's order
        return _sliced(gen, torch.float32, (0, 2, 3, 1)), coef, [contig(), contig()], _sliced(gen, torch.float32,
                                                                                               (3, 2, 1, 0))
    # mixed: x channels_last, the rest contiguous
    return _channels_last(gen, torch.float32), coef, [contig(), contig()], contig()


@pytest.mark.parametrize("case", ["channels_last", "permuted3", "sliced", "mixed"])
def test_fake_implementations_give_the_kernels_strides(case):
    """torch.compile plans memory from the fake outputs: strides other than the real ones make later
    ops read a custom op's output wrongly (the fakes were contiguous while the kernels kept x's layout)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, coef, hist, grad = _fake_case(case)
    fwd, bwd = torch.ops.ld3_ext.multistep_update.default, torch.ops.ld3_ext.multistep_update_backward.default
    real_y = fwd(x, coef, hist)
    real_gx, _, real_gms = bwd(grad, x, coef, hist)
    mode = FakeTensorMode()
    fx, fc, fg = mode.from_tensor(x), mode.from_tensor(coef), mode.from_tensor(grad)
    fh = [mode.from_tensor(m) for m in hist]
    with mode:
        fake_y = fwd(fx, fc, fh)
        fake_gx, fake_gc, fake_gms = bwd(fg, fx, fc, fh)
    assert fake_y.stride() == real_y.stride()
    assert fake_gx.stride() == real_gx.stride()
    assert [m.stride() for m in fake_gms] == [m.stride() for m in real_gms] and len(real_gms) == 2
    # the cases are what they say: the layouts differ from plain contiguous ones
    assert not real_y.is_contiguous() and (case == "mixed") == real_gx.is_contiguous()


def test_an_expanded_grad_runs_the_reverse_steps_in_the_states_layout(monkeypatch):
    """The grad of y.sum() is an expand()ed scalar: made dense once in x_T's layout, so that every reverse
    step finds lambda and the saved states laid out alike (else each step copied its states)."""
    schedule = ld3_ext.EDM()
    t = random_decreasing_grid(80.0, 0.002, 6, seed=2)
    x_T = (80.0 * _channels_last(torch.Generator().manual_seed(3), torch.float64)).requires_grad_()
    model = _layout_recording_model(schedule, [])
    seen = []
    real = adjoint._adjoint_step_fn

    def recording(like):
        step = real(like)

        def run(lam_prev, v, scale, older, x, m, *rest):
            seen.append(lam_prev.stride() == x_T.stride() and (x is None or x.stride() == lam_prev.stride()))
            return step(lam_prev, v, scale, older, x, m, *rest)
        return run

    monkeypatch.setattr(adjoint, "_adjoint_step_fn", recording)
    y = ld3_ext.DPMSolverPP(order=3, backend="fused").sample(model, x_T, t)
    gx, = torch.autograd.grad(y.sum(), [x_T])
    assert len(seen) >= 6 and all(seen), seen
    assert gx.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(adjoint, "_adjoint_step_fn", real)
    xr = x_T.detach().clone().requires_grad_()
    yr = ld3_ext.DPMSolverPP(order=3, backend="reference").sample(model, xr, t)
    want, = torch.autograd.grad(yr.sum(), [xr])
    assert (gx - want).abs().max().item() <= 1e-12 * want.abs().max().item() + 1e-13


# ----------------------------------------------------------------------------------------------
# a network that returns another layout than the state's: its outputs enter the history converted once
# ----------------------------------------------------------------------------------------------
class _LayoutSpy:
    """Stands in for ld3_ext._C: counts the kernel calls whose sample-shaped tensors are not all laid out alike
    (each such call copies the odd ones into x's layout, csrc/dense_layout.h)."""

    def __init__(self, real):
        self.real, self.calls, self.mixed = real, 0, 0

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if not name.startswith("multistep"):
            return fn

        def run(*args, **kw):
            tensors = []
            for a in args:
                for t in (a if isinstance(a, (list, tuple)) else [a]):
                    if isinstance(t, torch.Tensor) and t.shape == SHAPE4:
                        tensors.append(t)
            self.calls += 1
            self.mixed += len({t.stride() for t in tensors}) > 1
            return fn(*args, **kw)
        return run


def _contiguous_output_model(schedule, weight=None):
    """A network that always returns contiguous tensors (a channels_last state comes back laid out otherwise)."""
    def net(x, t):
        y = torch.tanh(x * 0.02) * (1.0 + 0.05 * torch.log1p(t.reshape(-1, 1, 1, 1).abs()))
        return (y if weight is None else y * weight).contiguous()
    return ld3_ext.wrap_model(net, schedule, prediction="x0")


HISTORY_SOLVERS = {
    "dpmpp3": lambda b: ld3_ext.DPMSolverPP(order=3, backend=b),
    "unipc3": lambda b: ld3_ext.UniPC(order=3, backend=b),
    "heun": lambda b: ld3_ext.Heun(backend=b),
    "euler": lambda b: ld3_ext.Euler(backend=b),
}


@pytest.mark.parametrize("path,grad_layout", [("no_grad", None), ("whole_sampler", "state"),
                                              ("whole_sampler", "contiguous"), ("per_step", "state"),
                                              ("per_step", "contiguous")])
@pytest.mark.parametrize("solver", sorted(HISTORY_SOLVERS))
def test_outputs_in_another_layout_are_converted_once(monkeypatch, solver, path, grad_layout):
    """channels_last state, contiguous network outputs (and a grad in the state's layout or contiguous): no
    kernel call (update, its backward, the adjoint step) gets mixed layouts any more (each copied up to 3
    history entries, or the states, per call), and results and gradients are those of the same solve on
    contiguous tensors."""
    schedule = ld3_ext.EDM()
    t = random_decreasing_grid(80.0, 0.002, 6, seed=4)
    x_T = 80.0 * _channels_last(torch.Generator().manual_seed(5), torch.float64)
    g = torch.randn(SHAPE4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    # per_step: the network depends on a weight that requires grad, so the whole-sampler node declines
    weight = torch.tensor(1.1, dtype=torch.float64, requires_grad=True) if path == "per_step" else None
    spy = _LayoutSpy(_native._C)
    monkeypatch.setattr(_native, "_C", spy)
    monkeypatch.setattr(fused, "_C", spy)

    def run(x0):
        xx, tt = x0.clone().requires_grad_(path != "no_grad"), t.clone().requires_grad_(path != "no_grad")
        model = _contiguous_output_model(schedule, weight)
        if path == "no_grad":
            with torch.no_grad():
                return (HISTORY_SOLVERS[solver]("fused").sample(model, xx, tt),)
        y = HISTORY_SOLVERS[solver]("fused").sample(model, xx, tt)
        gg = torch.empty_like(xx).copy_(g) if grad_layout == "state" else g.contiguous()
        return (y.detach(), *torch.autograd.grad(y, [xx, tt], gg))

    got = run(x_T)
    assert spy.calls >= 6 and spy.mixed == 0, (spy.calls, spy.mixed)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    want = run(x_T.contiguous())
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-12 * b.abs().max().item() + 1e-13
