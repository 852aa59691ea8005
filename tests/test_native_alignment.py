"""Tensors whose data starts at an odd byte offset (torch.frombuffer(buf, offset=1)) and outputs whose elements may
collide.  The kernels read and write through typed pointers: a misaligned view was read in place (undefined
behaviour, reported by UBSan), and an as_strided out whose elements collide was written with a garbage result
(fuzz audit).  Inputs are now realigned by a copy and give the aligned inputs' result bitwise; a misaligned or
possibly self-overlapping output is refused, naming it.  Also run under ASan+UBSan (scripts/sanitizer_check.sh)."""
from __future__ import annotations

import pytest
import torch

from ld3_ext import _native

pytestmark = pytest.mark.skipif(not _native.native_available(), reason="ld3_ext._C is not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _odd(values: torch.Tensor) -> torch.Tensor:
    """A copy of ``values`` (1-D) whose data starts one byte past an aligned address."""
    n, es = values.numel(), values.element_size()
    buf = bytearray(es * (n + 1))
    t = torch.frombuffer(buf, dtype=values.dtype, offset=1, count=n)
    assert t.data_ptr() % es != 0
    t.copy_(values)
    t._keep = buf  # the buffer must outlive the view
    return t


def _rand(n, dtype, g):
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


def _C():
    return _native.get()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["x", "history", "coef", "all"])
def test_update_reads_misaligned_inputs_as_aligned_ones(dtype, which):
    g = torch.Generator().manual_seed(1)
    n = 1003
    x, h0, h1 = (_rand(n, dtype, g) for _ in range(3))
    coef = torch.tensor([0.9, 0.3, -0.2], dtype=torch.float64)
    want = _C().multistep_update(x, coef, [h0, h1])
    args = [x, coef, [h0, h1]]
    if which in ("x", "all"):
        args[0] = _odd(x)
    if which in ("history", "all"):
        args[2] = [_odd(h0), _odd(h1)]
    if which in ("coef", "all"):
        args[1] = _odd(coef)
    got = _C().multistep_update(*args)
    assert torch.equal(got, want)
    assert got.data_ptr() % got.element_size() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_backward_reads_a_misaligned_grad_as_an_aligned_one(dtype):
    g = torch.Generator().manual_seed(2)
    n = 517
    grad, x, h0 = (_rand(n, dtype, g) for _ in range(3))
    coef = torch.tensor([0.9, 0.3], dtype=torch.float64)
    want = _C().multistep_update_backward(grad, x, coef, [h0])
    got = _C().multistep_update_backward(_odd(grad), _odd(x), _odd(coef), [_odd(h0)])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2][0], want[2][0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_adjoint_step_reads_misaligned_inputs_as_aligned_ones(dtype):
    g = torch.Generator().manual_seed(3)
    n = 701
    lam, v, old, x, m = (_rand(n, dtype, g) for _ in range(5))
    w = torch.tensor([0.5, -0.25, 0.125], dtype=torch.float64)
    scale = torch.tensor([0.7], dtype=torch.float64)
    v_want, d_want = v.clone(), torch.zeros(4, dtype=torch.float64)
    gm_want = _C().multistep_adjoint(lam, v_want, scale, [old], x, m, w, d_want)
    v_got, d_got = v.clone(), torch.zeros(4, dtype=torch.float64)
    gm_got = _C().multistep_adjoint(_odd(lam), v_got, _odd(scale), [_odd(old)], _odd(x), _odd(m), _odd(w), d_got)
    assert torch.equal(gm_got, gm_want) and torch.equal(v_got, v_want) and torch.equal(d_got, d_want)


def test_coefficient_table_and_its_backward_read_misaligned_inputs_as_aligned_ones():
    t = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.3, 0.002], dtype=torch.float64)
    args = (0, 0.0, 0.0, 1, 3, False, False, False, True)  # EDM, DPM-Solver++(3M)
    tab, jac = _C().coefficient_table(t, *args)
    tab_odd, jac_odd = _C().coefficient_table(_odd(t), *args)
    assert torch.equal(tab_odd, tab) and torch.equal(jac_odd, jac)
    grad = torch.randn(tab.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = _C().coefficient_table_backward(jac, grad)
    got = _C().coefficient_table_backward(_odd(jac.reshape(-1)).view(jac.shape), _odd(grad.reshape(-1)).view(grad.shape))
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_misaligned_out_is_refused_naming_it(dtype):
    x = torch.randn(64).to(dtype)
    coef = torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"multistep_update: out is written in place and its data is not aligned "
                                           rf"to its {x.element_size()}-byte elements"):
        _C().multistep_update(x, coef, [], _odd(torch.zeros(64, dtype=dtype)))


def test_misaligned_v_or_dots_of_the_adjoint_step_are_refused_naming_them():
    lam, v, x, m = (torch.randn(33) for _ in range(4))
    w = torch.tensor([0.5], dtype=torch.float64)
    scale = torch.tensor([0.7], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"multistep_adjoint: v is written in place and its data is not aligned"):
        _C().multistep_adjoint(lam, _odd(v), scale, [], x, m, w, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"multistep_adjoint: dots is written in place and its data is not aligned"):
        _C().multistep_adjoint(lam, v.clone(), scale, [], x, m, w, _odd(torch.zeros(2, dtype=torch.float64)))


@pytest.mark.parametrize("shape, strides", [((3, 3), (2, 1)), ((4, 2), (1, 2)), ((3,), (0,)), ((2, 3), (1, 1))])
def test_an_out_whose_elements_may_collide_is_refused_naming_it(shape, strides):
    """as_strided((3, 3), (2, 1)) passed at::assert_no_internal_overlap (it cannot decide) and was written with
    colliding elements: out came back [[0, 1, 3], [3, 4, 6], [6, 7, 8]] for x = 0..8."""
    n = 1
    for s in shape:
        n *= s
    out = torch.zeros(64).as_strided(shape, strides)
    x = torch.arange(float(n)).reshape(shape)
    with pytest.raises(RuntimeError, match=r"multistep_update: out has elements that share memory, or strides "):
        _C().multistep_update(x, torch.tensor([1.0], dtype=torch.float64), [], out)


@pytest.mark.parametrize("shape, strides", [((3, 3), (3, 1)), ((3, 3), (1, 3)), ((3, 3), (4, 1)), ((2, 3), (10, 3)),
                                            ((3, 1), (1, 0)), ((1, 4), (0, 2))])
def test_an_out_with_distinct_elements_is_written_whatever_its_strides(shape, strides):
    n = 1
    for s in shape:
        n *= s
    base = torch.full((64,), -1.0)
    out = base.as_strided(shape, strides)
    x = torch.arange(float(n)).reshape(shape)
    res = _C().multistep_update(x, torch.tensor([2.0], dtype=torch.float64), [], out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, 2 * x)


class _OddGradScale(torch.autograd.Function):
    """0.9 * x whose backward returns its gradient at an odd byte offset (a custom Function may)."""

    @staticmethod
    def forward(ctx, x):
        return 0.9 * x

    @staticmethod
    def backward(ctx, g):
        return _odd((0.9 * g).reshape(-1)).view(g.shape)


def test_a_network_gradient_at_an_odd_offset_is_realigned_for_the_adjoint_walk():
    """The whole-sampler backward writes lambda_i into the network's input gradient v in place: a v at an odd byte
    offset would be refused by the kernel (a user-facing error from inside the walk), so it is copied first."""
    import ld3_ext
    sched = ld3_ext.EDM()
    model = ld3_ext.wrap_model(lambda x, t: _OddGradScale.apply(x), sched, prediction="x0")
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 80
    steps = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.3, 0.002], dtype=torch.float64)
    grads = {}
    for backend in ("reference", "fused"):
        x = x_T.clone().requires_grad_()
        t = steps.clone().requires_grad_()
        y = ld3_ext.DPMSolverPP(order=3, backend=backend).sample(model, x, t)
        grads[backend] = (y.detach(), *torch.autograd.grad(y.square().sum(), (x, t)))
    for a, b in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_an_empty_out_with_any_strides_is_taken():
    """A zero-size out of strides (0, 2, 1) has no elements to collide (the hypothesis fuzz found the refusal)."""
    x = torch.empty(3, 0, 2, dtype=torch.float64)
    out = torch.empty(3, 0, 2, dtype=torch.float64).as_strided((3, 0, 2), (0, 2, 1))
    res = _C().multistep_update(x, torch.tensor([1.5, -0.3], dtype=torch.float64), [x.clone()], out)
    assert res.shape == (3, 0, 2)
