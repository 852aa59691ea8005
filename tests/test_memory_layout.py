"""Memory layouts in the fused kernels (csrc/dense_layout.h): inputs that are all non-overlapping and
dense with the same strides (channels_last, any permutation) are walked in place and the outputs keep
that layout, as the eager reference ops do; mixed and sliced layouts are copied and stay correct."""
from __future__ import annotations

import pytest
import torch

from ld3_ext import _native, fused
from ld3_ext.ops import multistep_update_reference

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
