"""The CUDA kernels and their launchers (csrc/cuda/*.cu), run on the CPU through an emulation.

tests/cuda_emulation/build.py compiles the .cu sources as C++ over a small shim: each block's
threads are real threads meeting at __syncthreads() on a barrier, blocks run one after another.
This checks, without a GPU, what is most likely wrong in kernel code that has never run: indexing,
grid-stride and per-block chunk bounds, the 16-byte vector path and its tail, the misalignment
fallback, the shared-memory tree sums and the per-block partials, the host code's grid sizes, flags
and launch counts.  It cannot check warp timing, coalescing, speed or the device's own maths
library; tests/test_cuda_ops.py (benchmarks/gpu_check.sh) does on a GPU.

Oracle: the CPU kernels, which are tested against the PyTorch reference elsewhere.  Element-wise
outputs must be bitwise equal (no FMA contraction on either side); dot products differ only in
summation order.
"""
from __future__ import annotations

import pytest
import torch

import ld3_ext
from ld3_ext import _native
from ld3_ext import schedules as S
from ld3_ext.coefficients import SOLVER_IDS
from conftest import random_decreasing_grid

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# dot products: both sides sum exact (float64) or op-math products in different orders
DOT_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
BLOCK = 4096  # elements per block of the backward and adjoint kernels (reduce_cuda.cuh)


@pytest.fixture(scope="module")
def emu():
    if not _native.native_available():
        pytest.fail(f"ld3_ext._C is not built ({_native.load_error()}): the CPU kernels are the oracle here")
    from cuda_emulation.build import load_emulated_cuda
    return load_emulated_cuda()


C = _native._C


def _randn(n, dtype, gen):
    return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)


def _randn_wide(n, dtype, gen):
    """Magnitudes spread over 2^-10 .. 2^10, so the products' float64 sums round (with half inputs too) and a
    different summation order shows in the bits."""
    scale = torch.exp2(torch.randint(-10, 11, (n,), generator=gen).double())
    return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _aligned(t):
    """A fresh copy of t (16-byte aligned: the kernels' packet path)."""
    buf = t.clone()
    assert buf.data_ptr() % 16 == 0
    return buf


def _misaligned(t):
    """t's values in a view one element past a 16-byte boundary (as x[1:] is): the kernels' scalar fallback."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].copy_(t)
    assert buf.data_ptr() % 16 != 0
    return buf


# n for the alignment tests: under one block, over one with leftovers past the last packet for every packet width
# (2, 4, 8 elements), whole blocks only, and several blocks with a ragged tail
ALIGNMENT_NS = [1003, BLOCK + 7, 2 * BLOCK, 3 * BLOCK + 1005]


def _dots_close(a, b, dtype, terms):
    scale = float(terms.abs().sum()) if terms is not None else 1.0
    torch.testing.assert_close(a, b, rtol=DOT_RTOL[dtype], atol=DOT_RTOL[dtype] * max(scale, 1.0))


# ----------------------------------------------------------------------------------------------
# the update: forward and backward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [0, 1, 3, 4])
def test_update_forward_and_backward_match_cpu(emu, dtype, K):
    """Two and a ragged part of a block; the forward's grid (2 SMs x 3 resident blocks: the shim's occupancy) wraps
    around."""
    g = torch.Generator().manual_seed(K)
    n = 2 * BLOCK + 4 * 256 * 8 * 2 + 13
    x, grad = _randn(n, dtype, g), _randn(n, dtype, g)
    hist = [_randn(n, dtype, g) for _ in range(K)]
    coef = torch.randn(1 + K, generator=g, dtype=torch.float64)
    assert torch.equal(emu.multistep_update(x, coef, hist), C.multistep_update(x, coef, hist))
    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        ge = emu.multistep_update_backward(grad, x, coef, hist, *need)
        gc = C.multistep_update_backward(grad, x, coef, hist, *need)
        assert (ge[0] is None) == (gc[0] is None) and (ge[0] is None or torch.equal(ge[0], gc[0]))
        assert len(ge[2]) == len(gc[2]) and all(torch.equal(a, b) for a, b in zip(ge[2], gc[2]))
        assert (ge[1] is None) == (gc[1] is None)
        if ge[1] is not None:
            want = torch.stack([(grad.double() * t.double()).sum() for t in (x, *hist)])
            _dots_close(ge[1], want, dtype, grad.double().abs() * x.double().abs())
            _dots_close(ge[1], gc[1], dtype, grad.double().abs() * x.double().abs())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["x", "hist1", "out", "grad"])
def test_update_misaligned_pointer_takes_the_scalar_path(emu, dtype, which):
    """One tensor one element off a 16-byte boundary: the whole call must take the scalar loop and
    still give the aligned result bitwise (and an out= view is written in place); the backward's
    element-wise grads too, and its dot products to rounding."""
    g = torch.Generator().manual_seed(3)
    n = BLOCK + 1000 + 7

    def make(name):
        buf = _randn(n + 1, dtype, g)
        return buf[1:] if name == which else buf[:n]

    x, hist, grad = make("x"), [make(f"hist{k}") for k in range(3)], make("grad")
    coef = torch.randn(4, generator=g, dtype=torch.float64)
    want = C.multistep_update(x.clone(), coef, [h.clone() for h in hist])
    if which == "out":
        out = torch.empty(n + 1, dtype=dtype)[1:]
        assert emu.multistep_update(x, coef, hist, out).data_ptr() == out.data_ptr()
        assert torch.equal(out, want)
    else:
        assert torch.equal(emu.multistep_update(x, coef, hist), want)
    for need in [(True, True, True), (False, True, False), (True, False, True)]:
        ge = emu.multistep_update_backward(grad, x, coef, hist, *need)
        gc = C.multistep_update_backward(grad.clone(), x.clone(), coef, [h.clone() for h in hist], *need)
        assert ge[0] is None or torch.equal(ge[0], gc[0])
        assert all(torch.equal(a, b) for a, b in zip(ge[2], gc[2]))
        if ge[1] is not None:
            _dots_close(ge[1], gc[1], dtype, grad.double().abs() * x.double().abs())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["all", "x"])
def test_update_backward_dots_do_not_depend_on_alignment(emu, dtype, which):
    """The same values aligned (packet path) and misaligned (scalar fallback): every thread must sum the same
    elements in the same order, so the coefficient gradients are bitwise equal, as they are on the CPU."""
    for n in ALIGNMENT_NS:
        g = torch.Generator().manual_seed(n)
        x, grad = _aligned(_randn_wide(n, dtype, g)), _aligned(_randn_wide(n, dtype, g))
        hist = [_aligned(_randn_wide(n, dtype, g)) for _ in range(3)]
        coef = torch.randn(4, generator=g, dtype=torch.float64)
        if which == "all":
            mis = (_misaligned(grad), _misaligned(x), [_misaligned(h) for h in hist])
        else:
            mis = (grad, _misaligned(x), hist)
        for need in [(False, True, False), (True, True, True)]:
            ga = emu.multistep_update_backward(grad, x, coef, hist, *need)
            gm = emu.multistep_update_backward(*mis[:2], coef, mis[2], *need)
            assert torch.equal(ga[1], gm[1]), f"n={n}: {(ga[1] - gm[1]).tolist()}"
            assert ga[0] is None or torch.equal(ga[0], gm[0])
            assert all(torch.equal(a, b) for a, b in zip(ga[2], gm[2]))


def test_update_out_aliases_and_non_contiguous_input(emu):
    g = torch.Generator().manual_seed(4)
    x = _randn(3001, torch.float32, g)
    hist = [_randn(3001, torch.float32, g) for _ in range(2)]
    coef = torch.randn(3, generator=g, dtype=torch.float64)
    want = C.multistep_update(x, coef, hist)
    y = x.clone()
    assert emu.multistep_update(y, coef, hist, y).data_ptr() == y.data_ptr()
    assert torch.equal(y, want)
    h0 = hist[0].clone()
    emu.multistep_update(x, coef, [h0, hist[1]], h0)  # out may alias a history tensor exactly
    assert torch.equal(h0, want)
    big = _randn(2 * 3001, torch.float32, g)
    xs = big[::2]  # strided: a contiguous copy is taken
    assert torch.equal(emu.multistep_update(xs, coef, hist), C.multistep_update(xs.contiguous(), coef, hist))
    out_nc = torch.empty(2 * 3001)[::2]  # a strided out= is written through a temporary
    emu.multistep_update(x, coef, hist, out_nc)
    assert torch.equal(out_nc, want)
    # a coefficient row longer than 1 + K: the gradient's extra entries are zero
    row = torch.cat([coef, torch.tensor([5.0, 6.0], dtype=torch.float64)])
    gc = emu.multistep_update_backward(x, x, row, hist, False, True, False)[1]
    assert gc.shape == (5,) and torch.all(gc[3:] == 0)


def _in_layout(t, layout):
    """t (values unchanged) stored channels_last, in an order no memory_format names (H, W, N, C), or sliced
    (not dense)."""
    if layout == "channels_last":
        return t.to(memory_format=torch.channels_last)
    if layout == "permuted":  # (N, H, W, C) storage would be channels_last again
        return t.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    if layout == "sliced":
        return torch.cat([t, t], dim=3)[..., ::2].copy_(t)
    return t.contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layouts", [("channels_last",) * 4, ("permuted",) * 4,
                                     ("channels_last", "contiguous", "sliced", "permuted")],
                         ids=["channels_last", "permuted", "mixed"])
def test_update_keeps_the_layout_of_dense_inputs(emu, dtype, layouts):
    """x, history and grad laid out alike are walked in place and the outputs keep that layout, as on the
    CPU (csrc/dense_layout.h); others are copied into x's (grad's) layout.  Several blocks' worth."""
    g = torch.Generator().manual_seed(21)
    shape = (2, 8, 24, 25)  # > 2 blocks, a ragged tail
    x, h0, h1, grad = (_in_layout(_randn(shape[0] * 8 * 24 * 25, dtype, g).view(shape), lay) for lay in layouts)
    is_cl = x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous() and (layouts[0] == "channels_last") == is_cl
    hist = [h0, h1]
    coef = torch.randn(3, generator=g, dtype=torch.float64)
    want = C.multistep_update(x, coef, hist)
    got = emu.multistep_update(x, coef, hist)
    assert got.stride() == want.stride() == x.stride() and torch.equal(got, want)
    out = torch.empty_like(x)
    assert emu.multistep_update(x, coef, hist, out).data_ptr() == out.data_ptr()
    assert torch.equal(out, want)
    oc = torch.empty(shape, dtype=dtype)  # contiguous, x is not: written through a buffer in x's layout
    emu.multistep_update(x, coef, hist, oc)
    assert torch.equal(oc, want)
    y = x.clone()
    emu.multistep_update(y, coef, hist, y)  # out=x in x's layout
    assert y.stride() == x.stride() and torch.equal(y, want)
    ge = emu.multistep_update_backward(grad, x, coef, hist, True, True, True)
    gc = C.multistep_update_backward(grad, x, coef, hist, True, True, True)
    assert ge[0].stride() == gc[0].stride() == grad.stride() and torch.equal(ge[0], gc[0])
    assert all(a.stride() == grad.stride() and torch.equal(a, b) for a, b in zip(ge[2], gc[2]))
    _dots_close(ge[1], gc[1], dtype, grad.double().abs() * x.double().abs())
    want_dots = torch.stack([(grad.double() * t.double()).sum() for t in (x, *hist)])
    _dots_close(ge[1], want_dots, dtype, grad.double().abs() * x.double().abs())
    gs = _in_layout(grad, "sliced")  # not dense: copied into a dense layout before the flat walk
    ge = emu.multistep_update_backward(gs, x, coef, hist, True, True, True)
    assert torch.equal(ge[0], gc[0]) and all(torch.equal(a, b) for a, b in zip(ge[2], gc[2]))
    _dots_close(ge[1], want_dots, dtype, grad.double().abs() * x.double().abs())


@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
@pytest.mark.parametrize("mixed", [False, True])
def test_adjoint_step_keeps_the_layout_of_v(emu, layout, mixed):
    """The step runs in v's layout (v is written in place); inputs laid out otherwise are copied."""
    g = torch.Generator().manual_seed(22)
    shape = (2, 8, 24, 25)
    make = lambda lay: _in_layout(_randn(2 * 8 * 24 * 25, torch.float32, g).view(shape), lay)  # noqa: E731
    other = "contiguous" if mixed else layout
    lam, v, x, m, o = make(other), make(layout), make(other), make(other), make(other)
    w = torch.randn(3, generator=g, dtype=torch.float64)
    sc = torch.tensor([0.7], dtype=torch.float64)
    res = []
    for fn in (emu.multistep_adjoint, C.multistep_adjoint):
        vv = v.clone()
        dots = torch.zeros(4, dtype=torch.float64)
        res.append((fn(lam, vv, sc, [o], x, m, w, dots), vv, dots))
    (gm_e, v_e, d_e), (gm_c, v_c, d_c) = res
    assert gm_e.stride() == gm_c.stride() == v.stride() and v_e.stride() == v.stride()
    assert torch.equal(gm_e, gm_c) and torch.equal(v_e, v_c)
    _dots_close(d_e, d_c, torch.float32, lam.double().abs() * x.double().abs())
    # without v the step runs in lam_prev's layout; a sliced lam_prev is copied into a dense one first
    ls = _in_layout(lam, "sliced")
    d_e, d_c = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    gm_e = emu.multistep_adjoint(ls, None, None, [o], x, m, w[:2], d_e)
    gm_c = C.multistep_adjoint(lam, None, None, [o], x, m, w[:2], d_c)
    assert torch.equal(gm_e, gm_c)
    _dots_close(d_e, d_c, torch.float32, lam.double().abs() * x.double().abs())


def test_update_empty_and_bad_input(emu):
    e = torch.empty(0, 4)
    c = torch.ones(4, dtype=torch.float64)
    assert emu.multistep_update(e, c, [e, e, e]).shape == (0, 4)
    gx, gc, gms = emu.multistep_update_backward(e, e, c, [e, e, e], True, True, True)
    assert gx.shape == (0, 4) and torch.equal(gc, torch.zeros(4, dtype=torch.float64)) and len(gms) == 3
    with pytest.raises(RuntimeError, match="history"):
        emu.multistep_update(torch.ones(3), c[:2], [torch.ones(4)])
    buf = torch.arange(16.0)
    with pytest.raises(RuntimeError, match="overlap|memory location"):
        emu.multistep_update(buf[:-4], c[:1], [], buf[4:])


@pytest.mark.parametrize("K", [1, 4])
def test_backward_is_bitwise_reproducible(emu, K):
    """Real threads on every run: a race in the block reduction would show as run-to-run noise."""
    g = torch.Generator().manual_seed(7)
    n = 3 * BLOCK + 101
    x, grad = _randn(n, torch.float32, g), _randn(n, torch.float32, g)
    hist = [_randn(n, torch.float32, g) for _ in range(K)]
    coef = torch.randn(1 + K, generator=g, dtype=torch.float64)
    runs = [emu.multistep_update_backward(grad, x, coef, hist, False, True, False)[1] for _ in range(4)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_partials_sum_loops_over_more_blocks_than_threads(emu):
    """300 blocks of partials: the one-block second pass strides over them (256 threads)."""
    g = torch.Generator().manual_seed(9)
    n = 300 * BLOCK + 3
    x, grad, m = (_randn(n, torch.float32, g) for _ in range(3))
    coef = torch.randn(2, generator=g, dtype=torch.float64)
    gc = emu.multistep_update_backward(grad, x, coef, [m], False, True, False)[1]
    want = torch.stack([(grad.double() * t.double()).sum() for t in (x, m)])
    _dots_close(gc, want, torch.float32, grad.double().abs() * x.double().abs())
    d = torch.zeros(2, dtype=torch.float64)
    emu.multistep_adjoint(grad, None, None, [], x, m, torch.ones(1, dtype=torch.float64), d)
    _dots_close(d, want, torch.float32, grad.double().abs() * x.double().abs())


def test_launch_counts(emu):
    """One launch forward; the backward two (element-wise + partials, then the fixed-order sum) and
    one when no coefficient gradient is asked for; none for empty tensors."""
    g = torch.Generator().manual_seed(8)
    x = _randn(5000, torch.float32, g)
    hist = [_randn(5000, torch.float32, g) for _ in range(3)]
    coef = torch.randn(4, generator=g, dtype=torch.float64)
    n0 = emu.launches()
    emu.multistep_update(x, coef, hist)
    assert emu.launches() - n0 == 1
    n0 = emu.launches()
    emu.multistep_update_backward(x, x, coef, hist, True, True, True)
    assert emu.launches() - n0 == 2
    n0 = emu.launches()
    emu.multistep_update_backward(x, x, coef, hist, True, False, True)
    assert emu.launches() - n0 == 1
    n0 = emu.launches()
    emu.multistep_update_backward(x, x, coef, [], False, False, True)  # only history grads, no history
    emu.multistep_update(torch.empty(0), coef, [torch.empty(0)] * 3)
    assert emu.launches() == n0


# ----------------------------------------------------------------------------------------------
# one reverse step of the whole-sampler adjoint
# ----------------------------------------------------------------------------------------------
def _adjoint_step_inputs(randn, n, dtype, g, J, with_v):
    """(lam, v, older, x, m, w, scale) of one reverse step with J weights, drawn in this order from ``g``."""
    lam, x, m = (randn(n, dtype, g) for _ in range(3))
    v = randn(n, dtype, g) if with_v else None
    older = [randn(n, dtype, g) for _ in range(max(J - (2 if with_v else 1), 0))]
    w = torch.randn(J, generator=g, dtype=torch.float64)
    sc = torch.tensor([0.7], dtype=torch.float64) if with_v else None
    return lam, v, older, x, m, w, sc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("J,with_v", [(0, True), (1, False), (2, True), (3, True), (4, True), (2, False)])
@pytest.mark.parametrize("with_dots", [True, False])
def test_adjoint_step_matches_cpu(emu, dtype, J, with_v, with_dots):
    g = torch.Generator().manual_seed(10 * J + with_v)
    lam, v, older, x, m, w, sc = _adjoint_step_inputs(_randn, 2 * BLOCK + 77, dtype, g, J, with_v)
    res = []
    for fn in (emu.multistep_adjoint, C.multistep_adjoint):
        vv = v.clone() if with_v else None
        dots = torch.full((6,), -7.0, dtype=torch.float64) if with_dots else None
        gm = fn(lam, vv, sc, older, x, m, w, dots)
        res.append((gm, vv, dots))
    (gm_e, v_e, d_e), (gm_c, v_c, d_c) = res
    assert (gm_e is None) == (gm_c is None) and (gm_e is None or torch.equal(gm_e, gm_c))
    assert (v_e is None) or torch.equal(v_e, v_c)
    if with_dots:
        _dots_close(d_e[: 1 + J], d_c[: 1 + J], dtype, lam.double().abs() * x.double().abs())
        assert torch.all(d_e[1 + J:] == -7.0), "entries past 1 + J must be left alone"


def test_adjoint_step_launch_counts(emu):
    """A reverse step of the whole-sampler node: at most two launches (element-wise + partials, then the
    fixed-order sum of the dot products), one without dot products: the GPU target of at most two per step."""
    g = torch.Generator().manual_seed(13)
    n = 2 * BLOCK + 5
    lam, v, x, m = (_randn(n, torch.float32, g) for _ in range(4))
    older = [_randn(n, torch.float32, g)]
    w = torch.randn(3, generator=g, dtype=torch.float64)
    sc = torch.tensor([0.9], dtype=torch.float64)
    for dots, want in ((torch.zeros(4, dtype=torch.float64), 2), (None, 1)):
        n0 = emu.launches()
        emu.multistep_adjoint(lam, v.clone(), sc, older, x, m, w, dots)
        assert emu.launches() - n0 == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("which", ["lam", "v", "older", "x", "m"])
def test_adjoint_step_misaligned_pointer_takes_the_scalar_path(emu, dtype, which):
    g = torch.Generator().manual_seed(12)
    n = BLOCK + 999

    def make(name):
        buf = _randn(n + 1, dtype, g)
        return buf[1:] if name == which else buf[:n]

    lam, v, older, x, m = make("lam"), make("v"), [make("older")], make("x"), make("m")
    w = torch.randn(3, generator=g, dtype=torch.float64)
    sc = torch.tensor([1.3], dtype=torch.float64)
    v_in = v.clone()  # the emulated step writes the (maybe misaligned) view itself, the CPU a copy
    res = []
    for fn in (emu.multistep_adjoint, C.multistep_adjoint):
        vv = v if fn is emu.multistep_adjoint else v_in
        dots = torch.zeros(4, dtype=torch.float64)
        gm = fn(lam, vv, sc, older, x, m, w, dots)
        res.append((gm, vv.clone(), dots))
    (gm_e, v_e, d_e), (gm_c, v_c, d_c) = res
    assert torch.equal(gm_e, gm_c) and torch.equal(v_e, v_c)
    _dots_close(d_e, d_c, dtype, lam.double().abs() * x.double().abs())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("J,with_v", [(0, True), (2, False), (3, True)])
def test_adjoint_step_dots_do_not_depend_on_alignment(emu, dtype, J, with_v):
    """As for the update's backward: the dot products of aligned and misaligned inputs with the same values are
    bitwise equal (the same element-to-thread mapping on both paths)."""
    for n in ALIGNMENT_NS:
        g = torch.Generator().manual_seed(n + J)
        lam, v, older, x, m, w, sc = _adjoint_step_inputs(_randn_wide, n, dtype, g, J, with_v)
        res = []
        for prep in (_aligned, _misaligned):
            vv = prep(v) if with_v else None
            dots = torch.zeros(1 + J, dtype=torch.float64)
            gm = emu.multistep_adjoint(prep(lam), vv, sc, [prep(o) for o in older], prep(x), prep(m), w, dots)
            res.append((gm, vv, dots))
        (gm_a, v_a, d_a), (gm_m, v_m, d_m) = res
        assert torch.equal(d_a, d_m), f"n={n}: {(d_a - d_m).tolist()}"
        assert (gm_a is None) == (gm_m is None) and (gm_a is None or torch.equal(gm_a, gm_m))
        assert v_a is None or torch.equal(v_a, v_m)


def test_adjoint_step_empty_and_reproducible(emu):
    e = torch.empty(0, 3)
    dots = torch.full((5,), 7.0, dtype=torch.float64)
    gm = emu.multistep_adjoint(e, e.clone(), torch.ones(1, dtype=torch.float64), [], e, e,
                               torch.ones(2, dtype=torch.float64), dots)
    assert gm.shape == e.shape and torch.equal(dots[:3], torch.zeros(3, dtype=torch.float64))
    g = torch.Generator().manual_seed(11)
    n = 3 * BLOCK + 5
    lam, x, m, o1 = (_randn(n, torch.float32, g) for _ in range(4))
    w = torch.randn(3, generator=g, dtype=torch.float64)
    runs = []
    for _ in range(3):
        d = torch.zeros(5, dtype=torch.float64)
        emu.multistep_adjoint(lam, None, None, [o1, lam], x, m, w, d)
        runs.append(d)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


# ----------------------------------------------------------------------------------------------
# the coefficient table and its backward (one thread per step)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [S.EDM(), S.VPLinear(), S.VPCosine(), S.FlowMatching()], ids=lambda s: s.name)
def test_coefficient_table_matches_cpu(emu, schedule):
    """70 steps: two blocks of 64 threads, the second partly idle.  The same header and the same
    host maths library on both sides: bitwise equal."""
    kind, (p0, p1) = schedule.native_spec()
    t = random_decreasing_grid(schedule.t_max, schedule.t_min, 70, seed=1)
    for solver, order, heun, bh2, corr in [("euler", 1, False, False, False), ("dpmpp", 3, False, False, False),
                                           ("dpmpp", 2, True, False, False), ("unipc", 3, False, True, True),
                                           ("ipndm", 4, False, False, False)]:
        args = (kind, p0, p1, SOLVER_IDS[solver], order, True, heun, bh2, corr)
        tab_e, jac_e = emu.coefficient_table(t, *args)
        tab_c, jac_c = C.coefficient_table(t, *args)
        assert torch.equal(tab_e, tab_c) and torch.equal(jac_e, jac_c)
        gt = torch.randn(tab_c.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        assert torch.equal(emu.coefficient_table_backward(jac_e, gt), C.coefficient_table_backward(jac_c, gt))


# ----------------------------------------------------------------------------------------------
# whole samplers on the emulated kernels (what the CUDA path of ld3_ext/adjoint.py calls)
# ----------------------------------------------------------------------------------------------
class _EmulatedKernels:
    """ld3_ext._C with the update and adjoint kernels replaced by the emulated CUDA ones."""

    def __init__(self, emu):
        self._emu = emu

    def __getattr__(self, name):
        if name in ("multistep_update", "multistep_update_backward", "multistep_adjoint"):
            return getattr(self._emu, name)
        return getattr(C, name)


@pytest.mark.parametrize("make_solver", [
    lambda: ld3_ext.DPMSolverPP(order=3), lambda: ld3_ext.UniPC(order=3), lambda: ld3_ext.IPNDM(order=4),
    lambda: ld3_ext.Heun()], ids=["dpmpp3", "unipc3", "ipndm4", "heun"])
def test_whole_sampler_on_emulated_kernels(emu, monkeypatch, make_solver):
    """Sample + gradients w.r.t. x_T and the grid: equal to the CPU kernels' to rounding, and
    bitwise reproducible run to run."""
    from ld3_ext import adjoint, fused
    schedule = S.EDM()
    W = 0.3 * torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def net(x, t):
        return torch.tanh(x @ W) * (1.0 + 0.01 * t.reshape(-1, 1))
    model = ld3_ext.wrap_model(net, schedule, prediction="x0")
    t0 = torch.linspace(80 ** (1 / 7), 0.002 ** (1 / 7), 7, dtype=torch.float64) ** 7
    x0 = 10 * torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run():
        t = t0.clone().requires_grad_()
        x = x0.clone().requires_grad_()
        y = make_solver().sample(model, x, t)
        assert type(y.grad_fn).__name__ == "_WholeSamplerBackward"
        return [y.detach()] + [v.detach() for v in torch.autograd.grad(y.square().sum(), [x, t])]

    cpu = run()
    kernels = _EmulatedKernels(emu)
    monkeypatch.setattr(adjoint._native, "_C", kernels)
    monkeypatch.setattr(fused, "_C", kernels)
    n0 = emu.launches()
    first, second = run(), run()
    assert emu.launches() > n0, "the emulated kernels were not used"
    for a, b in zip(first, cpu):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
