"""float64 precision of the solver coefficients and their Jacobians on both backends, against mpmath.

LD3.md writes phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2 and UniPC's g_{k+1} = g_k/h - 1/(k+1)!: recursions that
cancel as the step h shrinks.  Found by this file, before ``phi_functions`` (and its C++ twin) took the Taylor
series below |h| = 2 (`python benchmarks/coefficient_precision.py --reference-at 368a9fa`: the worst over every
spec, EDM and flow matching, relative to each row's largest entry, on grids whose lambda steps all equal the gap;
UniPC worst throughout):

    gap     rows      Jacobians
    1e-1    2.0e-14   5.3e-13
    1e-2    9.7e-13   4.1e-10
    1e-4    8.9e-9    3.8e-4
    1e-6    1.5e-4    5.2e2

After it (`python benchmarks/coefficient_precision.py`, EDM and flow matching): rows within 1.1e-15, Jacobians
within 3e-15 at gap 1e-1, then growing like 1e-16/gap -- the rounding of lambda(t) itself, which no formula for
the coefficients can undo (1.2e-14 at 1e-2, 9e-13 at 1e-4, 1.2e-10 at 1e-6).
"""
from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

import _mp_coefficients as oracle
import ld3_ext.schedules as S
from ld3_ext import ops
from ld3_ext.coefficients import PHI_SERIES_BELOW, SolverSpec, coefficient_table_reference, phi_functions

pytestmark = pytest.mark.usefixtures("single_thread")

SPECS = {
    "dpmpp3": dict(kind="dpmpp", order=3),
    "dpmpp2_heun": dict(kind="dpmpp", order=2, solver_type="heun"),
    "dpmpp2_midpoint": dict(kind="dpmpp", order=2),
    "euler": dict(kind="euler", order=1),
    "unipc3_bh1": dict(kind="unipc", order=3),
    "unipc3_bh2": dict(kind="unipc", order=3, variant="bh2"),
    "unipc2_bh2": dict(kind="unipc", order=2, variant="bh2"),
    "unipc3_no_corrector": dict(kind="unipc", order=3, use_corrector=False),
    "ipndm4": dict(kind="ipndm", order=4),
}
SCHEDULES = {"edm": S.EDM(), "flow_matching": S.FlowMatching()}


def _phi_exact(k, x):
    """phi_k(x) = (e^x - sum_{j<k} x^j/j!)/x^k at the working precision (the cancellation costs at most 4 x 12 digits)."""
    return (mp.exp(x) - sum(x ** j / mp.factorial(j) for j in range(k))) / x ** k


def _mp_phi(k, x):
    with mp.workdps(100):
        return _phi_exact(k, mp.mpf(x))


def _mp_phi_derivative(k, x, order):
    with mp.workdps(100):
        return mp.diff(lambda u: _phi_exact(k, u), mp.mpf(x), order)


XS = [v * s for v in (1e-12, 3e-7, 1e-4, 0.01, 0.3, 1.0, 1.9, 1.9999999, 2.0, 2.5, 7.0, 30.0) for s in (1.0, -1.0)]


#: relative error allowed for phi_k and its first and second derivative: measured at most 6.6e-16, 2.8e-15 and
#: 1.7e-14 (with a 22-term series 1.2e-14 and 2.1e-13 for phi_1 near |x| = 2: its truncation); the recursion
#: alone is off by up to 1e+4 at x = 1e-4 and gives 0 or inf at 1e-12
PHI_TOL = (2e-15, 1e-14, 1e-13)


@pytest.mark.parametrize("x", XS)
def test_phi_functions_and_two_derivatives_match_mpmath(x):
    assert phi_functions(torch.tensor(x, dtype=torch.float64)).shape == (4,)
    for k in range(1, 5):
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        phi = phi_functions(xt)[k - 1]
        (d1,) = torch.autograd.grad(phi, xt, create_graph=True)
        (d2,) = torch.autograd.grad(d1, xt)
        wants = [_mp_phi(k, x), _mp_phi_derivative(k, x, 1), _mp_phi_derivative(k, x, 2)]
        for order, (got, want, tol) in enumerate(zip((phi, d1, d2), wants, PHI_TOL)):
            assert abs(float(got) - float(want)) <= tol * abs(float(want)), (k, x, order)


def test_phi_functions_batched_and_finite_gradients_in_both_branches():
    x = torch.tensor([-1e-9, -0.5, -1.9, -2.1, -25.0, 3.0], dtype=torch.float64, requires_grad=True)
    phi = phi_functions(x)
    assert phi.shape == (6, 4)
    torch.testing.assert_close(phi, torch.stack([phi_functions(v) for v in x.detach()]), rtol=0, atol=0)
    (g,) = torch.autograd.grad(phi.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(g).all() and torch.isfinite(gg).all()
    assert torch.autograd.gradgradcheck(phi_functions, (x.detach().clone().requires_grad_(),))


def test_phi_functions_are_continuous_across_the_series_boundary():
    below = torch.tensor(-PHI_SERIES_BELOW, dtype=torch.float64)
    for x in (below, -below):
        lo, hi = phi_functions(torch.nextafter(x, torch.zeros(()))), phi_functions(x)  # series | recursion
        torch.testing.assert_close(lo, hi, rtol=4e-15, atol=0)


def _table_and_jacobian(schedule, t, spec, backend):
    fn = lambda tt: ops.coefficient_table(schedule, tt, spec, backend=backend)  # noqa: E731
    return fn(t), torch.autograd.functional.jacobian(fn, t)


def _oracle(schedule_name, t, sp):
    tl = [float(v) for v in t]
    table = torch.tensor([[[float(v) for v in row] for row in step] for step in oracle.table(schedule_name, tl, **sp)],
                         dtype=torch.float64)
    jac = torch.stack([torch.tensor([[[float(v) for v in row] for row in step]
                                     for step in oracle.jacobian(schedule_name, tl, j, **sp)], dtype=torch.float64)
                       for j in range(len(tl))], -1)
    return table, jac


def _uniform_log_grid(schedule_name, gap, n=6):
    """n+1 times whose lambda steps all equal gap (from lambda = 0.3 on; exact in t, then rounded to float64)."""
    with mp.workdps(40):
        lams = [mp.mpf("0.3") - 0 + k * mp.mpf(gap) for k in range(n + 1)]
        if schedule_name == "edm":  # lambda = -log t
            ts = [mp.exp(-lam) for lam in lams]
        else:  # flow: lambda = log((1 - t)/t)
            ts = [1 / (1 + mp.exp(lam)) for lam in lams]
    return torch.tensor([float(v) for v in ts], dtype=torch.float64)


def _sampling_grid(schedule_name, n):
    """An N-step grid as LD3 samples on: EDM's rho = 7 grid from 80 to 0.002, flow matching uniform in t."""
    if schedule_name == "edm":
        return torch.linspace(80.0 ** (1 / 7), 0.002 ** (1 / 7), n + 1, dtype=torch.float64) ** 7
    return torch.linspace(0.999, 0.001, n + 1, dtype=torch.float64)


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("gap", [1e-1, 1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_table_and_jacobian_on_fine_grids_match_mpmath(schedule_name, gap, spec_name):
    sp = SPECS[spec_name]
    schedule, spec = SCHEDULES[schedule_name], SolverSpec(**sp)
    t = _uniform_log_grid(schedule_name, gap)
    want, want_jac = _oracle(schedule_name, t, sp)
    row_scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    jac_scale = want_jac.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
    jac_tol = max(1e-13, 1e-15 / gap)  # lambda(t) rounds to 1e-16: its steps are known to 1e-16/gap
    for backend in ("reference", "fused"):
        table, jac = _table_and_jacobian(schedule, t, spec, backend)
        err = float(((table - want).abs() / row_scale).max())
        assert err <= 2e-15, (backend, err)
        jerr = float(((jac - want_jac).abs() / jac_scale).max())
        assert jerr <= jac_tol, (backend, jerr)


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_table_and_jacobian_on_sampling_grids_match_mpmath(schedule_name, spec_name):
    """Grids as LD3 samples on (NFE 4 and 8, steps from |h| > 2 down to ~0.1): both phi branches in one table."""
    sp = SPECS[spec_name]
    schedule, spec = SCHEDULES[schedule_name], SolverSpec(**sp)
    for n in (4, 8):
        t = _sampling_grid(schedule_name, n)
        want, want_jac = _oracle(schedule_name, t, sp)
        row_scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        jac_scale = want_jac.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
        for backend in ("reference", "fused"):
            table, jac = _table_and_jacobian(schedule, t, spec, backend)
            assert float(((table - want).abs() / row_scale).max()) <= 2e-15, (backend, n)
            # measured at most 4.2e-15 (UniPC bh2 on flow matching near t = 1, where lambda(t) is steep)
            assert float(((jac - want_jac).abs() / jac_scale).max()) <= 1e-14, (backend, n)
        h = (schedule.lambda_(t[1:]) - schedule.lambda_(t[:-1])).abs()
        assert bool((h > PHI_SERIES_BELOW).any()) and bool((h < PHI_SERIES_BELOW).any()), h  # both branches ran


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_table_and_jacobian_across_large_steps_match_mpmath(spec_name):
    """Steps of h = 11..20 (an EDM grid down to sigma 1e-8).  Found by this test: the reference table's Jacobian
    was off by 6e-9 (torch.expm1's backward forms e^-h as expm1(-h) + 1), and iPNDM's on both backends by 6e-8
    (d/dt_i of -sigma_i expm1(h) cancels two e^h terms), where the tolerances below hold now."""
    sp = SPECS[spec_name]
    schedule, spec = S.EDM(sigma_min=1e-9, sigma_max=100.0), SolverSpec(**sp)
    for grid in ([80.0, 1e-7], [80.0, 40.0, 1e-7, 5e-8], [80.0, 20.0, 1e-3, 1e-8, 5e-9]):
        t = torch.tensor(grid, dtype=torch.float64)
        want, want_jac = _oracle("edm", t, sp)
        row_scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        jac_scale = want_jac.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
        for backend in ("reference", "fused"):
            table, jac = _table_and_jacobian(schedule, t, spec, backend)
            assert float(((table - want).abs() / row_scale).max()) <= 2e-15, (backend, grid)
            # UniPC's Vandermonde solve with r_k up to 1e3 keeps ~1e-13 (the reference's LU more than Cramer's rule)
            jtol = 2e-13 if sp["kind"] == "unipc" else 1e-14
            assert float(((jac - want_jac).abs() / jac_scale).max()) <= jtol, (backend, grid)


@pytest.mark.parametrize("step", [1.9, 1.9999999, 2.0000001, math.log(2) - 1e-9, math.log(2) + 1e-9])
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_table_and_jacobian_at_the_branch_boundaries_match_mpmath(step, spec_name):
    """Steps just inside and outside the series' |h| < 2 and iPNDM's h = ln 2 splits.  The reference's series once
    had 22 terms, which left UniPC bh2's Jacobian (it divides by phi_1) 1.5e-14 off at h = 1.9999999."""
    sp = SPECS[spec_name]
    schedule, spec = S.EDM(), SolverSpec(**sp)
    t = torch.tensor([50.0 * math.exp(-step * k) for k in range(5)], dtype=torch.float64)
    want, want_jac = _oracle("edm", t, sp)
    row_scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    jac_scale = want_jac.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
    for backend in ("reference", "fused"):
        table, jac = _table_and_jacobian(schedule, t, spec, backend)
        assert float(((table - want).abs() / row_scale).max()) <= 2e-15, backend
        assert float(((jac - want_jac).abs() / jac_scale).max()) <= 4e-15, backend


_FIRST_CALL_SCRIPT = r"""
import torch
from torch.func import grad, hessian, jacrev
from torch.fx.experimental.proxy_tensor import make_fx
import ld3_ext.schedules as S
from ld3_ext import ops
from ld3_ext.coefficients import SolverSpec, coefficient_table_reference

t = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.1, 0.002], dtype=torch.float64)
specs = [SolverSpec("dpmpp", 3), SolverSpec("unipc", 3, variant="bh2")]
first = "{first}"
w = torch.linspace(-1.0, 2.0, 5 * 2 * 5, dtype=torch.float64).reshape(5, 2, 5)  # (a plain sum is 1 by consistency)
for spec in specs:
    f = lambda tt: (ops.coefficient_table(S.EDM(), tt, spec, backend="reference") * w).sum()
    if first == "hessian":
        hessian(f)(t)
    elif first == "jacrev2":
        jacrev(jacrev(f))(t)
    else:
        make_fx(lambda tt: coefficient_table_reference(S.EDM(), tt, spec, validate=False), tracing_mode=first)(t)
for spec in specs:  # everything afterwards, in the same process
    f = lambda tt: (ops.coefficient_table(S.EDM(), tt, spec, backend="reference") * w).sum()
    tt = t.clone().requires_grad_()
    (want,) = torch.autograd.grad(f(tt), tt)
    torch.testing.assert_close(grad(f)(t), want, rtol=1e-14, atol=0)
    hess = jacrev(jacrev(f))(t)
    torch.testing.assert_close(hessian(f)(t), hess, rtol=1e-12, atol=1e-12 * float(hess.abs().max()))
    eager = ops.coefficient_table(S.EDM(), t, spec, backend="reference")
    torch.testing.assert_close(eager, ops.coefficient_table(S.EDM(), t, spec, backend="fused"), rtol=1e-13, atol=1e-15)
print("ok")
"""


@pytest.mark.parametrize("first", ["hessian", "jacrev2", "fake", "symbolic"])
def test_the_reference_table_works_after_a_first_call_in_a_transform_or_trace(first):
    """The phi constants were cached as tensors made by the first call: inside a nested torch.func transform they
    came out wrapped for that level (every later torch.func call failed an internal assert), under make_fx they
    were fake (every later eager call failed).  A fresh process, so the call under test really is the first."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_SCRIPT.replace("{first}", first)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_ipndm_reference_gradient_is_finite_beyond_exp_overflow():
    """A step of h = 714 (EDM from 1e10 to 1e-300): e^h overflows in the unused expm1 branch of iPNDM's scale, and
    the where() made its gradient NaN on the reference while the native code gave [-1, 1]."""
    schedule, spec = S.EDM(sigma_min=1e-300, sigma_max=1e10), SolverSpec("ipndm", 2)
    t = torch.tensor([1e10, 1e-300], dtype=torch.float64)
    jacs = {}
    for backend in ("reference", "fused"):
        jacs[backend] = torch.autograd.functional.jacobian(
            lambda tt: ops.coefficient_table(schedule, tt, spec, backend=backend, validate=False), t)
    assert torch.isfinite(jacs["reference"]).all()
    # sigma = exp(log t) at t = 1e-300 carries |log t| = 690 ulps of rounding into its derivative
    exact = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    for backend in ("reference", "fused"):
        torch.testing.assert_close(jacs[backend][0, 0, 1], exact, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 1e-6)])
def test_phi_functions_and_reference_table_in_lower_precision(dtype, rtol):
    """float16 x^27 overflowed the series (inf * 0 = NaN for every phi and every heun/3M table entry); half types
    are now computed in float32 and rounded once."""
    x = torch.tensor([-1.9, -0.01, -5.0, 1.5, -1e-3], dtype=dtype)
    got, want = phi_functions(x), phi_functions(x.double())
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    t = torch.tensor([80 * math.exp(-1.8 * k) for k in range(5)], dtype=dtype)
    for spec in (SolverSpec("dpmpp", 2, solver_type="heun"), SolverSpec("dpmpp", 3)):
        table = coefficient_table_reference(S.EDM(), t, spec)
        exact = coefficient_table_reference(S.EDM(), t.double(), spec)  # the same (rounded) grid in float64
        assert table.dtype == dtype and torch.isfinite(table).all()
        torch.testing.assert_close(table.double(), exact, rtol=0, atol=2 * rtol * float(exact.abs().max()))


@pytest.mark.parametrize("bad, named", [(1.0, "float"), ([0.5], "list"), (torch.tensor([1]), "int64"),
                                        (torch.tensor([1j]), "complex64")])
def test_phi_functions_refuses_non_floating_input_by_name(bad, named):
    with pytest.raises(TypeError, match=rf"phi_functions: x must be a real floating torch.Tensor, got .*{named}"):
        phi_functions(bad)
