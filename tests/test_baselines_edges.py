"""Edge inputs of the baseline schedules: DMN's optimiser result and start grid, AYS at large NFE, GITS' start
noise (x_T / sample_shape)."""
import math
import warnings

import numpy as np
import pytest
import torch

from ld3_ext import EDM, VPDiscrete, testbeds, wrap_model
from ld3_ext.baselines import AYS_SIGMAS, ays, dmn, gits
from ld3_ext.baselines.dmn import dmn_lambdas, dmn_objective


def _valid_grid(t, schedule, nfe):
    assert t.dtype == torch.float64 and t.shape == (nfe + 1,)
    assert float(t[0]) == schedule.t_max and float(t[-1]) == schedule.t_min
    assert bool((t[1:] < t[:-1]).all())


def _time_uniform_lambdas(s, nfe):
    lam = s.lambda_(torch.linspace(s.t_max, s.t_min, nfe + 1, dtype=torch.float64)).numpy()
    lam[0], lam[-1] = s.lambda_min, s.lambda_max
    return lam


# ---------------------------------------------------------------------------------------------- DMN
def test_dmn_lambdas_result_stays_inside_its_constraints():
    """trust-constr can stop at a point that breaks its linear constraints (here after 5 iterations from uniform t,
    EDM latent, NFE 50: lambdas below lambda_min); that point was returned as the grid."""
    s = EDM()
    nfe = 50
    lmin, lmax = s.lambda_min, s.lambda_max
    start = _time_uniform_lambdas(s, nfe)
    lam = dmn_lambdas(lmin, lmax, nfe, space="latent", init=start, maxiter=5)
    assert lam.shape == (nfe + 1,) and lam[0] == lmin and lam[-1] == lmax
    assert np.all(np.diff(lam) > 0)
    # still an improvement on the start (a feasible iterate of the search, not the start returned unchanged)
    assert dmn_objective(lam, space="latent") < 0.5 * dmn_objective(start, space="latent")


def test_dmn_latent_grid_valid_where_the_optimiser_ends_infeasible():
    """dmn() on that case raised "non-monotone grid" (or, had the check passed, left [t_min, t_max])."""
    s = EDM()
    _valid_grid(dmn(s, 50, space="latent", maxiter=5), s, 50)


def test_dmn_lambdas_warns_and_returns_the_start_when_no_valid_point_is_found(monkeypatch):
    """An optimiser that ends outside the constraints with no valid iterate on the way: the (valid) start comes back,
    with a warning that says so -- not the invalid point."""
    import scipy.optimize
    from scipy.optimize import OptimizeResult

    def broken(f, x0, **kw):
        return OptimizeResult(x=np.full_like(x0, -50.0) - np.arange(x0.size), success=False)

    monkeypatch.setattr(scipy.optimize, "minimize", broken)
    start = np.linspace(-4.0, 6.0, 9)
    with pytest.warns(RuntimeWarning, match="met no valid grid better than its start"):
        lam = dmn_lambdas(-4.0, 6.0, 8, init=start)
    assert np.array_equal(lam, start)


@pytest.mark.parametrize("init,exc,message", [
    (np.linspace(-4.0, 6.0, 5), ValueError, r"init must be a 1-D array of nfe \+ 1 = 9 lambdas, got shape \(5,\)"),
    (np.linspace(-4.0, 6.0, 9).reshape(3, 3), ValueError, r"init must be a 1-D array of nfe \+ 1 = 9"),
    (np.linspace(6.0, -4.0, 9), ValueError, "init must run from lambda_min"),
    (np.r_[-4.0, 1.0, 0.0, np.linspace(2.0, 6.0, 6)], ValueError, "init must be strictly increasing"),
    (np.r_[-4.0, -5.0, np.linspace(0.0, 6.0, 7)], ValueError, "init must be strictly increasing"),
    (np.r_[-4.0, np.nan, np.linspace(0.0, 6.0, 7)], ValueError, "init contains NaN or Inf"),
    (np.linspace(-3.0, 6.0, 9), ValueError, "init must run from lambda_min=-4 to lambda_max=6"),
    (["a"] * 9, TypeError, "init must hold real numbers"),
    (np.ones(9, dtype=bool), TypeError, "init must hold real numbers"),
])
def test_dmn_lambdas_names_a_bad_init(init, exc, message):
    """init was used unchecked: the wrong length failed inside trust-constr, a decreasing or out-of-range start
    searched outside the constraints."""
    with pytest.raises(exc, match=message):
        dmn_lambdas(-4.0, 6.0, 8, init=init, maxiter=2)


def test_dmn_lambdas_accepts_a_valid_init_of_any_real_kind():
    start = np.linspace(-4.0, 6.0, 9)
    a = dmn_lambdas(-4.0, 6.0, 8, init=start, maxiter=20)
    b = dmn_lambdas(-4.0, 6.0, 8, init=torch.from_numpy(start), maxiter=20)
    c = dmn_lambdas(-4.0, 6.0, 8, init=start.tolist(), maxiter=20)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert np.all(np.diff(a) > 0) and a[0] == -4.0 and a[-1] == 6.0
    assert dmn_objective(a) <= dmn_objective(start)


# ---------------------------------------------------------------------------------------------- AYS
@pytest.mark.parametrize("schedule", [VPDiscrete.linear(), EDM(0.0295, 14.615), EDM(0.029, 14.35)],
                         ids=["sd", "edm-smin-above", "edm-smax-below"])
@pytest.mark.parametrize("nfe", [150, 1000, 3000])
def test_ays_large_nfe_on_a_matching_schedule(schedule, nfe):
    """The lists' ends match these ranges within 2 %, so the published values were used unmapped: at large NFE the
    values next to an end fell outside the range and past the snapped end ("not strictly decreasing")."""
    for which in ("sd15", "sdxl"):
        for fit_range in ("auto", False):
            t = ays(schedule, nfe, model=which, fit_range=fit_range)
            _valid_grid(t, schedule, nfe)
            # log sigma stays piecewise linear in the index: every (nfe/10)-th value is a published knot
            sig = schedule.edm_sigma(t)
            if nfe % 10 == 0:
                knots = sig[:: nfe // 10]
                assert torch.allclose(knots[1:-1], torch.tensor(AYS_SIGMAS[which][1:-1], dtype=torch.float64),
                                      rtol=1e-9)


def test_ays_published_values_kept_at_nfe10_after_the_end_fix():
    s = VPDiscrete.linear()
    t = ays(s, 10)
    sig = s.edm_sigma(t)
    assert torch.allclose(sig[1:-1], torch.tensor(AYS_SIGMAS["sd15"][1:-1], dtype=torch.float64), rtol=1e-9)


# --------------------------------------------------------------------------------------------- GITS
@pytest.fixture(scope="module")
def ring():
    s = EDM()
    return s, testbeds.ring2d().model(s)


@pytest.fixture(scope="module")
def shapeless(ring):
    """The same network without a testbed: it does not say its sample shape, and fails on another one as a
    network does (reshape's RuntimeError; the test bed's own function names x in a ValueError)."""
    s, base = ring
    return wrap_model(lambda x, t: base.fn(x.reshape(x.shape[0], 2), t).reshape(x.shape), s, prediction="x0",
                      time_input="t")


KW = dict(nfe=3, n_samples=4, fine_steps=6)
X = torch.randn(4, 2, dtype=torch.float64)


@pytest.mark.parametrize("bad,exc,message", [
    (dict(x_T=[[0.0, 1.0]]), TypeError, "x_T must be a real floating torch.Tensor"),
    (dict(x_T=np.zeros((4, 2))), TypeError, "x_T must be a real floating torch.Tensor"),
    (dict(x_T=torch.ones(4, 2, dtype=torch.int64)), TypeError, "x_T must be a real floating torch.Tensor, got dtype"),
    (dict(x_T=torch.ones(4, 2, dtype=torch.bool)), TypeError, "x_T must be a real floating torch.Tensor, got dtype"),
    (dict(x_T=torch.randn(4, 2, dtype=torch.complex128)), TypeError, "x_T must be a real floating"),
    (dict(x_T=torch.tensor(1.0)), ValueError, "x_T must be .batch >= 1"),
    (dict(x_T=torch.empty(0, 2)), ValueError, "x_T must be .batch >= 1"),
    (dict(x_T=torch.full((4, 2), math.nan)), ValueError, "x_T contains NaN or Inf"),
    (dict(x_T=torch.randn(4, 3)), ValueError, r"x_T: the model's samples have shape \(2,\), got \(3,\)"),
    (dict(x_T=torch.randn(8)), ValueError, r"x_T: the model's samples have shape \(2,\), got \(\)"),
    (dict(sample_shape=2), TypeError, "sample_shape must be a tuple of ints"),
    (dict(sample_shape="2"), TypeError, "sample_shape must be a tuple of ints"),
    (dict(sample_shape=(2.0,)), TypeError, "sample_shape must be a tuple of ints"),
    (dict(sample_shape=(True,)), TypeError, "sample_shape must be a tuple of ints"),
    (dict(sample_shape=(-1,)), ValueError, "sample_shape must hold sizes >= 1"),
    (dict(sample_shape=(0,)), ValueError, "sample_shape must hold sizes >= 1"),
    (dict(sample_shape=(3,)), ValueError, r"sample_shape: the model's samples have shape \(2,\), got \(3,\)"),
    (dict(x_T=X, sample_shape=(3,)), ValueError, r"x_T has samples of shape \(2,\) but sample_shape is \(3,\)"),
    (dict(sample_shape=(2,), dtype=torch.int64), TypeError, "dtype must be a real floating torch.dtype"),
    (dict(sample_shape=(2,), dtype="float64"), TypeError, "dtype must be a real floating torch.dtype"),
])
def test_gits_names_a_bad_start(ring, bad, exc, message):
    """These failed inside torch.randn or the model's reshape, or were cast silently (an integer, bool or complex
    x_T ran; x_T and a disagreeing sample_shape ran with sample_shape ignored)."""
    _, model = ring
    with pytest.raises(exc, match=message):
        gits(model, **KW, **bad)


@pytest.mark.parametrize("bad,arg", [(dict(x_T=torch.randn(4, 3, dtype=torch.float64)), "x_T"),
                                     (dict(sample_shape=(5,)), "sample_shape")])
def test_gits_names_a_shape_the_model_cannot_take(shapeless, bad, arg):
    """A model that does not say its shape: the network's own reshape error, now with the argument named."""
    with pytest.raises(ValueError, match=rf"{arg}: the model fails on samples of shape") as info:
        gits(shapeless, **KW, **bad)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_gits_good_starts_agree(ring, shapeless):
    """x_T alone, x_T with its own sample_shape and the model without a known shape give one answer; the same
    noise drawn from sample_shape with the seed gives it too."""
    s, model = ring
    g = torch.Generator().manual_seed(0)
    x_T = s.prior_std() * torch.randn(4, 2, generator=g, dtype=torch.float64)
    a = gits(model, **KW, x_T=x_T, return_info=True)
    b = gits(model, **KW, x_T=x_T, sample_shape=(2,), return_info=True)
    c = gits(shapeless, **KW, x_T=x_T, dtype=torch.float64, return_info=True)  # weightless: float32 by default
    d = gits(model, **KW, sample_shape=torch.Size([2]), seed=0, return_info=True)
    for r in (b, c, d):
        assert r.path == a.path and torch.equal(r.timesteps, a.timesteps)
        assert np.array_equal(r.cost, a.cost)
    _valid_grid(a.timesteps, s, 3)


def test_gits_solves_in_the_weights_dtype_by_default():
    """gits' dtype defaults to the network's weights' dtype, as LD3Trainer's: a float32 network (any nn.Module
    UNet) was fed a float64 start and failed with "mat1 and mat2 must have the same dtype", reported as a sample
    shape the model cannot take; a model without weights keeps float64."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):  # a float32 network that does not cast its input, as most do not
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, t):
            return 0.01 * self.lin(x)

    s = EDM()
    model = wrap_model(Net(), s, prediction="eps")
    t = gits(model, **KW, sample_shape=(2,))
    assert torch.equal(t, gits(model, **KW, sample_shape=(2,), dtype=torch.float32))
    _valid_grid(t, s, 3)
    x_T = s.prior_std() * torch.randn(4, 2)  # a float32 start of the user's own
    assert torch.equal(gits(model, **KW, x_T=x_T), gits(model, **KW, x_T=x_T, dtype=torch.float32))
    ring_model = testbeds.ring2d().model(s)  # no weights: float64, as before
    assert torch.equal(gits(ring_model, **KW, sample_shape=(2,)),
                       gits(ring_model, **KW, sample_shape=(2,), dtype=torch.float64))


def test_gits_reads_the_models_own_sample_shape(ring, shapeless):
    """Like LD3Trainer, gits takes the shape a model says it has (a test bed's event shape, model.sample_shape):
    it required sample_shape even then.  A model that says none still needs x_T or sample_shape."""
    s, model = ring
    assert torch.equal(gits(model, **KW), gits(model, **KW, sample_shape=(2,)))
    shapeless.sample_shape = (2,)
    assert torch.equal(gits(shapeless, **KW, dtype=torch.float64), gits(model, **KW))
    del shapeless.sample_shape
    with pytest.raises(ValueError, match="pass x_T or sample_shape"):
        gits(shapeless, **KW)
