"""Noise schedules: identities, inverses, derivatives and the discrete (diffusers) tables."""
from __future__ import annotations

import math

import pytest
import torch

import ld3_ext
from ld3_ext.schedules import schedule_from_config

from conftest import BASE_SCHEDULES  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULES = {**BASE_SCHEDULES, "vp_discrete_lsun": lambda: ld3_ext.VPDiscrete.linear(0.0015, 0.0195)}
VP = ("vp_linear", "vp_cosine", "vp_discrete", "vp_discrete_lsun")


def grid(s, n=101):
    return torch.linspace(s.t_min, s.t_max, n, dtype=torch.float64)


@pytest.mark.parametrize("name", VP)
def test_vp_alpha2_plus_sigma2_is_one(name):
    s = SCHEDULES[name]()
    t = grid(s, 1001)
    assert torch.allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=4e-16)
    assert torch.all(s.alpha(t) > 0) and torch.all(s.sigma(t) > 0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_float64_in_float64_out_and_monotone(name):
    s = SCHEDULES[name]()
    t = grid(s)
    for f in (s.alpha, s.sigma, s.lambda_, s.edm_sigma, s.log_alpha, s.log_sigma):
        assert f(t).dtype == torch.float64
    lam = s.lambda_(t)
    assert torch.all(lam[1:] < lam[:-1])  # lambda decreases with t
    assert s.lambda_min == pytest.approx(float(lam[-1]), rel=1e-14)
    assert s.lambda_max == pytest.approx(float(lam[0]), rel=1e-14)
    # python floats are accepted and computed in float64
    assert s.alpha(0.5 * (s.t_min + s.t_max)).dtype == torch.float64


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_lambda_round_trip(name):
    s = SCHEDULES[name]()
    t = grid(s, 997)
    assert torch.allclose(s.inverse_lambda(s.lambda_(t)), t, rtol=1e-12, atol=1e-15)
    lam = torch.linspace(s.lambda_min, s.lambda_max, 501, dtype=torch.float64)
    assert torch.allclose(s.lambda_(s.inverse_lambda(lam)), lam, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_edm_sigma_round_trip(name):
    s = SCHEDULES[name]()
    t = grid(s, 301)
    sig = s.edm_sigma(t)
    assert torch.allclose(sig, s.sigma(t) / s.alpha(t), rtol=1e-14)
    assert torch.allclose(s.t_from_edm_sigma(sig), t, rtol=1e-12, atol=1e-15)
    assert torch.allclose(sig, torch.exp(-s.lambda_(t)), rtol=1e-14)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_derivatives_gradcheck(name):
    s = SCHEDULES[name]()
    # interior points away from VPDiscrete's knots (k/1000), where the derivative jumps
    t = (s.t_min + (s.t_max - s.t_min) * torch.tensor([0.1037, 0.4213, 0.7771, 0.9629], dtype=torch.float64))
    t = t.requires_grad_()
    for f in (s.alpha, s.sigma, s.lambda_, s.edm_sigma):
        if name == "edm" and f == s.alpha:  # alpha = 1: a constant without a graph
            assert not f(t).requires_grad and torch.equal(f(t), torch.ones_like(t))
            continue
        assert torch.autograd.gradcheck(f, (t,), eps=1e-7, atol=1e-7, rtol=1e-6)
        (g,) = torch.autograd.grad(f(t).sum(), t)
        assert torch.all(torch.isfinite(g)) and torch.all(g != 0)
    lam = s.lambda_(t.detach()).requires_grad_()
    assert torch.autograd.gradcheck(s.inverse_lambda, (lam,), eps=1e-7, atol=1e-7, rtol=1e-6)
    sig = s.edm_sigma(t.detach()).requires_grad_()
    assert torch.autograd.gradcheck(s.t_from_edm_sigma, (sig,), eps=1e-7, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", ["edm", "vp_linear", "vp_cosine", "flow"])
def test_closed_form_derivative_of_lambda(name):
    """d lambda/dt from autograd equals a central difference to 1e-7 (closed forms have no kinks)."""
    s = SCHEDULES[name]()
    t = torch.tensor([0.3 * s.t_min + 0.7 * s.t_max, 0.5 * (s.t_min + s.t_max)], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(s.lambda_(t).sum(), t)
    h = 1e-6 * (s.t_max - s.t_min)
    fd = (s.lambda_(t.detach() + h) - s.lambda_(t.detach() - h)) / (2 * h)
    assert torch.allclose(g, fd, rtol=1e-7)


def test_edm_values():
    s = ld3_ext.EDM()
    assert s.lambda_min == pytest.approx(-math.log(80.0), rel=1e-15)  # -4.3820
    assert s.lambda_max == pytest.approx(-math.log(0.002), rel=1e-15)  # 6.2146
    assert s.prior_std() == pytest.approx(80.0, rel=1e-15)
    t = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    assert torch.equal(s.alpha(t), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(s.sigma(t), t, rtol=1e-15)


def test_vp_linear_precision_near_zero():
    """sigma at small t must not lose digits to 1 - alpha^2 cancellation."""
    s = ld3_ext.VPLinear()
    for t in (1e-3, 1e-5, 1e-7):
        la = -0.25 * t * t * (20.0 - 0.1) - 0.5 * t * 0.1
        expected = math.sqrt(-math.expm1(2 * la))
        got = float(s.sigma(torch.tensor(t, dtype=torch.float64)))
        assert got == pytest.approx(expected, rel=1e-13)


def test_vp_discrete_agrees_with_its_knots():
    ac = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    s = ld3_ext.VPDiscrete(alphas_cumprod=ac)
    n = 1000
    tk = torch.arange(1, n + 1, dtype=torch.float64) / n  # t_k = (k+1)/N
    assert torch.allclose(s.alpha(tk) ** 2, ac, rtol=1e-13)
    assert torch.allclose(s.alphas_cumprod, ac, rtol=1e-13)
    assert torch.allclose(s.model_index(tk), torch.arange(n, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(s.t_from_index(torch.arange(n, dtype=torch.float64)), tk, rtol=1e-15)
    # between knots log alpha is linear in t
    tm = 0.5 * (tk[:-1] + tk[1:])
    assert torch.allclose(s.log_alpha(tm), 0.25 * (torch.log(ac[:-1]) + torch.log(ac[1:])), rtol=1e-12)
    assert s.t_min == pytest.approx(1e-3) and s.t_max == 1.0
    # betas= and alphas_cumprod= describe the same schedule
    s2 = ld3_ext.VPDiscrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    assert torch.allclose(s2.alphas_cumprod, ac, rtol=1e-12)


@pytest.mark.parametrize("beta_schedule,kw", [("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
                                              ("linear", dict(beta_start=0.0001, beta_end=0.02))])
def test_vp_discrete_matches_diffusers_alphas_cumprod(beta_schedule, kw):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDPMScheduler(beta_schedule=beta_schedule, **kw)
    ours = ld3_ext.VPDiscrete.linear(scaled=beta_schedule == "scaled_linear", **kw)
    # diffusers builds betas and cumprod in float32: 1e-6 relative over the 1000-term product
    assert torch.allclose(ours.alphas_cumprod, sch.alphas_cumprod.double(), rtol=2e-6, atol=0)
    # the scheduler's own sigmas are our edm_sigma on the knots
    exact = ld3_ext.VPDiscrete(alphas_cumprod=sch.alphas_cumprod.double())
    tk = torch.arange(1, 1001, dtype=torch.float64) / 1000
    sig = ((1 - sch.alphas_cumprod.double()) / sch.alphas_cumprod.double()) ** 0.5
    assert torch.allclose(exact.edm_sigma(tk), sig, rtol=1e-12)


@pytest.mark.parametrize("betas,lo,hi", [((0.0015, 0.0195), 0.03876, 83.82), ((0.00085, 0.012), 0.02917, 14.6146)])
def test_ldm_sigma_ranges_from_reference(betas, lo, hi):
    """LD3.md 3.2: sigma/alpha ranges of LSUN/ImageNet-LDM and SD v1."""
    s = ld3_ext.VPDiscrete.linear(*betas)
    assert float(s.edm_sigma(torch.tensor(s.t_min, dtype=torch.float64))) == pytest.approx(lo, rel=2e-4)
    assert float(s.edm_sigma(torch.tensor(s.t_max, dtype=torch.float64))) == pytest.approx(hi, rel=2e-4)


def test_vp_cosine_cut():
    """DPM-Solver's cosine schedule ends at T = 0.9946, where lambda = -4.78 (alpha ~ 0.0084)."""
    s = ld3_ext.VPCosine()
    assert s.t_max == 0.9946
    assert s.lambda_min == pytest.approx(-4.7776, abs=1e-3)
    assert float(s.alpha(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_config_round_trip(name):
    s = SCHEDULES[name]()
    s2 = schedule_from_config(s.config())
    t = grid(s, 37)
    assert type(s2) is type(s)
    assert torch.allclose(s2.lambda_(t), s.lambda_(t), rtol=1e-14)
    assert (s2.t_min, s2.t_max) == (s.t_min, s.t_max)
    repr(s)


def test_constructor_validation():
    with pytest.raises(ValueError, match="sigma_min"):
        ld3_ext.EDM(1.0, 0.5)
    with pytest.raises(ValueError, match="beta_min"):
        ld3_ext.VPLinear(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="t_min"):
        ld3_ext.VPLinear(t_min=0.0)
    with pytest.raises(ValueError, match="t_max"):
        ld3_ext.VPCosine(t_max=1.0)
    with pytest.raises(ValueError, match="shift"):
        ld3_ext.FlowMatching(shift=0.0)
    with pytest.raises(ValueError, match="exactly one of betas= or alphas_cumprod="):
        ld3_ext.VPDiscrete()
    with pytest.raises(ValueError, match="strictly decreasing"):
        ld3_ext.VPDiscrete(alphas_cumprod=[0.9, 0.95])
    with pytest.raises(ValueError, match="betas must hold"):
        ld3_ext.VPDiscrete(betas=[0.5, 1.5])
    with pytest.raises(ValueError, match="unknown schedule type"):
        schedule_from_config({"type": "Nope"})
    for bad in (["EDM"], {"EDM": 1}):  # unhashable: was a bare "unhashable type" TypeError
        with pytest.raises(ValueError, match="unknown schedule type"):
            schedule_from_config({"type": bad})
    for key in ("alphas_cumprod", "betas"):  # an int beyond float64 (a hand-edited file): a bare OverflowError
        with pytest.raises(TypeError, match=f"VPDiscrete: {key} must be a 1-D sequence of real numbers"):
            ld3_ext.VPDiscrete(**{key: [10 ** 400, 0.5]})


@pytest.mark.parametrize("args, match", [
    ((-1.0, 0.01), r"beta_start must be a number in \(0, 1\), got -1.0"),
    ((0.001, -0.01), r"beta_end must be a number in \(0, 1\), got -0.01"),
    ((0.5, 2.0), r"beta_end must be a number in \(0, 1\), got 2.0"),
    ((0.001, 0.01, 0), r"num_train_timesteps must be an int >= 2, got 0"),
    ((0.012, 0.00085), r"beta_start \(0.012\) must not exceed beta_end \(0.00085\); swapped\?"),
])
def test_vp_discrete_linear_names_a_bad_argument(args, match):
    with pytest.raises(ValueError, match=r"VPDiscrete.linear: " + match):
        ld3_ext.VPDiscrete.linear(*args)


def test_vp_discrete_linear_takes_numpy_and_tensor_numbers():
    """np.int64(10) was refused as "must be an int >= 2" and a 0-d tensor beta as "must be a number in (0, 1)",
    though both are (VPLinear's and VPDiscrete's own constructors take them)."""
    import numpy as np
    want = ld3_ext.VPDiscrete.linear(0.001, 0.01, 10)
    for kw in ({"num_train_timesteps": np.int64(10)}, {"beta_start": torch.tensor(0.001, dtype=torch.float64)},
               {"beta_end": np.float32(0.01)}):
        args = {"beta_start": 0.001, "beta_end": 0.01, "num_train_timesteps": 10, **kw}
        got = ld3_ext.VPDiscrete.linear(**args)
        assert got.num_train_timesteps == 10 and got.same_as(want)
    with pytest.raises(ValueError, match=r"beta_start must be a number in \(0, 1\)"):
        ld3_ext.VPDiscrete.linear(torch.tensor([0.001, 0.002]), 0.01)


def test_vp_discrete_linear_takes_constant_betas():
    s = ld3_ext.VPDiscrete.linear(0.01, 0.01, 10, scaled=False)
    torch.testing.assert_close(s.alphas_cumprod, torch.full((10,), 0.99, dtype=torch.float64).cumprod(0))


# --- NoiseSchedule.same_as / time_slack: the one comparison and round-off rule the library uses ----------
def test_same_as_compares_configs_and_refuses_other_types():
    a = ld3_ext.VPLinear()
    assert a.same_as(ld3_ext.VPLinear()) and a.same_as(a.config())
    assert not a.same_as(ld3_ext.VPLinear(beta_max=19.0))
    assert not a.same_as(ld3_ext.VPCosine())
    assert not a.same_as("vp_linear") and not a.same_as(None)
    # key order of a config read back from JSON does not matter
    assert a.same_as(dict(reversed(list(a.config().items()))))
    # a short config (defaults left out, as a hand-written file may have them) is the schedule it builds; it
    # was compared field by field and found different
    assert ld3_ext.EDM().same_as({"type": "EDM"}) and a.same_as({"type": "VPLinear"})
    assert not ld3_ext.EDM().same_as({"type": "EDM", "sigma_max": 70.0})
    assert not a.same_as({"type": "VPLinear", "beta_max": "20"})  # one that cannot be built: different


def test_time_slack_is_the_tolerance_every_grid_check_uses():
    from ld3_ext.solvers.base import validate_timesteps
    s = ld3_ext.EDM()
    slack = s.time_slack()
    assert slack == pytest.approx(1e-6 * (s.t_max - s.t_min), rel=1e-9)
    inside = torch.tensor([s.t_max + 0.5 * slack, 1.0, s.t_min], dtype=torch.float64)
    outside = torch.tensor([s.t_max + 2 * slack, 1.0, s.t_min], dtype=torch.float64)
    validate_timesteps(s, inside)
    with pytest.raises(ValueError, match="range"):
        validate_timesteps(s, outside)


def test_same_as_takes_one_schedule_built_two_ways_and_messages_stay_short():
    """Stable Diffusion's schedule spelled as the README does (float64 betas) and as from_diffusers builds it
    (diffusers makes the betas in float32) differ by ~1e-6: the same noise levels, so the same schedule; a
    learned grid is not refused, and a refusal does not print 2 x 1000 numbers."""
    from ld3_ext.schedule_file import LearnedSchedule
    from ld3_ext.schedules import VPDiscrete, describe_schedule
    ours = VPDiscrete.linear(0.00085, 0.012)
    betas32 = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2  # as diffusers does
    theirs = VPDiscrete(alphas_cumprod=torch.cumprod(1.0 - betas32, 0).double())
    gap = (theirs.alphas_cumprod / ours.alphas_cumprod - 1).abs().max().item()
    assert 1e-8 < gap < 1e-5  # not bitwise equal, and well inside the tolerance
    assert ours.same_as(theirs) and theirs.same_as(ours.config())
    other = VPDiscrete.linear(0.00085, 0.0121)
    assert not ours.same_as(other) and not ours.same_as(VPDiscrete.linear(0.00085, 0.012, t_min=0.002))
    assert not ld3_ext.EDM().same_as(ld3_ext.VPLinear().config()) and not ld3_ext.EDM().same_as("EDM")
    t = torch.linspace(1.0, 0.001, 5, dtype=torch.float64)
    learned = LearnedSchedule(t, t.clone(), solver_config={"name": "dpmpp", "order": 2}, nfe=4,
                              schedule_config=other.config())
    model = ld3_ext.wrap_model(lambda x, tt: 0 * x, theirs, prediction="eps")
    with pytest.raises(ValueError, match=r"learned on the noise schedule VPDiscrete\(alphas_cumprod=\[1000 values") as ei:
        learned.sample(model, torch.zeros(1, 2))
    assert len(str(ei.value)) < 600
    assert describe_schedule(ours.config()).startswith("VPDiscrete(alphas_cumprod=[1000 values, 0.99915 .. ")


def test_edm_sigma_is_the_time_itself_bit_for_bit():
    """EDM's sigma = sigma/alpha = t: computed as exp(log t) it was off by an ulp for about half of all t (and the
    prior std was 79.99999999999997), so k-diffusion sigmas exported from a grid were not the grid's values."""
    s = ld3_ext.EDM()
    for dtype in (torch.float64, torch.float32):
        t = (torch.rand(10001, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80 + 0.002).to(dtype)
        assert torch.equal(s.edm_sigma(t), t) and torch.equal(s.sigma(t), t) and torch.equal(s.t_from_edm_sigma(t), t)
    assert s.prior_std() == 80.0
    t = torch.tensor([80.0, 3.0, 0.002], dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(s.edm_sigma(t).sum() + s.t_from_edm_sigma(t).sum(), t)
    assert torch.equal(g, torch.full_like(t, 2.0))
    from ld3_ext.schedule_file import LearnedSchedule
    grid = ld3_ext.discretizations.logsnr_uniform(s, 7)
    ls = LearnedSchedule(grid, solver_config=ld3_ext.DPMSolverPP(2).config(), nfe=7, schedule_config=s.config())
    assert torch.equal(ls.to_k_diffusion(dtype=torch.float64), grid)


@pytest.mark.parametrize("kw,exc,match", [
    # accepted, then config() could not be loaded again (alphas_cumprod rounded to 1, underflowed to 0, repeated)
    (dict(betas=[0.5] * 1100), ValueError, "could not be saved and loaded again"),
    (dict(betas=[1e-17, 0.1]), ValueError, "could not be saved and loaded again"),
    (dict(betas=[0.1, 1e-17, 0.1]), ValueError, "could not be saved and loaded again"),
    # a complex table lost its imaginary part, a 2-D one was flattened, a string failed inside torch
    (dict(betas=torch.tensor([0.1, 0.2], dtype=torch.complex64)), TypeError, "betas must be real numbers"),
    (dict(betas=[[0.1, 0.2]]), ValueError, r"betas must be 1-D, got shape \(1, 2\)"),
    (dict(alphas_cumprod=[[0.9, 0.5]]), ValueError, "alphas_cumprod must be 1-D"),
    (dict(betas="abc"), TypeError, "betas must be a 1-D sequence of real numbers"),
])
def test_vp_discrete_refuses_tables_it_could_not_store_or_that_are_not_real_1d(kw, exc, match):
    with pytest.raises(exc, match=match):
        ld3_ext.VPDiscrete(**kw)


def test_vp_discrete_configs_round_trip():
    from ld3_ext.schedules import schedule_from_config
    for s in (ld3_ext.VPDiscrete.linear(), ld3_ext.VPDiscrete(betas=[0.02] * 50),
              ld3_ext.VPDiscrete(alphas_cumprod=[0.99, 0.5, 0.1])):
        assert s.same_as(schedule_from_config(s.config()))
