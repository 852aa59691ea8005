"""The fused native kernels against the pure-PyTorch reference: values, every gradient, determinism,
bad input, and the torch.library registration used by torch.compile."""
from __future__ import annotations

import itertools
import os
import time

import pytest
import torch

from ld3_ext import _native

if not _native.native_available():  # only a missing build may skip this file
    pytest.skip(f"ld3_ext._C is not built: {_native.load_error()}", allow_module_level=True)

from ld3_ext import fused, ops  # noqa: E402
from ld3_ext import schedules as S  # noqa: E402
from ld3_ext.coefficients import MAX_ORDER, SOLVER_IDS, SolverSpec, coefficient_table_reference  # noqa: E402

C = _native.get()

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# relative tolerance of an output/gradient element, scaled by the sum of |terms| feeding it
RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(dtype, k, shape=(3, 4, 33, 17), noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make():
        if noncontig:  # transposed view of a strided buffer
            big = torch.randn(shape[0], shape[1], shape[3], shape[2] * 2, generator=g, dtype=torch.float64).to(dtype)
            return big[..., ::2].transpose(-1, -2)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    x = make()
    hist = [make() for _ in range(k)]
    coef = torch.randn(1 + k, generator=g, dtype=torch.float64)
    return x, coef, hist


def _close(actual, expected, scale, dtype, what):
    err = (actual.double() - expected.double()).abs()
    bound = RTOL[dtype] * scale.double() + 1e-300
    assert bool((err <= bound).all()), f"{what}: max excess {float((err / bound).max()):.3g}x tolerance"


@pytest.mark.parametrize("noncontig", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_forward_backward_matches_reference(dtype, k, noncontig):
    x, coef, hist = _inputs(dtype, k, noncontig=noncontig, seed=k)
    if noncontig:
        assert not x.is_contiguous()
    leaves_f = [t.clone().requires_grad_() for t in (x, coef, *hist)]
    leaves_r = [t.clone().requires_grad_() for t in (x, coef, *hist)]
    out_f = fused.multistep_update(leaves_f[0], leaves_f[1], leaves_f[2:])
    out_r = ops.multistep_update_reference(leaves_r[0], leaves_r[1], leaves_r[2:])
    assert out_f.dtype == dtype and out_f.shape == x.shape
    scale = coef[0].abs() * x.double().abs() + sum(coef[1 + j].abs() * m.double().abs() for j, m in enumerate(hist))
    _close(out_f, out_r, scale, dtype, "forward")

    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(dtype)
    (out_f * w).double().sum().backward()
    (out_r * w).double().sum().backward()
    gx_f, gc_f, *gh_f = [t.grad for t in leaves_f]
    gx_r, gc_r, *gh_r = [t.grad for t in leaves_r]
    _close(gx_f, gx_r, coef[0].abs() * w.double().abs(), dtype, "grad x")
    for j in range(k):
        _close(gh_f[j], gh_r[j], coef[1 + j].abs() * w.double().abs(), dtype, f"grad history[{j}]")
    assert gc_f.dtype == torch.float64 and gc_f.shape == coef.shape
    # the coefficient gradient is a dot product: scale by sum |w||m|, plus the reference's own
    # low-precision summation error for half types
    dots_scale = torch.stack([(w.double().abs() * t.double().abs()).sum() for t in (x, *hist)])
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert bool(((gc_f - gc_r).abs() <= tol * dots_scale).all()), (gc_f, gc_r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_out_may_alias_x(dtype):
    x, coef, hist = _inputs(dtype, 3, shape=(2, 70001))
    expected = ops.multistep_update_reference(x, coef, hist)
    y = x.clone()
    res = fused.multistep_update(y, coef, hist, out=y)
    assert res.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # separate, non-contiguous out
    buf = torch.empty(70001, 2, dtype=dtype).t()
    fused.multistep_update(x, coef, hist, out=buf)
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)


@pytest.fixture
def stream_threshold():
    """Sets the non-temporal-store threshold for one test and restores the previous one."""
    from ld3_ext import _native
    if not _native.native_available():
        pytest.skip("needs the native extension")
    C = _native._C
    previous = C.set_stream_min_bytes(-1)
    C.set_stream_min_bytes(previous)
    yield C.set_stream_min_bytes
    C.set_stream_min_bytes(previous)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("threshold", [0, -1])
def test_large_float32_streamed_path_is_exact(k, offset, threshold, stream_threshold):
    """With non-temporal stores forced on (threshold 0) and off (-1): bitwise equal to the reference,
    also for an output that starts off a 16-byte boundary and for out=x."""
    stream_threshold(threshold)
    n = (1 << 17) + 5
    g = torch.Generator().manual_seed(k)
    base = [torch.randn(n + offset, generator=g) for _ in range(k + 1)]
    x, hist = base[0][offset:], [b[offset:] for b in base[1:]]
    coef = torch.randn(1 + k, generator=g, dtype=torch.float64)
    expected = ops.multistep_update_reference(x, coef, hist)
    assert torch.equal(fused.multistep_update(x, coef, hist), expected)
    y = x.clone()
    fused.multistep_update(y, coef, hist, out=y)
    assert torch.equal(y, expected)
    buf = torch.empty(n + offset)[offset:]  # an output that starts off a 16-byte boundary
    fused.multistep_update(x, coef, hist, out=buf)
    assert torch.equal(buf, expected)


def test_stream_threshold_setting(stream_threshold):
    """The default streams only outputs far larger than the caches (the L2 size, at least 8 MiB);
    the setter returns the previous value and any negative value means never."""
    import os
    default = stream_threshold(-5)
    env = os.environ.get("LD3_STREAM_MIN_BYTES")
    if env:  # set at load by the variable
        assert default == int(env)
    else:
        assert default >= (8 << 20)
    assert stream_threshold(123) == -1
    assert stream_threshold(-1) == 123


@pytest.mark.parametrize("value,expected", [("-1", -1), ("-7", -1), ("0", 0), ("5000", 5000), ("junk", None)])
def test_stream_threshold_environment_variable(value, expected, tmp_path):
    """LD3_STREAM_MIN_BYTES at load means what the setter's argument means (negative: never); a value that is
    not an integer leaves the default."""
    import subprocess
    import sys
    env = {**os.environ, "LD3_STREAM_MIN_BYTES": value}
    # outside the checkout: there the source tree's ld3_ext (no built _C) would shadow the installed one
    res = subprocess.run([sys.executable, "-c", "import ld3_ext._C as C; print(C.set_stream_min_bytes(0))"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = int(res.stdout.strip())
    assert got == expected if expected is not None else got >= (8 << 20)


def test_out_rejects_autograd():
    x, coef, hist = _inputs(torch.float64, 1)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="out="):
        fused.multistep_update(x, coef, hist, out=torch.empty_like(x))


def test_coef_may_be_longer_row_and_table_slice():
    x, coef, hist = _inputs(torch.float64, 2)
    row = torch.cat([coef, torch.randn(2, dtype=torch.float64)])  # [1+K+2] entries: extra ignored
    torch.testing.assert_close(fused.multistep_update(x, row, hist), ops.multistep_update_reference(x, coef, hist))
    row.requires_grad_()
    fused.multistep_update(x, row, hist).sum().backward()
    assert torch.all(row.grad[3:] == 0)


def test_zero_size():
    x = torch.empty(0, 3, dtype=torch.float32, requires_grad=True)
    h = [torch.empty(0, 3, requires_grad=True) for _ in range(2)]
    c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    y = fused.multistep_update(x, c, h)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 3) and torch.all(c.grad == 0) and h[1].grad.shape == (0, 3)


@pytest.mark.parametrize("k", [1, 4])
def test_gradcheck_update(k):
    x, coef, hist = _inputs(torch.float64, k, shape=(3, 7))
    args = [t.clone().requires_grad_() for t in (x, coef, *hist)]
    assert torch.autograd.gradcheck(lambda x, c, *h: fused.multistep_update(x, c, h), args)


def test_gradcheck_update_noncontiguous():
    x, coef, hist = _inputs(torch.float64, 2, shape=(1, 2, 5, 3), noncontig=True)
    args = [t.detach().requires_grad_() for t in (x, coef, *hist)]
    assert torch.autograd.gradcheck(lambda x, c, *h: fused.multistep_update(x, c, h), args)


def test_partial_needs_input_grad():
    x, coef, hist = _inputs(torch.float32, 3)
    hist[1] = hist[1].clone().requires_grad_()
    out = fused.multistep_update(x, coef, hist)
    out.sum().backward()
    torch.testing.assert_close(hist[1].grad, torch.full_like(x, float(coef[2])))


def test_backward_reduction_is_thread_count_invariant():
    n = 5 * C.reduce_chunk + 12345  # several chunks plus a ragged tail
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g)
    hist = [torch.randn(n, generator=g) for _ in range(3)]
    grad = torch.randn(n, generator=g)
    coef = torch.randn(4, dtype=torch.float64, generator=g)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 4):  # 3 and 4 oversubscribe a 2-core machine: still a different split
            torch.set_num_threads(threads)
            results.append(C.multistep_update_backward(grad, x, coef, hist, True, True, True))
    finally:
        torch.set_num_threads(before)
    gx1, gc1, gm1 = results[0]
    for gx2, gc2, gm2 in results[1:]:
        assert torch.equal(gc1, gc2)  # bitwise, not approximately
        assert torch.equal(gx1, gx2) and all(torch.equal(a, b) for a, b in zip(gm1, gm2))
    # and accurate: the float products summed in double (exact products, double rounding)
    ref = torch.stack([(grad.double() * t.double()).sum() for t in (x, *hist)])
    scale = torch.stack([(grad.double() * t.double()).abs().sum() for t in (x, *hist)])
    assert bool(((gc1 - ref).abs() <= 1e-13 * scale).all())
    gc64 = C.multistep_update_backward(grad.double(), x.double(), coef, [h.double() for h in hist],
                                       False, True, False)[1]
    assert bool(((gc64 - ref).abs() <= 1e-13 * scale).all())


# ---------------------------------------------------------------------------------------------
# coefficient table and its Jacobian
# ---------------------------------------------------------------------------------------------
SCHEDULES = [S.EDM(), S.VPLinear(), S.VPCosine(), S.FlowMatching()]


def _specs():
    for kind in SOLVER_IDS:
        for order in range(1, MAX_ORDER[kind] + 1):
            types = ["midpoint", "heun"] if kind == "dpmpp" and order >= 2 else ["midpoint"]
            variants = ["bh1", "bh2"] if kind == "unipc" else ["bh1"]
            correctors = [True, False] if kind == "unipc" else [True]
            for st, var, corr, lof in itertools.product(types, variants, correctors, [True, False]):
                yield SolverSpec(kind, order, lof, st, var, corr)


def _grid(schedule, n, seed):
    """A random strictly decreasing grid from t_max to t_min."""
    g = torch.Generator().manual_seed(seed)
    inner = torch.rand(n - 1, generator=g, dtype=torch.float64).sort(descending=True).values
    u = torch.cat([torch.ones(1, dtype=torch.float64), 0.05 + 0.9 * inner, torch.zeros(1, dtype=torch.float64)])
    return schedule.t_min + (schedule.t_max - schedule.t_min) * u


def _dense_jacobian(jac, n_t):
    n = jac.shape[0]
    dense = torch.zeros(n, 2, 5, n_t, dtype=jac.dtype)
    for i in range(1, n + 1):
        for j in range(4):
            if i - 3 + j >= 0:
                dense[i - 1, :, :, i - 3 + j] = jac[i - 1, :, :, j]
            else:
                assert torch.all(jac[i - 1, :, :, j] == 0)
    return dense


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_coefficient_table_and_jacobian_match_reference(schedule):
    kind_id, (p0, p1) = schedule.native_spec()
    for case, spec in enumerate(_specs()):
        t = _grid(schedule, 6, seed=case)
        ref_fn = lambda tt: coefficient_table_reference(schedule, tt, spec)  # noqa: E731
        ref = ref_fn(t)
        table, jac = C.coefficient_table(t, kind_id, p0, p1, SOLVER_IDS[spec.kind], spec.order,
                                         spec.lower_order_final, spec.solver_type == "heun", spec.variant == "bh2",
                                         spec.has_corrector)
        assert table.shape == (6, 2, 5) and jac.shape == (6, 2, 5, 4)
        # elementwise 1e-12 relative to the row's magnitude (entries can be cancellation-small)
        row_scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        assert float(((table - ref).abs() / row_scale).max()) < 1e-12, spec
        assert torch.equal(table == 0, ref == 0), spec  # zero layout is identical
        jref = torch.autograd.functional.jacobian(ref_fn, t, vectorize=True)
        jscale = jref.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
        err = float(((_dense_jacobian(jac, t.numel()) - jref).abs() / jscale).max())
        assert err < 1e-10, (spec, err)


def test_coefficient_table_gradcheck_and_fused_entry():
    for schedule, spec in [(S.VPLinear(), SolverSpec("unipc", 3, variant="bh2")), (S.EDM(), SolverSpec("dpmpp", 3)),
                           (S.FlowMatching(), SolverSpec("ipndm", 4)), (S.VPCosine(), SolverSpec("dpmpp", 2, solver_type="heun"))]:
        t = _grid(schedule, 7, seed=1).requires_grad_()
        assert torch.autograd.gradcheck(lambda tt: fused.coefficient_table(schedule, tt, spec), (t,))
        torch.testing.assert_close(ops.coefficient_table(schedule, t, spec, backend="fused"),
                                   coefficient_table_reference(schedule, t, spec), rtol=1e-12, atol=1e-13)


def test_coefficient_table_short_grids():
    for n in (1, 2, 3):
        for spec in (SolverSpec("dpmpp", 3), SolverSpec("unipc", 3), SolverSpec("ipndm", 4)):
            t = _grid(S.EDM(), n, seed=n).requires_grad_()
            out = fused.coefficient_table(S.EDM(), t, spec)
            ref = coefficient_table_reference(S.EDM(), t, spec)
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
            g = torch.randn_like(out)
            (gf,) = torch.autograd.grad(out, t, g)
            (gr,) = torch.autograd.grad(ref, t, g)
            torch.testing.assert_close(gf, gr, rtol=1e-10, atol=1e-12)


def test_subclass_changing_the_schedule_does_not_inherit_the_native_form():
    """A subclass of a closed-form schedule with its own log_sigma is another schedule: the fused
    backend must not compute its parent's closed form for it (it takes the Python table instead)."""
    class Stretched(S.EDM):
        def log_sigma(self, t):
            return torch.log(t) + torch.log1p(t)

    class Renamed(S.EDM):  # same noise levels: keeps the native form
        name = "renamed_edm"

    assert Stretched().native_spec() is None and Renamed().native_spec() == S.EDM().native_spec()
    t = torch.tensor([80.0, 10.0, 1.0, 0.1], dtype=torch.float64)
    spec = SolverSpec("dpmpp", 2)
    fused_table = ops.coefficient_table(Stretched(), t, spec, backend="fused")
    torch.testing.assert_close(fused_table, coefficient_table_reference(Stretched(), t, spec), rtol=1e-12, atol=1e-12)


def test_subclass_taking_the_schedule_from_a_mixin_does_not_inherit_the_native_form():
    """The same rule when the new log_sigma comes from a mixin listed before the closed-form parent (it is not
    in the subclass's own body): the fused backend must still not compute the parent's closed form."""
    class StretchMixin:
        def log_sigma(self, t):
            return torch.log(t) + torch.log1p(t)

    class Stretched(StretchMixin, S.EDM):
        pass

    class Sub(Stretched):  # inherits Stretched's (Python) native_spec
        pass

    assert Stretched().native_spec() is None and Sub().native_spec() is None
    t = torch.tensor([80.0, 10.0, 1.0, 0.1], dtype=torch.float64)
    spec = SolverSpec("dpmpp", 2)
    fused_table = ops.coefficient_table(Stretched(), t, spec, backend="fused")
    torch.testing.assert_close(fused_table, coefficient_table_reference(Stretched(), t, spec), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attr", ["log_sigma", "log_alpha"])
def test_formula_replaced_on_an_instance_takes_the_python_table(attr):
    """``s.log_sigma = f`` on one instance: the C++ code cannot see f, so native_spec() says None for that instance
    (the class and its other instances keep the native form) and the fused table equals the reference with f.
    Before, the fused table and the grid check's screen computed the untouched closed form."""
    patched, plain = S.EDM(), S.EDM()
    setattr(patched, attr, lambda t: torch.log(t) + torch.log1p(t) if attr == "log_sigma" else -torch.log1p(t) / 4)
    assert patched.native_spec() is None and plain.native_spec() == (S.KIND_EDM, [0.0, 0.0])
    assert S.EDM.native_spec.__name__ == "native_spec"
    t = torch.tensor([80.0, 10.0, 1.0, 0.1], dtype=torch.float64)
    spec = SolverSpec("dpmpp", 2)
    fused_table = ops.coefficient_table(patched, t, spec, backend="fused")
    torch.testing.assert_close(fused_table, coefficient_table_reference(patched, t, spec), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fused_table, ops.coefficient_table(plain, t, spec, backend="fused"))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3)
    c = torch.ones(3, dtype=torch.float64)
    h = [torch.randn(2, 3), torch.randn(2, 3)]
    with pytest.raises(ValueError, match=r"history\[1\] has shape"):
        fused.multistep_update(x, c, [h[0], torch.randn(3, 2)])
    with pytest.raises(TypeError, match=r"history\[0\] has dtype"):
        fused.multistep_update(x, c, [h[0].double(), h[1]])
    with pytest.raises(ValueError, match="at most 4"):
        fused.multistep_update(x, torch.ones(5, dtype=torch.float64), [x] * 5)
    with pytest.raises(ValueError, match="coef"):
        fused.multistep_update(x, torch.ones(2, dtype=torch.float64), h)
    with pytest.raises(ValueError, match="coef"):
        fused.multistep_update(x, torch.ones(1, 3, dtype=torch.float64), h)
    with pytest.raises(TypeError, match="x must be float"):
        fused.multistep_update(torch.ones(2, 3, dtype=torch.int64), c, [])
    with pytest.raises(TypeError, match="coef"):
        fused.multistep_update(x, torch.ones(3, dtype=torch.int64), h)
    with pytest.raises(ValueError, match="coef is on meta"):
        fused.multistep_update(x, c.to("meta"), h)
    with pytest.raises(ValueError, match=r"history\[0\] is on meta"):
        fused.multistep_update(x, c, [h[0].to("meta"), h[1]])
    # the C++ layer checks too (no crash when called directly)
    with pytest.raises(RuntimeError, match=r"history\[1\] has shape"):
        C.multistep_update(x, c, [h[0], torch.randn(6)])
    with pytest.raises(RuntimeError, match="coef must be float64"):
        C.multistep_update(x, c.float(), h)
    with pytest.raises(RuntimeError, match="x must be float16"):
        C.multistep_update(x.int(), c, [])
    with pytest.raises(RuntimeError, match="at most 4"):
        C.multistep_update(x, torch.ones(5, dtype=torch.float64), [x] * 5)
    with pytest.raises(RuntimeError, match="timesteps"):
        C.coefficient_table(torch.ones(1, dtype=torch.float64), 0, 0.0, 0.0, 1, 1, True, False, False, False)
    with pytest.raises(RuntimeError, match="order"):
        C.coefficient_table(torch.ones(4, dtype=torch.float64), 0, 0.0, 0.0, 1, 4, True, False, False, False)
    with pytest.raises(ValueError, match="native"):
        fused.coefficient_table(S.VPDiscrete.linear(num_train_timesteps=20), torch.linspace(1, 0.1, 4), SolverSpec("dpmpp", 2))


def test_out_partially_overlapping_an_input_is_named():
    """An out= that shares only some memory with x or a history tensor is refused naming that argument
    (an exact alias is fine: each element is read before it is written)."""
    buf = torch.randn(20)
    coef = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    x, h0 = torch.randn(16), torch.randn(16)
    with pytest.raises(RuntimeError, match=r"out partially overlaps x"):
        fused.multistep_update(buf[:16], coef, [h0, h0], out=buf[4:])
    with pytest.raises(RuntimeError, match=r"out partially overlaps history\[1\]"):
        fused.multistep_update(x, coef, [h0, buf[:16]], out=buf[4:])
    expected = ops.multistep_update_reference(x, coef, [h0, buf[4:].clone()])
    assert torch.equal(fused.multistep_update(x, coef, [h0, buf[4:]], out=buf[4:]), expected)


def test_self_overlap_check_uses_torchs_own_test():
    """fused._self_overlapping asks torch (torch._debug_has_internal_overlap; the lookup once named only torch._C's,
    absent in this torch, and silently fell back to a zero-stride rule)."""
    assert fused._has_internal_overlap is not None
    assert fused._self_overlapping(torch.zeros(1).expand(3))
    assert not fused._self_overlapping(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------
def test_opcheck():
    x, coef, hist = _inputs(torch.float32, 3, shape=(2, 9))
    x.requires_grad_()
    torch.library.opcheck(torch.ops.ld3_ext.multistep_update.default, (x, coef.requires_grad_(), hist))
    torch.library.opcheck(torch.ops.ld3_ext.multistep_update_backward.default, (torch.randn(2, 9), x.detach(), coef.detach(), hist))
    t = _grid(S.VPLinear(), 5, seed=0).requires_grad_()
    torch.library.opcheck(torch.ops.ld3_ext.coefficient_table.default,
                          (t, 1, 0.1, 20.0, SOLVER_IDS["unipc"], 3, True, False, True, True))
    jac = C.coefficient_table(t.detach(), 1, 0.1, 20.0, SOLVER_IDS["unipc"], 3, True, False, True, True)[1]
    torch.library.opcheck(torch.ops.ld3_ext.coefficient_table_backward.default,
                          (jac, torch.randn(jac.shape[:3], dtype=torch.float64), t.detach()))


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_a_compiled_double_backward_through_the_fused_table_is_refused_not_zero(backend):
    """The compiled table's backward is J^T g with J a constant of the graph: a Hessian-vector product through it
    came out as zeros (AOT autograd took the gradient for a constant of t).  It now raises, as the compiled
    reference does; eager mode gives the exact HVP."""
    schedule, spec = S.VPCosine(s=0.02), SolverSpec("dpmpp", 3)
    grid = torch.linspace(schedule.t_max, schedule.t_min, 7, dtype=torch.float64)
    f = lambda tt: ops.coefficient_table(schedule, tt, spec, "fused", validate=False).pow(2).sum()  # noqa: E731
    torch._dynamo.reset()
    t = grid.clone().requires_grad_()
    g, = torch.autograd.grad(torch.compile(f, backend=backend)(t), t, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|second derivatives of the fused coefficient table"):
        torch.autograd.grad(g.sum(), t, allow_unused=True)
    t = grid.clone().requires_grad_()
    g, = torch.autograd.grad(f(t), t, create_graph=True)
    h, = torch.autograd.grad(g.sum(), t)
    assert h.abs().max() > 1.0


def test_torch_compile_fullgraph_smoke():
    schedule, spec = S.VPLinear(), SolverSpec("dpmpp", 2)

    def step(x, m0, m1, t):
        table = fused.coefficient_table(schedule, t, spec)
        y = fused.multistep_update(x, table[1, 0, :3], [m0, m1])
        return fused.multistep_update(y, table[2, 0, :3], [m0, y])

    x, _, (m0, m1) = _inputs(torch.float32, 2, shape=(2, 3, 8, 8))
    t = _grid(schedule, 4, seed=0)
    t_e, t_c = t.clone().requires_grad_(), t.clone().requires_grad_()
    start = time.time()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y_c = compiled(x, m0, m1, t_c)
    y_e = step(x, m0, m1, t_e)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    y_c.sum().backward()
    y_e.sum().backward()
    torch.testing.assert_close(t_c.grad, t_e.grad, rtol=1e-12, atol=1e-12)
    assert time.time() - start < 60


# ---------------------------------------------------------------------------------------------
# drop-in: whole solvers give the reference path's results, gradients included
# ---------------------------------------------------------------------------------------------
def _solver_cases():
    import ld3_ext
    return [ld3_ext.DPMSolverPP(order=3), ld3_ext.DPMSolverPP(order=2, solver_type="heun"),
            ld3_ext.UniPC(order=3, variant="bh2"), ld3_ext.UniPC(order=2), ld3_ext.IPNDM(order=4),
            ld3_ext.Euler()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solvers_fused_backend_matches_reference(dtype):
    import copy

    import ld3_ext
    for schedule in (S.EDM(), S.VPLinear()):
        pred = "x0"
        # each run all reference or all fused, the model wrapper's x0 <-> eps conversion included
        models = {b: ld3_ext.wrap_model(lambda x, t: torch.tanh(0.7 * x), schedule, prediction=pred, backend=b)
                  for b in ("reference", "fused")}
        g = torch.Generator().manual_seed(0)
        x_T = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) * schedule.prior_std()).to(dtype)
        t = _grid(schedule, 7, seed=5)
        w = torch.randn(x_T.shape, generator=g, dtype=torch.float64).to(dtype)
        for solver in _solver_cases():
            outs = {}
            for backend, dt in (("reference", dtype), ("fused", dtype), ("truth", torch.float64)):
                s = copy.copy(solver)
                s.backend = "reference" if backend == "truth" else backend
                tt, xx = t.clone().requires_grad_(), x_T.to(dt).clone().requires_grad_()
                y = s.sample(models[s.backend], xx, tt)
                gt, gx = torch.autograd.grad((y * w.to(dt)).sum(), (tt, xx))
                outs[backend] = [v.detach().double() for v in (y, gt, gx)]
            for a, b, c, what in zip(outs["fused"], outs["reference"], outs["truth"], ("sample", "grad t", "grad x_T")):
                scale = float(b.abs().max())
                err = float((a - b).abs().max())
                if dtype == torch.float64:
                    # 1e-12 relative (to the largest entry); timestep gradients chain many steps'
                    # dot products summed in another order, so they get 1e-11
                    rtol = 1e-12 if what == "sample" else 1e-11
                else:
                    # float32: 1e-6, or no worse than twice the reference path's own float32 error
                    rtol = max(1e-6, 2 * float((b - c).abs().max()) / scale)
                assert err <= rtol * scale + 1e-300, (type(solver).__name__, schedule.name, what, err / scale)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_fast_path_errors_are_the_python_layers(requires_grad):
    """The common call skips the Python checks (the extension checks itself); a failure is then
    named by the Python checks: same exception type and message as before, no chained traceback."""
    x = torch.randn(3, 4, requires_grad=requires_grad)
    coef = torch.tensor([1.0, 2.0], dtype=torch.float64)
    cases = [([torch.randn(3, 5)], ValueError, r"history\[0\] has shape \(3, 5\) but x has shape \(3, 4\)"),
             ([torch.randn(3, 4, dtype=torch.float64)], TypeError, r"history\[0\] has dtype torch.float64"),
             ([1.0], TypeError, r"history\[0\] must be a torch.Tensor, got float"),
             ([torch.randn(3, 4)] * 5, ValueError, "history holds 5 tensors, at most 4")]
    for history, kind, msg in cases:
        with pytest.raises(kind, match=msg) as info:
            fused.multistep_update(x, coef, history)
        assert info.value.__context__ is None and info.value.__cause__ is None
    with pytest.raises(ValueError, match="coef must be 1-D with between 1 \\+ len\\(history\\) = 3"):
        fused.multistep_update(x, coef, [torch.randn(3, 4)] * 2)


def test_an_out_whose_elements_may_overlap_is_refused_and_a_strided_slice_is_written():
    """torch calls an as_strided layout's overlap "too hard to tell": such an out went to the kernel, which wrote
    through overlapping rows and returned a silently wrong result (a bad-input probe).  The strides now decide:
    a layout they cannot clear is refused; a slice (big[:, ::2]) or a transposed out is written correctly."""
    x = torch.arange(20.0).view(4, 5)
    coef = torch.tensor([1.0, 0.5], dtype=torch.float64)
    m = torch.ones(4, 5)
    want = x + 0.5 * m
    for bad in (torch.zeros(20).as_strided((4, 5), (2, 1)), torch.zeros(5).expand(4, 5),
                torch.zeros(14).as_strided((4, 5), (3, 1))):
        with pytest.raises(fused.OutOverlapError, match="out has elements that overlap or may overlap"):
            fused.multistep_update(x, coef, [m], out=bad)
    for good in (torch.zeros(4, 10)[:, ::2], torch.zeros(5, 4).t(), torch.zeros(8, 5)[::2],
                 torch.zeros(40).as_strided((4, 5), (10, 2))):
        got = fused.multistep_update(x, coef, [m], out=good)
        assert got is good and torch.equal(good, want)


def test_the_registered_ops_name_an_input_on_another_device():
    """The fake kernels are the ops' meta kernels too: a call mixing a meta tensor (the stand-in for another device)
    with CPU tensors reached them and returned x's empty_like -- uninitialised memory -- as the result."""
    fused._lib()
    x, coef = torch.ones(4, 5), torch.tensor([1.0, 1.0], dtype=torch.float64)
    meta_m = torch.ones(4, 5, device="meta")
    with pytest.raises(RuntimeError, match=r"ld3_ext::multistep_update: history\[0\] is on meta but x is on cpu"):
        torch.ops.ld3_ext.multistep_update(x, coef, [meta_m])
    with pytest.raises(RuntimeError, match=r"ld3_ext::multistep_update: coef is on meta but x is on cpu"):
        torch.ops.ld3_ext.multistep_update(x, coef.to("meta"), [torch.ones(4, 5)])
    with pytest.raises(RuntimeError, match=r"multistep_update_backward: history\[0\] is on meta but grad is on cpu"):
        torch.ops.ld3_ext.multistep_update_backward(torch.ones(4, 5), x, coef, [meta_m])
    t = torch.tensor([80.0, 10.0, 1.0], dtype=torch.float64)
    _, jac = torch.ops.ld3_ext.coefficient_table(t, 0, 0.0, 0.0, 1, 3, True, False, False, True)
    with pytest.raises(RuntimeError, match=r"coefficient_table_backward: grad_table is on meta but jac is on cpu"):
        torch.ops.ld3_ext.coefficient_table_backward(jac, torch.ones(2, 2, 5, dtype=torch.float64, device="meta"), t)
    # all on one device: the ops run (meta: shapes only)
    assert torch.ops.ld3_ext.multistep_update(x.to("meta"), coef.to("meta"), [meta_m]).device.type == "meta"
    torch.testing.assert_close(torch.ops.ld3_ext.multistep_update(x, coef, [torch.ones(4, 5)]), 2 * x)


# ----------------------------------------------------------------------------------------------
# fuzz audit of the native layer (2026-12-07)
# ----------------------------------------------------------------------------------------------
def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.ld3_ext.multistep_update(_meta(3), _meta(1, dtype=torch.float64), [_meta(3)] * 6),
     "history holds 6 tensors, at most 4"),
    (lambda: torch.ops.ld3_ext.multistep_update(_meta(3), _meta(2, dtype=torch.float64), [_meta(4)]),
     r"history\[0\] is torch.float32 of shape \(4,\) but x is torch.float32 of shape \(3,\)"),
    (lambda: torch.ops.ld3_ext.multistep_update(_meta(3), _meta(2, dtype=torch.float64), [_meta(3, dtype=torch.int32)]),
     r"history\[0\] is torch.int32"),
    (lambda: torch.ops.ld3_ext.multistep_update(_meta(3, dtype=torch.int32), _meta(1, dtype=torch.float64), []),
     "x must be float16, bfloat16, float32 or float64"),
    (lambda: torch.ops.ld3_ext.multistep_update(_meta(3), _meta(1), [_meta(3)]), "coef must be 1-D float64"),
    (lambda: torch.ops.ld3_ext.multistep_update(_meta(3), _meta(1, dtype=torch.float64), [_meta(3)]),
     r"1 \+ len\(history\) = 2 to 5 entries"),
    (lambda: torch.ops.ld3_ext.multistep_update_backward(_meta(4), _meta(3), _meta(1, dtype=torch.float64), []),
     r"grad is torch.float32 of shape \(4,\) but x is"),
    (lambda: torch.ops.ld3_ext.coefficient_table(_meta(3, 4, dtype=torch.int32), 0, 0., 0., 1, 1, True, False, False,
                                                 True), "timesteps must be a 1-D float64 tensor"),
    (lambda: torch.ops.ld3_ext.coefficient_table(_meta(0, dtype=torch.float64), 0, 0., 0., 1, 1, True, False, False,
                                                 True), r"at least 2 entries, got torch.float64 of shape \(0,\)"),
    (lambda: torch.ops.ld3_ext.coefficient_table(_meta(3, dtype=torch.float64), 7, 0., 0., 9, 99, True, False, False,
                                                 True), "schedule kind 7, solver id 9 and order 99"),
    (lambda: torch.ops.ld3_ext.coefficient_table_backward(_meta(3, 2, 5, 4, dtype=torch.float64), _meta(3, 2, 4),
                                                          _meta(4, dtype=torch.float64)),
     r"jac must be float64 \[N, 2, 5, 4\] and grad_table \[N, 2, 5\], got \(3, 2, 5, 4\) and \(3, 2, 4\)"),
])
def test_fake_kernels_check_what_the_kernels_check(call, message):
    """The fake (= meta) kernels checked devices only: mismatched dtypes, shapes, too many history terms or an
    empty grid "succeeded" with made-up shapes (or failed in torch, naming nothing) when traced (fuzz audit)."""
    with pytest.raises(RuntimeError, match=message):
        call()


def test_fake_kernels_still_give_the_shapes_of_valid_calls():
    y = torch.ops.ld3_ext.multistep_update(_meta(2, 3), _meta(3, dtype=torch.float64), [_meta(2, 3)] * 2)
    assert y.shape == (2, 3) and y.device.type == "meta"
    tab, jac = torch.ops.ld3_ext.coefficient_table(_meta(6, dtype=torch.float64), 0, 0., 0., 1, 3, False, False,
                                                   False, True)
    assert tab.shape == (5, 2, 5) and jac.shape == (5, 2, 5, 4)


def test_vmap_of_an_update_into_out():
    """torch.func.vmap over fused.multistep_update(..., out=o) failed inside torch: its overlap test has no batching
    rule (fuzz audit); out.copy_ checks a batched out itself."""
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    out = torch.zeros(4, 10)
    c = torch.tensor([0.3, -0.5], dtype=torch.float64)
    res = torch.func.vmap(lambda a, b, o: fused.multistep_update(a, c, [b], out=o))(x, m, out)
    want = ops.multistep_update_reference(x, c, [m])
    assert torch.equal(out, want) and torch.equal(res, want)


@pytest.mark.parametrize("schedule, grid", [(S.VPLinear(), [1.0, 0.5, -0.5]), (S.VPCosine(), [0.9, 0.3, -0.5])])
def test_second_derivative_of_the_fused_table_on_a_grid_the_forward_takes(schedule, grid):
    """A VP grid reaching below t = 0 (where the schedule is still defined, so the forward takes it) failed in the
    double backward: the schedule rebuilt for it refused t_min <= 0, naming parameters nobody passed (fuzz audit)."""
    spec = SolverSpec("dpmpp", order=2)
    out = {}
    for name, table in (("fused", lambda t: fused.coefficient_table(schedule, t, spec)),
                        ("reference", lambda t: coefficient_table_reference(schedule, t, spec, validate=False))):
        t = torch.tensor(grid, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(table(t).square().sum(), t, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), t)
        out[name] = (g.detach(), h)
    torch.testing.assert_close(out["fused"], out["reference"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make_out", [lambda: torch.zeros(64).as_strided((4, 10), (2, 1)),
                                      lambda: torch.zeros(10).expand(4, 10)])
def test_vmap_of_an_update_into_an_out_whose_samples_collide_is_refused(make_out):
    """vmap over multistep_update(..., out=o) skipped the overlap test: an as_strided out whose mapped samples share
    memory was written silently wrong (the eager call refuses it, naming out; review)."""
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    c = torch.tensor([0.3, -0.5], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="multistep_update: out has elements that overlap"):
        torch.func.vmap(lambda a, b, o: fused.multistep_update(a, c, [b], out=o))(x, m, make_out())


@pytest.mark.parametrize("make_out", [lambda: torch.zeros(2, 3, 10),
                                      lambda: torch.zeros(64).as_strided((2, 3, 10), (4, 2, 1))])
def test_nested_vmap_of_an_update_into_out(make_out):
    """vmap(vmap(...)): the out under two transform wrappers is unwrapped to the plain tensor before the overlap
    test (one level of unwrapping left a batched tensor, which torch's overlap test has no batching rule for: even
    a good out failed); a good out gives the eager result, one whose samples collide is refused naming out."""
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g)
    c = torch.tensor([0.3, -0.5], dtype=torch.float64)
    out = make_out()
    f = torch.func.vmap(torch.func.vmap(lambda a, b, o: fused.multistep_update(a, c, [b], out=o)))
    if out.is_contiguous():
        torch.testing.assert_close(f(x, m, out), fused.multistep_update(x, c, [m]))
    else:
        with pytest.raises(RuntimeError, match="multistep_update: out has elements that overlap"):
            f(x, m, out)
