"""Input checks of schedules, discretizations, test beds, baselines and metrics: bad input raises a
ValueError/TypeError naming the argument (never a hang, an internal error or a silently wrong result)."""
import math

import numpy as np
import pytest
import scipy.integrate
import torch

from ld3_ext import EDM, Euler, FlowMatching, VPCosine, VPDiscrete, VPLinear, discretizations, metrics, testbeds
from ld3_ext.baselines import dmn_lambdas, dmn_objective, gits, gits_cost_matrix, gits_dp
from ld3_ext.baselines.gits import fine_grid, teacher_states

INF, NAN = float("inf"), float("nan")


# ------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("make, exc, match", [
    (lambda: VPLinear(t_max=INF), ValueError, "t_max"),
    (lambda: VPLinear(beta_max=INF), ValueError, "beta_max"),
    (lambda: VPLinear(beta_max=1e300), ValueError, "beta_max"),      # finite, but alpha(t_max) underflows to 0
    (lambda: VPLinear(t_max=1e10), ValueError, "t_max"),
    (lambda: VPLinear("a"), TypeError, "beta_min"),
    (lambda: VPLinear(t_min=10 ** 400), ValueError, "t_min"),        # OverflowError in float()
    (lambda: VPCosine(t_min="0.1"), TypeError, "t_min"),
    (lambda: VPCosine(t_max=INF), ValueError, "t_max"),
    (lambda: FlowMatching(shift=INF), ValueError, "shift"),
    (lambda: FlowMatching(shift=1e300), ValueError, "shift"),        # ZeroDivisionError in discretizations._shift
    (lambda: FlowMatching(shift=1e-300), ValueError, "shift"),
    (lambda: FlowMatching(shift="2"), TypeError, "shift"),
    (lambda: FlowMatching(t_min=None), TypeError, "t_min"),
    (lambda: VPDiscrete.linear(t_max="1"), TypeError, "t_max"),
])
def test_schedule_parameters_must_be_finite_numbers(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_valid_schedules_still_build():
    for s in (VPLinear(), VPLinear(t_max=5.0), VPLinear(beta_min=0.0), VPCosine(), FlowMatching(shift=20.0),
              FlowMatching(shift=0.05), EDM(), VPDiscrete.linear()):
        t = discretizations.logsnr_uniform(s, 8)
        assert torch.isfinite(t).all() and bool((t[1:] < t[:-1]).all())
    t = discretizations.time_uniform(FlowMatching(shift=1e6), 10)
    assert torch.isfinite(t).all() and bool((t[1:] < t[:-1]).all())


@pytest.mark.parametrize("rho, exc", [(INF, ValueError), (NAN, ValueError), (1e-6, ValueError), (None, TypeError),
                                      ("7", TypeError), (0.0, ValueError)])
def test_edm_rho_checked(rho, exc):
    with pytest.raises(exc, match="rho"):
        discretizations.edm(EDM(), 3, rho=rho)


def test_edm_rho_valid():
    for rho in (0.5, 1.0, 7.0, 100):
        t = discretizations.edm(EDM(), 10, rho=rho)
        assert torch.isfinite(t).all() and bool((t[1:] < t[:-1]).all())


# ------------------------------------------------------------------------------------ test beds
@pytest.fixture(scope="module")
def ring():
    return testbeds.ring2d()


@pytest.fixture
def no_solve(monkeypatch):
    """The checks must fire before the ODE solve (which hangs on a NaN lambda)."""
    def boom(*a, **k):
        raise AssertionError("solve_ivp reached")
    monkeypatch.setattr(scipy.integrate, "solve_ivp", boom)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(t_end=-1.0), ValueError, "t_end"),
    (dict(t_end=NAN), ValueError, "t_end"),
    (dict(t_end=0.0), ValueError, "t_end"),
    (dict(t_end=1e-320), ValueError, "t_end"),     # alpha/sigma = e^lambda overflows
    (dict(t_end=INF), ValueError, "t_end"),
    (dict(t_start=-5.0), ValueError, "t_start"),
    (dict(t_start=NAN), ValueError, "t_start"),
    (dict(t_start="80"), TypeError, "t_start"),
    (dict(rtol=0.0), ValueError, "rtol"),
    (dict(rtol=NAN), ValueError, "rtol"),
    (dict(atol=-1e-9), ValueError, "atol"),
    (dict(atol=INF), ValueError, "atol"),
])
def test_reference_solution_args(ring, no_solve, kw, exc, match):
    with pytest.raises(exc, match=match):
        ring.reference_solution(EDM(), 80 * torch.randn(2, 2, dtype=torch.float64), **kw)


def test_reference_solution_outside_vp_domain(ring, no_solve):
    with pytest.raises(ValueError, match="t_end"):
        ring.reference_solution(VPLinear(), torch.randn(2, 2, dtype=torch.float64), t_end=-0.5)


def test_reference_solution_x_T(ring, no_solve):
    with pytest.raises(TypeError, match="x_T"):
        ring.reference_solution(EDM(), torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="x_T"):
        ring.reference_solution(EDM(), [[1.0, 2.0]])
    with pytest.raises(ValueError, match="x_T"):
        ring.reference_solution(EDM(), torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="x_T"):
        ring.reference_solution(EDM(), torch.full((2, 2), NAN, dtype=torch.float64))


def test_reference_solution_valid(ring):
    x = 80 * torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = ring.reference_solution(EDM(), x, t_end=0.5, rtol=1e-8, atol=1e-8)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("make, exc, match", [
    (lambda: testbeds.ring2d(0), ValueError, "n_modes"),
    (lambda: testbeds.ring2d(2.5), TypeError, "n_modes"),
    (lambda: testbeds.ring2d(radius=NAN), ValueError, "radius"),
    (lambda: testbeds.random3072(0), ValueError, "n_modes"),
    (lambda: testbeds.GaussianMixture([[NAN, 0.0]], [[1.0, 1.0]]), ValueError, "means"),
    (lambda: testbeds.GaussianMixture(torch.zeros(0, 2), torch.zeros(0, 2)), ValueError, "means"),
    (lambda: testbeds.GaussianMixture([[0.0, 0.0]], [[INF, 1.0]]), ValueError, "stds"),
    (lambda: testbeds.GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0]] * 2, weights=[INF, 1.0]),
     ValueError, "weights"),
    (lambda: testbeds.GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0]] * 2, weights=[1e308, 1e308]),
     ValueError, "weights"),   # each finite, the sum is not
])
def test_mixture_parameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_mixture_sample_and_prior_noise(ring):
    for n, exc in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match=r"\bn\b"):
            ring.sample(n)
        with pytest.raises(exc, match=r"\bn\b"):
            ring.prior_noise(EDM(), n)
    for dtype in (torch.long, torch.bool, torch.complex64, "float32"):
        with pytest.raises(TypeError, match="dtype"):
            ring.prior_noise(EDM(), 2, dtype=dtype)
    assert ring.sample(3).shape == (3, 2)
    assert ring.prior_noise(EDM(), 3, dtype=torch.float32).dtype == torch.float32
    assert testbeds.ring2d(np.int64(4)).means.shape == (4, 2)


# ------------------------------------------------------------------------------------ baselines
def test_gits_dp_never_repeats_an_index():
    cost = np.abs(np.subtract.outer(np.arange(5), np.arange(5))).astype(float)  # staying put costs 0
    for c in (cost, np.zeros((5, 5))):
        path = gits_dp(c, 3)
        assert path[0] == 0 and path[-1] == 4 and all(a < b for a, b in zip(path[:-1], path[1:])), path
    with pytest.raises(ValueError, match="cost"):
        gits_dp(np.full((5, 5), NAN), 2)
    with pytest.raises(ValueError, match="coeff"):
        gits_dp(np.zeros((5, 5)), 2, coeff=INF)


def test_gits_solver_by_name():
    s = EDM()
    model = testbeds.ring2d().model(s)
    kw = dict(nfe=2, n_samples=2, fine_steps=4, sample_shape=(2,), teacher_substeps=1)
    assert torch.equal(gits(model, solver="euler", **kw), gits(model, solver=Euler(), **kw))
    with pytest.raises(TypeError, match="solver"):
        gits(model, solver=5, **kw)
    with pytest.raises(ValueError, match="solver"):
        gits(model, solver="no-such-solver", **kw)
    with pytest.raises(TypeError, match="teacher_solver"):
        gits(model, teacher_solver=object(), **kw)
    grid = fine_grid(s, 4)
    states = teacher_states(model, torch.zeros(1, 2, dtype=torch.float64), grid, substeps=1)
    with pytest.raises(TypeError, match="solver"):
        gits_cost_matrix(model, grid, states, solver=3.0)


def test_dmn_lambdas_args():
    for nfe in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="nfe"):
            dmn_lambdas(-5.0, 5.0, nfe)
    for order in (0, 4, -1, True, "3"):
        with pytest.raises(ValueError, match="order"):
            dmn_lambdas(-5.0, 5.0, 3, order=order)
        with pytest.raises(ValueError, match="order"):
            dmn_objective(np.linspace(-5.0, 5.0, 4), order=order)
    with pytest.raises(ValueError, match="lambda_max"):
        dmn_lambdas(-5.0, INF, 3)
    lam = dmn_lambdas(-5.0, 5.0, 3, order=2, maxiter=5)
    assert lam.shape == (4,) and bool(np.all(np.diff(lam) > 0))


# ------------------------------------------------------------------------------------ metrics
def test_gaussian_stats_one_dimensional():
    mu, cov = metrics.gaussian_stats(torch.randn(10, 1, generator=torch.Generator().manual_seed(0)))
    assert mu.shape == (1,) and cov.shape == (1, 1)
    assert metrics.frechet_distance(mu, cov, mu + 1.0, cov) == pytest.approx(1.0)


@pytest.mark.parametrize("cov1, cov2, match", [
    (-np.eye(2), np.eye(2), "cov1"),                                  # not PSD: clipping gave 0.0
    (np.eye(2), np.diag([1.0, -0.5]), "cov2"),
    (np.full((2, 2), NAN), np.eye(2), "cov1"),                        # NaN: LinAlgError / NaN before
    (np.eye(2), np.array([[1.0, INF], [INF, 1.0]]), "cov2"),
    (np.array([[1.0, 0.5], [0.0, 1.0]]), np.eye(2), "cov1"),          # not symmetric
])
def test_frechet_distance_rejects_non_covariances(cov1, cov2, match):
    with pytest.raises(ValueError, match=match):
        metrics.frechet_distance(np.zeros(2), cov1, np.zeros(2), cov2)


def test_frechet_distance_valid():
    assert metrics.frechet_distance(np.zeros(2), np.zeros((2, 2)), np.zeros(2), np.zeros((2, 2))) == 0.0
    a = np.array([[2.0, 1.0], [1.0, 1.0]])
    assert metrics.frechet_distance(np.zeros(2), a, np.ones(2), a) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="mu1"):
        metrics.frechet_distance(np.array([NAN, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


@pytest.mark.parametrize("bs", [0, -1, 2.5, True])
def test_digits_features_batch_size(bs):
    with pytest.raises(ValueError, match="batch_size"):
        metrics.digits_features(torch.zeros(4, 1, 8, 8), batch_size=bs)
