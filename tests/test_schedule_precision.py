"""float32 precision of the closed-form VP schedules, against an independent mpmath reference, and the native
(C++) schedule formulas against the Python ones where the old formulas lost digits.

Found by this file, before the fix (max float32 relative error over t in [1e-6, 1); within VPCosine's default
[t_min, t_max] = [1e-3, 0.9946] in brackets):
* VPCosine computed log alpha as log(cos(theta)) - log(cos(theta0)), which cancels near t = 0 (log alpha off by
  63% [9e-4], sigma by 39% [4.6e-4; 1.4e-5 at t = 1e-3]) and takes cos of theta ~ pi/2 near t = 1 (alpha off by
  19% [7e-6]; NaN at t = 1, where float32 pi/2 lies above pi/2); its inverse, 2(1+s)/pi arccos(alpha cos(theta0))
  - s, took arccos of ~1 (t off by 63% [8.6e-4]).
* every VP log sigma was log(-expm1(2 log alpha)), whose log(1 - small) loses float32 digits where alpha is small:
  log sigma and d sigma/dt off by 1.5e-4 at VPCosine's t_max, 6.3e-4 at VPLinear's.
After it: at most 2e-6 for every quantity and derivative.
"""
from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

import ld3_ext
from ld3_ext.coefficients import SOLVER_IDS, SolverSpec, coefficient_table_reference

pytestmark = pytest.mark.usefixtures("single_thread", "mp_digits")


@pytest.fixture(scope="module")
def mp_digits():
    """40 significant digits for every mpmath reference in this file (restored afterwards)."""
    with mp.workdps(40):
        yield

#: float32 relative error allowed: a few ulps (2^-24 = 6e-8) times the conditioning of each quantity; measured
#: at most 2e-6 after the fix (d sigma/dt near t = 1), 1e-4 to 0.65 before it
TOL = 5e-6


class _Ref:
    """A schedule in mpmath from its definition: alpha(t) and t(log alpha) in closed form; sigma = sqrt(1 - alpha^2),
    lambda = log(alpha / sigma) (no formula shared with ld3_ext; 40 digits make every cancellation harmless)."""

    def __init__(self, alpha, t_of_log_alpha):
        self.alpha, self.t_of_log_alpha = alpha, t_of_log_alpha

    def sigma(self, t):
        return mp.sqrt(1 - self.alpha(t) ** 2)

    def log_alpha(self, t):
        return mp.log(self.alpha(t))

    def log_sigma(self, t):
        return mp.log(self.sigma(t))

    def lambda_(self, t):
        return mp.log(self.alpha(t) / self.sigma(t))

    def edm_sigma(self, t):
        return self.sigma(t) / self.alpha(t)

    def inverse_lambda(self, lam):
        return self.t_of_log_alpha(-mp.log(1 + mp.exp(-2 * lam)) / 2)  # alpha^2 = 1 / (1 + e^(-2 lam))


def _cosine_ref(s):
    s = mp.mpf(s)
    c0 = mp.cos(s / (1 + s) * mp.pi / 2)
    return _Ref(lambda t: mp.cos((t + s) / (1 + s) * mp.pi / 2) / c0,
                lambda la: 2 * (1 + s) / mp.pi * mp.acos(mp.exp(la) * c0) - s)


def _linear_ref(b0, b1):
    b0, b1 = mp.mpf(b0), mp.mpf(b1)  # log alpha = -(b1 - b0) t^2 / 4 - b0 t / 2: the positive root
    return _Ref(lambda t: mp.exp(-t * t * (b1 - b0) / 4 - t * b0 / 2),
                lambda la: (-b0 / 2 + mp.sqrt(b0 * b0 / 4 - (b1 - b0) * la)) / ((b1 - b0) / 2))


CASES = {
    "vp_cosine": (lambda: ld3_ext.VPCosine(), lambda: _cosine_ref(0.008)),
    "vp_cosine_s0": (lambda: ld3_ext.VPCosine(s=0.0), lambda: _cosine_ref(0.0)),
    "vp_cosine_s0.2": (lambda: ld3_ext.VPCosine(s=0.2), lambda: _cosine_ref(0.2)),
    "vp_linear": (lambda: ld3_ext.VPLinear(), lambda: _linear_ref(0.1, 20.0)),
}


def _times():
    """float32 times over [1e-6, 1): log-spaced from 1e-6, and 1 - 10^-k towards 1, both sides of 1/2."""
    t = torch.cat([torch.logspace(-6, 0, 241, dtype=torch.float64),
                   1 - torch.logspace(-6.5, -0.5, 61, dtype=torch.float64),
                   torch.tensor([0.5, 0.5 - 2 ** -25, 0.5 + 2 ** -24], dtype=torch.float64)]).float()
    return torch.unique(t[(t >= 1e-6) & (t < 1)])


def _max_rel(got, want, floor=0.0):
    """max |got - want| / max(|want|, floor) (got: a float32 tensor; want: mpf values); NaN/Inf count as 1."""
    err = 0.0
    for g, w in zip(got.double().tolist(), want):
        w = float(w)
        err = max(err, abs(g - w) / max(abs(w), floor) if math.isfinite(g) else 1.0)
    return err


def _values_and_derivatives(sched, ref, name, x, floor=0.0):
    """{quantity: max relative error} of f(x) and of its autograd derivative, f = ``name`` of the schedule."""
    xx = x.clone().requires_grad_()
    y = getattr(sched, name)(xx)
    (g,) = torch.autograd.grad(y.sum(), xx)
    xm = [mp.mpf(float(v)) for v in x]
    f = getattr(ref, name)
    return {name: _max_rel(y.detach(), [f(v) for v in xm], floor),
            "d " + name: _max_rel(g, [mp.diff(f, v) for v in xm])}


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_matches_high_precision_reference(case):
    """alpha, sigma, log alpha, log sigma, lambda, sigma/alpha, the inverses of lambda and of sigma/alpha and the
    derivatives of each, all in float32, against mpmath at the same float32 inputs (lambda, which crosses 0 where
    alpha = sigma, relative to max(|lambda|, 1))."""
    make, make_ref = CASES[case]
    s, ref = make(), make_ref()
    t = _times()
    err = {}
    for name in ("alpha", "sigma", "log_alpha", "log_sigma", "edm_sigma"):
        err.update(_values_and_derivatives(s, ref, name, t))
    err.update(_values_and_derivatives(s, ref, "lambda_", t, floor=1.0))
    # the inverses at float32 lambdas (and sigma/alpha) of the same times
    lam = s.lambda_(t.double()).float()
    err.update(_values_and_derivatives(s, ref, "inverse_lambda", lam))
    e = s.edm_sigma(t.double()).float()
    err["t_from_edm_sigma"] = _max_rel(s.t_from_edm_sigma(e), [ref.inverse_lambda(-mp.log(mp.mpf(float(v)))) for v in e])
    bad = {k: f"{v:.3g}" for k, v in err.items() if not v <= TOL}
    assert not bad, f"float32 relative error above {TOL}: {bad}"


def test_vp_cosine_at_t_one_in_float32():
    """alpha reaches 0 at t = 1: lambda = -inf there, not NaN (float32 pi/2 is above pi/2, so cos of it was < 0)."""
    s = ld3_ext.VPCosine()
    t = torch.tensor([1.0])
    assert float(s.alpha(t)) == 0.0 and float(s.sigma(t)) == 1.0 and float(s.lambda_(t)) == -math.inf
    assert float(s.inverse_lambda(torch.tensor([-math.inf]))) == pytest.approx(1.0, rel=1e-6)
    assert float(s.inverse_lambda(torch.tensor([math.inf]))) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vp_cosine_branches_are_continuous_with_finite_gradients(dtype):
    """log alpha switches formula at t = 1/2 and log sigma where alpha^2 = 1/2: across each switch the values keep
    moving the same way, by a few ulps, and the branch that is not taken never makes a gradient NaN (up to
    t = 1 - 1e-6 and lambda = +-60)."""
    for s in (ld3_ext.VPCosine(), ld3_ext.VPCosine(s=0.0), ld3_ext.VPLinear()):
        eps = torch.finfo(dtype).eps
        t = torch.tensor([0.5 - eps / 2, 0.5, 0.5 + eps], dtype=dtype)
        t_half = float(s.inverse_lambda(torch.zeros((), dtype=torch.float64)))  # alpha^2 = sigma^2 = 1/2
        t_eq = torch.tensor([t_half * (1 - 4 * eps), t_half, t_half * (1 + 4 * eps)], dtype=dtype)
        for f, tt, sign in ((s.log_alpha, t, 1), (s.log_sigma, t_eq, -1), (s.lambda_, t_eq, 1)):
            y = sign * f(tt)  # log alpha and lambda decrease with t, log sigma increases
            assert bool((y[1:] <= y[:-1]).all()) and float(y[0] - y[2]) <= 16 * eps, (s, f.__name__, y)
        tt = torch.cat([torch.logspace(-6, 0, 50, dtype=dtype)[:-1], 1 - torch.logspace(-6, -1, 20, dtype=dtype),
                        t]).requires_grad_()
        for f in (s.alpha, s.sigma, s.lambda_, s.log_sigma, s.edm_sigma):
            (g,) = torch.autograd.grad(f(tt).sum(), tt)
            assert torch.isfinite(g).all(), (s, f.__name__, tt[~torch.isfinite(g)])
        lam = torch.linspace(-60, 60, 121, dtype=dtype, requires_grad=True)
        (g,) = torch.autograd.grad(s.inverse_lambda(lam).sum(), lam)
        assert torch.isfinite(g).all() and torch.isfinite(s.inverse_lambda(lam)).all()


def test_vp_cosine_float64_inverse_near_t_zero():
    """The float64 inverse near t = 0 (the arccos form kept only ~8 digits of t = 1e-8)."""
    s = ld3_ext.VPCosine()
    ref = _cosine_ref(0.008)
    for t in (1e-8, 1e-6, 1e-4, 0.3, 0.9, 0.9999):
        lam = s.lambda_(torch.tensor(t, dtype=torch.float64))
        want = ref.inverse_lambda(mp.mpf(float(lam)))
        assert float(s.inverse_lambda(lam)) == pytest.approx(float(want), rel=1e-13)
        assert float(lam) == pytest.approx(float(ref.lambda_(mp.mpf(t))), rel=1e-13)


@pytest.mark.skipif(not ld3_ext.native_available(), reason="native extension not built")
@pytest.mark.parametrize("schedule", [ld3_ext.VPCosine(t_min=1e-6, t_max=1 - 1e-6), ld3_ext.VPLinear(t_min=1e-6)],
                         ids=["vp_cosine", "vp_linear"])
def test_native_tables_use_the_same_formulas_at_the_ends(schedule):
    """csrc/noise_schedule_math.h computes the same formulas as schedules.py: the native coefficient table and its
    Jacobian equal the Python reference on a grid out to t = 1e-6 and 1 - 1e-6 and on both sides of t = 1/2,
    where the old formulas (kept on one side only) differ by 1e-10 to 1e-8."""
    from ld3_ext import _native
    C = _native.get()
    t = torch.tensor([schedule.t_max, 0.9999, 0.99, 0.9, 0.7, 0.5, 0.4, 0.2, 0.05, 1e-2, 1e-3, 1e-4, 1e-5,
                      schedule.t_min], dtype=torch.float64)
    kind_id, (p0, p1) = schedule.native_spec()
    for spec in (SolverSpec("dpmpp", 1), SolverSpec("dpmpp", 3), SolverSpec("unipc", 3), SolverSpec("ipndm", 4)):
        table, jac = C.coefficient_table(t, kind_id, p0, p1, SOLVER_IDS[spec.kind], spec.order,
                                         spec.lower_order_final, spec.solver_type == "heun", spec.variant == "bh2",
                                         spec.has_corrector)
        ref_fn = lambda tt: coefficient_table_reference(schedule, tt, spec)  # noqa: E731
        ref = ref_fn(t)
        row_scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        err = float(((table - ref).abs() / row_scale).max())
        assert err < 1e-12, (spec, err)
        jref = torch.autograd.functional.jacobian(ref_fn, t, vectorize=True)  # [N, 2, 5, N+1]
        for i in range(1, t.numel()):  # row i reads t_{i-3}..t_i: jac[..., j] is d/dt_{i-3+j}
            for j in range(4):
                if i - 3 + j >= 0:
                    want = jref[i - 1, :, :, i - 3 + j]
                    scale = jref[i - 1].abs().amax((-1, -2)).clamp_min(1e-300)[:, None]
                    e = float(((jac[i - 1, :, :, j] - want).abs() / scale).max())
                    assert e < 1e-10, (spec, i, j, e)
