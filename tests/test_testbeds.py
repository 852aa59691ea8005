"""Analytic test beds: the mixture's exact denoiser and exact probability-flow ODE solution."""
from __future__ import annotations

import math

import pytest
import torch

import ld3_ext
from ld3_ext import testbeds as TB
from conftest import smooth_mixture

pytestmark = pytest.mark.usefixtures("single_thread")


def log_density(gm, x, alpha, sigma):
    """log p_t(x) of the noised mixture (independent of GaussianMixture.denoise)."""
    var = alpha ** 2 * gm.stds ** 2 + sigma ** 2
    diff = x.reshape(x.shape[0], 1, -1) - alpha * gm.means
    comp = -0.5 * (diff ** 2 / var + torch.log(2 * math.pi * var)).sum(-1) + gm.log_weights
    return torch.logsumexp(comp, -1)


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.01), (1.0, 1.0), (1.0, 30.0), (0.8, 0.6), (0.05, 0.9987)])
def test_denoiser_is_tweedie(alpha, sigma):
    """E[x0|x] = (x + sigma^2 grad log p_t(x)) / alpha."""
    gm = smooth_mixture(dim=3, n_modes=4, std=0.3)
    a, s = torch.tensor(alpha, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    x = (a * gm.sample(7, generator=torch.Generator().manual_seed(0))
         + s * torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).requires_grad_()
    (score,) = torch.autograd.grad(log_density(gm, x, a, s).sum(), x)
    expected = (x.detach() + s ** 2 * score) / a
    assert torch.allclose(gm.denoise(x.detach(), a, s), expected, rtol=1e-10, atol=1e-12)


def test_single_gaussian_denoiser_closed_form():
    mu, sd = torch.tensor([[0.3, -1.0]], dtype=torch.float64), torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    gm = TB.GaussianMixture(mu, sd)
    a, s = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    ref = mu + a * sd ** 2 / (a ** 2 * sd ** 2 + s ** 2) * (x - a * mu)
    assert torch.allclose(gm.denoise(x, a, s), ref, rtol=1e-14)


@pytest.mark.parametrize("sname", ["edm", "vp_linear"])
def test_reference_solution_exact_for_a_gaussian(sname):
    """For one Gaussian N(mu, s^2) the ODE keeps z = (x - alpha mu)/sqrt(alpha^2 s^2 + sigma^2) constant."""
    sched = ld3_ext.EDM() if sname == "edm" else ld3_ext.VPLinear()
    mu, sd = torch.tensor([[0.3, -1.0]], dtype=torch.float64), torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    gm = TB.GaussianMixture(mu, sd)
    x_T = gm.prior_noise(sched, 4, generator=torch.Generator().manual_seed(0))

    def scale(t):
        t = torch.tensor(t, dtype=torch.float64)
        return sched.alpha(t), torch.sqrt(sched.alpha(t) ** 2 * sd ** 2 + sched.sigma(t) ** 2)

    a0, v0 = scale(sched.t_max)
    a1, v1 = scale(sched.t_min)
    exact = a1 * mu + v1 * (x_T - a0 * mu) / v0
    ref = gm.reference_solution(sched, x_T)
    assert torch.allclose(ref, exact, rtol=1e-8, atol=1e-9)
    # and our solvers converge to it
    t = ld3_ext.discretizations.logsnr_uniform(sched, 40)
    out = ld3_ext.UniPC(3, backend="reference").sample(gm.model(sched), x_T, t)
    assert float((out - exact).norm() / exact.norm()) < 1e-4


def test_reference_solution_round_trip_and_sub_interval():
    sched = ld3_ext.EDM()
    gm = smooth_mixture(dim=2)
    x = gm.prior_noise(sched, 3, generator=torch.Generator().manual_seed(2)) * (5.0 / 80.0)
    y = gm.reference_solution(sched, x, t_start=5.0, t_end=0.5, rtol=1e-12, atol=1e-12)
    back = gm.reference_solution(sched, y, t_start=0.5, t_end=5.0, rtol=1e-12, atol=1e-12)
    assert torch.allclose(back, x, rtol=1e-8, atol=1e-9)
    mid = gm.reference_solution(sched, x, t_start=5.0, t_end=1.7, rtol=1e-12, atol=1e-12)
    y2 = gm.reference_solution(sched, mid, t_start=1.7, t_end=0.5, rtol=1e-12, atol=1e-12)
    assert torch.allclose(y2, y, rtol=1e-9, atol=1e-10)
    assert y.dtype == x.dtype and y.shape == x.shape


def test_sampling_statistics():
    gm = smooth_mixture(dim=2, n_modes=3)
    x = gm.sample(40000, generator=torch.Generator().manual_seed(0))
    w = gm.log_weights.exp()
    mean = (w[:, None] * gm.means).sum(0)
    second = (w[:, None] * (gm.means ** 2 + gm.stds ** 2)).sum(0)
    var = second - mean ** 2
    assert torch.allclose(x.mean(0), mean, atol=4 * float(var.max().sqrt()) / 200)
    assert torch.allclose(x.var(0), var, rtol=0.05)


def test_model_and_prior():
    sched = ld3_ext.VPLinear()
    gm = smooth_mixture(dim=2)
    m = gm.model(sched)
    assert isinstance(m, ld3_ext.DiffusionModel) and m.prediction == "x0"
    t = torch.tensor(0.3, dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert torch.allclose(m.x0(x, t), gm.denoise(x, sched.alpha(t), sched.sigma(t)), rtol=1e-15)
    z = gm.prior_noise(sched, 20000, generator=torch.Generator().manual_seed(1))
    assert z.shape == (20000, 2) and z.dtype == torch.float64
    assert float(z.std()) == pytest.approx(sched.prior_std(), rel=0.02)
    assert gm.prior_noise(sched, 3, dtype=torch.float32).dtype == torch.float32


def test_named_mixtures_shapes():
    ring = TB.ring2d()
    assert ring.means.shape == (8, 2) and torch.allclose(ring.means.norm(dim=1), torch.ones(8, dtype=torch.float64))
    big = TB.random3072()
    assert big.sample(2).shape == (2, 3, 32, 32)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = big.denoise(x, torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    assert out.shape == x.shape and torch.isfinite(out).all()
    digits = TB.get_mixture("digits64")
    assert digits.event_shape == (1, 8, 8) and digits.means.shape == (10, 64)
    assert float(digits.stds.min()) >= 0.05
    assert torch.allclose(digits.log_weights.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    for bad in ("cifar", ["ring2d"], None):  # a list failed as "unhashable type: 'list'"
        with pytest.raises(ValueError, match="unknown mixture"):
            TB.get_mixture(bad)


def test_mixture_validation():
    with pytest.raises(ValueError, match=r"shape \[K, d\]"):
        TB.GaussianMixture(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="stds must be > 0"):
        TB.GaussianMixture(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="weights must be K positive numbers"):
        TB.GaussianMixture(torch.zeros(2, 2), torch.ones(2, 2), weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="event_shape"):
        TB.GaussianMixture(torch.zeros(2, 4), torch.ones(2, 4), event_shape=(3,))


def test_denoiser_gradients_flow():
    """LD3 differentiates through the model w.r.t. its input and its time."""
    sched = ld3_ext.EDM()
    gm = smooth_mixture(dim=2, std=0.3)
    m = gm.model(sched)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xx, tt: m.predict(xx, tt)[0], (x, t))


@pytest.mark.parametrize("make, kw, name", [(TB.ring2d, {"std": 0.0}, "std"),
                                            (TB.ring2d, {"std": -1.0}, "std"),
                                            (TB.digits64, {"min_std": 0.0}, "min_std")])
def test_testbed_widths_must_be_positive_naming_the_argument(make, kw, name):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number > 0"):
        make(**kw)


# VPDiscrete is left out: its 1000 kinks in log alpha make the t-space solve take minutes (checked once by hand:
# 1.7e-8 at rtol 1e-12)
@pytest.mark.parametrize("sname", ["edm", "vp_linear", "vp_cosine", "flow"])
def test_reference_solution_matches_an_independent_solve_in_t(sname):
    """The teacher everything is scored against, for a real (multi-modal) mixture on every schedule: the
    lambda-space DOP853 solve against DOP853 on dx/dt = f x - g^2/2 grad log p_t(x) in t, with f and
    g^2 = d sigma^2/dt - 2 f sigma^2 from autograd of the schedule and the score from autograd of
    log_density (nothing shared with reference_solution but the schedule's log_alpha / log_sigma)."""
    from scipy.integrate import solve_ivp

    sched = {"edm": ld3_ext.EDM(), "vp_linear": ld3_ext.VPLinear(), "vp_cosine": ld3_ext.VPCosine(),
             "flow": ld3_ext.FlowMatching(), "vp_discrete": ld3_ext.VPDiscrete.linear()}[sname]
    gm = smooth_mixture(dim=3, n_modes=4, std=0.2)
    x_T = gm.prior_noise(sched, 3, generator=torch.Generator().manual_seed(0))

    def rhs(t, y):
        tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        la, ls = sched.log_alpha(tt), sched.log_sigma(tt)
        f = torch.autograd.grad(la, tt, retain_graph=True)[0] if la.requires_grad else torch.zeros(())
        dls = torch.autograd.grad(ls, tt)[0]
        a, s = la.detach().exp(), ls.detach().exp()
        g2 = 2.0 * s * s * (dls - f)
        x = torch.from_numpy(y).reshape(x_T.shape).clone().requires_grad_()
        (score,) = torch.autograd.grad(log_density(gm, x, a, s).sum(), x)
        return (f * x.detach() - 0.5 * g2 * score).reshape(-1).numpy()

    sol = solve_ivp(rhs, (sched.t_max, sched.t_min), x_T.reshape(-1).numpy(), method="DOP853", rtol=1e-10, atol=1e-10)
    assert sol.success
    independent = torch.from_numpy(sol.y[:, -1]).reshape(x_T.shape)
    ref = gm.reference_solution(sched, x_T)
    # measured differences 2e-10 to 5e-9; a wrong ODE is off by O(0.1)
    assert float((ref - independent).abs().max()) < 1e-7
    assert float((ref - x_T).abs().max()) > 0.1  # the solve moved the state (not a trivially passing test)


def test_denoise_in_another_dtype_copies_the_parameters_once_and_sees_edits():
    """The mixture's parameters in x's dtype/device are made once (on a GPU each copy from the host would wait
    for the stream); an in-place edit or a reassignment of them is seen; results match the float64 formula."""
    import pickle
    from conftest import OpRecorder
    mix = TB.GaussianMixture([[0.0, 1.0], [2.0, -1.0]], [[0.5, 1.0], [1.0, 0.3]], weights=[0.3, 0.7])
    x = torch.randn(5, 2, dtype=torch.float64)
    alpha, sigma = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    want = mix.denoise(x, alpha, sigma)
    got = mix.denoise(x.float(), alpha.float(), sigma.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    x32, a32, s32 = x.float(), alpha.float(), sigma.float()
    with OpRecorder() as rec:
        mix.denoise(x32, a32, s32)
    assert "_to_copy" not in rec.ops, rec.ops
    with torch.no_grad():
        mix.means[0, 0] = 5.0  # in place: the cached copy is stale and must not be used
    torch.testing.assert_close(mix.denoise(x.float(), alpha.float(), sigma.float()).double(),
                               mix.denoise(x, alpha, sigma), rtol=1e-5, atol=1e-6)
    mix.stds = mix.stds * 2  # reassigned
    torch.testing.assert_close(mix.denoise(x.float(), alpha.float(), sigma.float()).double(),
                               mix.denoise(x, alpha, sigma), rtol=1e-5, atol=1e-6)
    again = pickle.loads(pickle.dumps(mix))
    assert "_on_device" not in again.__dict__
    torch.testing.assert_close(again.denoise(x, alpha, sigma), mix.denoise(x, alpha, sigma), rtol=0, atol=0)
    with torch.inference_mode():
        made = TB.GaussianMixture([[0.0, 1.0]], [[1.0, 1.0]])
        assert made.denoise(x.float(), alpha.float(), sigma.float()).dtype == torch.float32


def test_a_sample_of_the_wrong_shape_is_named():
    """A test bed's model met a state of another per-sample size with reshape's own error (naming nothing);
    a trainer's sample_shape of another size failed the same way at its first model call."""
    from ld3_ext.training import LD3Trainer
    vp = ld3_ext.VPLinear()
    model = TB.digits64().model(vp)
    grid = ld3_ext.discretizations.time_uniform(vp, nfe=3)
    with pytest.raises(ValueError, match=r"x must be a batch of samples of 64 values each \(event shape \(1, 8, 8\) "
                                         r"of the mixture 'digits64'\), got shape \(2, 3, 8, 8\)"):
        ld3_ext.Euler().sample(model, torch.randn(2, 3, 8, 8), grid)
    assert ld3_ext.Euler().sample(model, torch.randn(2, 1, 8, 8), grid).shape == (2, 1, 8, 8)
    assert ld3_ext.Euler().sample(model, torch.randn(2, 64), grid).shape == (2, 64)  # the same 64 values, flat
    with pytest.raises(ValueError, match="x must be a batch of samples of 2 values each"):
        TB.ring2d().model(vp)(torch.randn(3, 5), torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"sample_shape \(3,\) does not hold the 2 values of one sample of the test "
                                         r"bed 'ring2d'"):
        LD3Trainer(TB.ring2d().model(ld3_ext.EDM()), nfe=3, sample_shape=(3,), progress=False)
    assert LD3Trainer(TB.ring2d().model(ld3_ext.EDM()), nfe=3, sample_shape=(1, 2), progress=False).sample_shape == (1, 2)
