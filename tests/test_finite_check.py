"""The one-pass NaN/Inf checks (ld3_ext/_finite.py) against torch.isfinite(t).all(), and the claim that the
sampler's checks of x_T and of every model output read a state once (they were 4-5 passes each)."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ld3_ext
from ld3_ext._finite import all_finite, all_finite_tensor
from ld3_ext.schedules import EDM

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BAD = [float("nan"), float("inf"), -float("inf")]


def _both(t):
    got, got_t = all_finite(t), all_finite_tensor(t)
    assert isinstance(got, bool)
    assert got_t.dtype == torch.bool and got_t.dim() == 0 and got_t.device == t.device
    want = bool(torch.isfinite(t).all())
    assert got == want and bool(got_t) == want
    return got


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("where", [0, 4097, -1])
def test_one_bad_value_anywhere_is_found(dtype, bad, where):
    t = torch.randn(3, 5, 37, 41, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert _both(t)
    t.view(-1)[where] = bad
    assert not _both(t)


@pytest.mark.parametrize("dtype", FLOATS)
def test_inf_and_minus_inf_together_is_not_finite(dtype):
    t = torch.zeros(1000, dtype=dtype)
    t[3], t[900] = float("inf"), -float("inf")  # the sum is NaN, not Inf: still refused
    assert not _both(t)


@pytest.mark.parametrize("dtype,big", [(torch.float16, 60000.0), (torch.bfloat16, 3e38), (torch.float32, 3e38),
                                       (torch.float64, 1.7e308)])
def test_a_sum_that_overflows_does_not_fail_finite_values(dtype, big):
    t = torch.full((4096,), big, dtype=dtype)
    assert torch.isinf(t.sum())  # the fast test cannot decide: the exact one must
    assert _both(t)
    t[-1] = float("nan")
    assert not _both(t)
    t[-1] = -big  # large values of both signs, every one finite
    assert _both(t)


def test_layouts_empty_integers_complex_and_graphs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=g)
    cl = x.to(memory_format=torch.channels_last)
    cl[5, 2, 7, 9] = float("nan")
    assert not _both(cl)
    tr = x.transpose(0, 3)
    assert _both(tr)
    x[1, 1, 1, 1] = float("inf")
    assert not _both(tr)
    strided = x[:, :, ::2, ::3]  # the bad element sits between the strides: not part of this view
    assert _both(strided)
    assert not _both(x[:, :, 1::2])
    assert _both(torch.empty(0, 3))
    assert _both(torch.empty(0, dtype=torch.float16))
    assert _both(torch.arange(10))
    assert _both(torch.ones(3, dtype=torch.bool))
    c = torch.randn(10, dtype=torch.complex64)
    assert _both(c)
    c[4] = complex(0.0, float("inf"))
    assert not _both(c)
    w = torch.randn(5, requires_grad=True)
    assert _both(w * 2)
    assert all_finite_tensor(w * 2).grad_fn is None


class _OpCounter(TorchDispatchMode):
    """aten ops that read or write a tensor of ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = list(args) + list((kwargs or {}).values()) + (list(out) if isinstance(out, (tuple, list)) else [out])
        if any(isinstance(a, torch.Tensor) and a.numel() == self.numel for a in leaves):
            self.ops[func.__name__.split(".")[0]] += 1
        return out


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_sampler_checks_read_each_state_once(backend):
    """x_T's check and each model output's check: one sum apiece (isfinite().all() was abs, ne, eq, bitwise
    and, all -- five ops on sample-sized tensors, each a pass)."""
    if backend == "fused" and not ld3_ext._native.native_available():
        pytest.skip("ld3_ext._C is not built")
    x = torch.randn(4, 3, 8, 8)
    model = ld3_ext.wrap_model(lambda xx, tt: 0.9 * xx, EDM(), prediction="x0")  # check_output on (default)
    steps = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.1], dtype=torch.float64)
    counter = _OpCounter(x.numel())
    with counter:
        ld3_ext.DPMSolverPP(order=2, backend=backend).sample(model, x, steps)
    for op in ("isfinite", "abs", "ne", "eq", "logical_and", "bitwise_and", "all", "aminmax"):
        assert counter.ops[op] == 0, (op, counter.ops)
    assert counter.ops["sum"] == 1 + 4  # x_T, then the 4 model outputs


def test_functional_sample_checks_x_once():
    """ld3_ext.sample checks x (to name it "x"), then the solver checks it as x_T: a sum each."""
    x = torch.randn(4, 3, 8, 8)
    sigmas = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.1], dtype=torch.float64)
    counter = _OpCounter(x.numel())
    with counter:
        ld3_ext.sample(lambda xx, s: 0.9 * xx, x, sigmas, check_output=False)
    assert not {"isfinite", "abs", "ne", "eq"} & set(counter.ops), counter.ops
    assert counter.ops["sum"] == 2
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        ld3_ext.sample(lambda xx, s: 0.9 * xx, bad, sigmas)


def test_bad_x_T_and_bad_model_output_are_still_refused():
    model = ld3_ext.wrap_model(lambda xx, tt: 0.9 * xx, EDM(), prediction="x0")
    steps = torch.tensor([80.0, 20.0, 5.0, 1.0], dtype=torch.float64)
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 3, 3] = -float("inf")
    with pytest.raises(ValueError, match="x_T"):
        ld3_ext.DPMSolverPP(order=2).sample(model, x, steps)
    bad = ld3_ext.wrap_model(lambda xx, tt: xx if float(tt[0]) > 10 else xx / 0 * 0, EDM(), prediction="x0")
    with pytest.raises(ld3_ext.ModelOutputError, match="NaN/Inf at step 2"):
        ld3_ext.DPMSolverPP(order=2).sample(bad, torch.randn(2, 3, 4, 4), steps)
    # deferred (the CUDA mode, usable anywhere): read back once, same message
    with pytest.raises(ld3_ext.ModelOutputError, match="NaN/Inf at step 2"):
        with bad.deferred_output_checks():
            ld3_ext.DPMSolverPP(order=2).sample(bad, torch.randn(2, 3, 4, 4), steps)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [getattr(torch, n) for n in ("float8_e5m2", "complex32")
                                   if hasattr(torch, n)])
def test_dtypes_without_sum_or_aminmax_kernels_take_isfinite(dtype):
    """float8 and complex32 have isfinite but no sum/aminmax kernel: checked as before, not a NotImplementedError."""
    t = torch.zeros(6, dtype=dtype)
    assert _both(t)
    t[2] = float("nan")
    assert not _both(t)


def test_subclasses_and_non_tensors():
    p = torch.nn.Parameter(torch.randn(4))
    assert _both(p)
    with torch.no_grad():
        p[1] = float("inf")
    assert not _both(p)
    with pytest.raises(TypeError, match="tuple"):
        all_finite((torch.ones(2),))
    with pytest.raises(TypeError, match="list"):
        all_finite_tensor([1.0])


def test_a_float8_network_under_deferred_checks_samples():
    """Its output is cast to the state's dtype and checked in both (the overflow note): both checks must serve it."""
    if not hasattr(torch, "float8_e5m2"):
        pytest.skip("this torch has no float8")
    model = ld3_ext.wrap_model(lambda xx, tt: (0.9 * xx).to(torch.float8_e5m2), EDM(), prediction="x0")
    steps = torch.tensor([80.0, 20.0, 5.0, 1.0], dtype=torch.float64)
    x = torch.randn(2, 3, 4, 4)
    with model.deferred_output_checks():
        y = ld3_ext.DPMSolverPP(order=2).sample(model, x, steps)
    assert torch.isfinite(y).all()
    bad = ld3_ext.wrap_model(lambda xx, tt: (xx * float("inf")).to(torch.float8_e5m2), EDM(), prediction="x0")
    with pytest.raises(ld3_ext.ModelOutputError, match="NaN/Inf at step 0"):
        ld3_ext.DPMSolverPP(order=2).sample(bad, x, steps)


@pytest.mark.filterwarnings("ignore:the model has no weights to hash")
def test_teacher_fn_returning_a_non_tensor_is_named():
    from ld3_ext.training.teacher import generate_teacher_data
    model = ld3_ext.wrap_model(lambda xx, tt: 0.9 * xx, EDM(), prediction="x0")
    with pytest.raises(TypeError, match="teacher_fn must return a tensor.*tuple"):
        generate_teacher_data(model, lambda z, **kw: (z,), {"solver": "x"}, 4, (2,), progress=False)
