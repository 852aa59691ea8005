"""ld3_ext.functional: the k-diffusion-style API, against k_diffusion.sampling and against our solvers."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import ld3_ext
from ld3_ext import functional as F
from conftest import CallCounter, random_decreasing_grid, smooth_mixture


# tiny tensors on a shared 2-core box: extra threads only add contention
pytestmark = pytest.mark.usefixtures("single_thread")


def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0, append_zero=True):
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)]) if append_zero else s


@pytest.fixture(scope="module")
def mix():
    return smooth_mixture(dim=3, n_modes=3)


def denoiser_of(mix):
    """k-diffusion convention: D(x, sigma[B]) -> x0 in the VE view (alpha = 1)."""
    def d(x, sigma, **kw):
        s = sigma.reshape(-1)[0]
        return mix.denoise(x, torch.ones_like(s), s)
    return d


def x_T(n=8, sigma=80.0, seed=0):
    return sigma * torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


KD_PAIRS = [("euler", "sample_euler", {}), ("heun", "sample_heun", {}), ("dpmpp_2m", "sample_dpmpp_2m", {}),
            ("dpmpp_3m", "sample_dpmpp_3m_sde", {"eta": 0.0})]


@pytest.mark.parametrize("ours,theirs,kw", KD_PAIRS, ids=[p[0] for p in KD_PAIRS])
@pytest.mark.parametrize("append_zero", [True, False])
def test_matches_k_diffusion(mix, ours, theirs, kw, append_zero):
    from _oracles import load_kdiffusion_sampling

    K = load_kdiffusion_sampling()
    sigmas = karras(7, append_zero=append_zero)
    x = x_T()
    d = denoiser_of(mix)
    ref = getattr(K, theirs)(d, x.clone(), sigmas, disable=True, **kw)
    out = F.sample(d, x.clone(), sigmas, solver=ours)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_to_denoiser_runs_k_diffusion_on_our_model(mix):
    from _oracles import load_kdiffusion_sampling

    K = load_kdiffusion_sampling()
    sched = ld3_ext.VPLinear()
    model = mix.model(sched)
    t = ld3_ext.discretizations.logsnr_uniform(sched, 6)
    sig = sched.edm_sigma(t)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sig[0]
    ref = K.sample_dpmpp_2m(F.to_denoiser(model), x.clone(), sig, disable=True)
    out = F.sample(model, x.clone(), sig, solver="dpmpp_2m")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_bh2", "ipndm"])
def test_equals_our_solvers_on_edm(mix, name):
    """Without a trailing 0, sample() is exactly solver.sample on EDM(sigma_min, sigma_max) -- decoupled
    model sigmas included."""
    sigmas = random_decreasing_grid(80.0, 0.002, 6, seed=2)
    msig = sigmas.clone()
    msig[1:-1] *= 1.05
    edm = ld3_ext.EDM(0.002, 80.0)
    model = ld3_ext.wrap_model(denoiser_of(mix), edm, prediction="x0", time_input="sigma")
    solver = F.get_solver(name)
    x = x_T()
    ref = solver.sample(model, x, sigmas, msig)
    out = F.sample(denoiser_of(mix), x, sigmas, solver=name, model_sigmas=msig)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_state_converts_eps_as_wrap_model(mix, dtype):
    """A half-precision state: the denoiser's x0 -> eps conversion runs in float32 as wrap_model's models do
    (it ran in half, x - x0 cancelling at small sigma: iPNDM, which steps with eps, was ~1e-2 off solver.sample in
    bfloat16, and farther from the float64 solve)."""
    def d(x, sigma):
        s = sigma.reshape(-1)[0].double()
        return mix.denoise(x.double(), torch.ones_like(s), s).to(x.dtype)
    sigmas = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.2, 0.05, 0.01, 0.002], dtype=torch.float64)
    x = x_T(64).to(dtype)
    # sample() hands a denoiser sigma in x's dtype, as k-diffusion does: a time_input asking for it
    model = ld3_ext.wrap_model(d, ld3_ext.EDM(0.002, 80.0), prediction="x0", time_input=lambda t: t.to(dtype))
    ref = F.get_solver("ipndm").sample(model, x, sigmas)
    torch.testing.assert_close(F.sample(d, x, sigmas, solver="ipndm"), ref, rtol=0, atol=0)


def test_model_sigmas_in_any_order_as_solver_sample(mix):
    """LD3's decoupled network times may meet (shifts of half the smallest gap) or cross: solver.sample and
    LearnedSchedule take them, so sample() must too (it refused them as 'not strictly decreasing')."""
    sigmas = random_decreasing_grid(80.0, 0.002, 6, seed=2)
    msig = sigmas.clone()
    msig[2] = msig[3] = 0.5 * (sigmas[2] + sigmas[3])  # neighbours meeting
    msig[4], msig[5] = sigmas[5] * 1.01, sigmas[4] * 0.99  # a pair swapped
    model = ld3_ext.wrap_model(denoiser_of(mix), ld3_ext.EDM(0.002, 80.0), prediction="x0", time_input="sigma")
    x = x_T()
    for name in ("dpmpp_3m", "heun"):
        ref = F.get_solver(name).sample(model, x, sigmas, msig)
        out = F.sample(denoiser_of(mix), x, sigmas, solver=name, model_sigmas=msig)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # with a trailing 0 the final denoise runs at model_sigmas[-2]; a 0 elsewhere is still refused
    zero = torch.zeros(1, dtype=torch.float64)
    F.sample(denoiser_of(mix), x, torch.cat([sigmas, zero]), model_sigmas=torch.cat([msig, zero]))
    bad = msig.clone()
    bad[3] = 0.0
    with pytest.raises(ValueError, match=r"model_sigmas must be positive"):
        F.sample(denoiser_of(mix), x, sigmas, model_sigmas=bad)


def test_vp_diffusion_model_in_ve_view(mix):
    """A VP DiffusionModel with sigmas = sigma/alpha and x = x_vp/alpha gives the VP solve / alpha (the
    exponential-integrator solvers are invariant under the VP <-> VE change of variables)."""
    sched = ld3_ext.VPCosine()
    model = mix.model(sched)
    t = random_decreasing_grid(sched.t_max, sched.t_min, 6, seed=3, log=False)
    x_vp = torch.randn(8, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for name in ("dpmpp_3m", "unipc", "euler", "ipndm"):
        solver = F.get_solver(name)
        ref = solver.sample(model, x_vp, t) / sched.alpha(t[-1])
        out = F.sample(model, x_vp / sched.alpha(t[0]), sched.edm_sigma(t), solver=solver)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc", "ipndm", "heun"])
def test_vp_diffusion_model_with_decoupled_model_sigmas_is_solver_sample(mix, name):
    """Decoupled model sigmas on a VP DiffusionModel solve LD3's ODE, as solver.sample(t, model_timesteps):
    the network sees the state at its grid time t_i (x_model = alpha(t_i) x) at the model time.  Scaling x by
    alpha(model time) instead (as before) moved the result by ~2e-2 -- a learned VP schedule's decoupled
    times then ran another sampler than the one they were learned for."""
    sched = ld3_ext.VPCosine()
    model = mix.model(sched)
    t = random_decreasing_grid(sched.t_max, sched.t_min, 6, seed=3, log=False)
    tm = t.clone()
    tm[1:-1] *= torch.tensor([1.03, 0.97, 1.02, 0.99, 1.01], dtype=torch.float64)
    x_vp = torch.randn(8, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    solver = F.get_solver(name)
    ref_vp = solver.sample(model, x_vp, t, tm)
    x = x_vp / sched.alpha(t[0])
    out = F.sample(model, x, sched.edm_sigma(t), solver=solver, model_sigmas=sched.edm_sigma(tm))
    torch.testing.assert_close(out, ref_vp / sched.alpha(t[-1]), rtol=1e-9, atol=1e-9)
    # with a trailing 0, the final denoise sees that last state at model_sigmas[-2]
    zero = torch.zeros(1, dtype=torch.float64)
    tm_end = tm.clone()
    tm_end[-1] = t[-2] * 0.5 + t[-1] * 0.5  # a decoupled last model time, to tell it from the state's
    out0 = F.sample(model, x, torch.cat([sched.edm_sigma(t), zero]), solver=solver,
                    model_sigmas=torch.cat([sched.edm_sigma(tm_end), zero]))
    ref0 = model.predict(solver.sample(model, x_vp, t, tm_end), tm_end[-1])[0]
    torch.testing.assert_close(out0, ref0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,nfe_zero,nfe_pos", [("euler", 6, 6), ("dpmpp_3m", 6, 6), ("unipc", 6, 6),
                                                   ("ipndm", 6, 6), ("heun", 2 * 5 + 1, 12)])
def test_nfe(mix, name, nfe_zero, nfe_pos):
    """Trailing 0: multistep NFE = len(sigmas) - 1 (the last interval is one denoising call); Heun 2(len-2)+1."""
    counter = CallCounter(denoiser_of(mix))
    F.sample(counter, x_T(), karras(6, append_zero=True), solver=name)
    assert counter.calls == nfe_zero
    counter.calls = 0
    F.sample(counter, x_T(), karras(7, append_zero=False), solver=name)
    assert counter.calls == nfe_pos


def test_final_denoise_and_callback(mix):
    d = denoiser_of(mix)
    x = x_T()
    seen = []
    out = F.sample(d, x, torch.tensor([80.0, 0.0], dtype=torch.float64), callback=seen.append)
    torch.testing.assert_close(out, d(x, torch.full((8,), 80.0, dtype=torch.float64)))
    assert len(seen) == 1 and set(seen[0]) >= {"x", "i", "sigma", "denoised"}
    seen.clear()
    F.sample(d, x, karras(5), solver="dpmpp_2m", callback=seen.append)
    assert len(seen) == 5


def test_extra_args_and_named_samplers(mix):
    calls = []

    def d(x, sigma, cond=None):
        calls.append(cond)
        return denoiser_of(mix)(x, sigma)

    out = F.sample_dpmpp_2m(d, x_T(), karras(4), extra_args={"cond": "c"})
    assert calls == ["c"] * 4 and torch.isfinite(out).all()
    assert ld3_ext.functional.sample_unipc.__name__ == "sample_unipc"


@pytest.mark.parametrize("bad_call", [2, 3], ids=["mid-grid", "final-denoise"])
def test_denoiser_nan_is_reported_with_its_step(mix, bad_call):
    """A NaN/Inf denoiser output raises ModelOutputError (as wrap_model's models do), for a step of the
    grid and for the final denoise at sigma = 0; check_output=False lets it through (k-diffusion's way)."""
    calls = []

    def d(x, sigma):
        calls.append(1)
        out = denoiser_of(mix)(x, sigma)
        return out * float("nan") if len(calls) == bad_call else out
    # karras(3) + 0: steps 0, 1 on the grid, step 2 the final denoise -- named with or without a callback
    for cb in (None, lambda info: None):
        calls.clear()
        with pytest.raises(ld3_ext.ModelOutputError, match=f"NaN/Inf at step {bad_call - 1} "):
            F.sample(d, x_T(), karras(3), solver="dpmpp_2m", callback=cb)
    calls.clear()
    out = F.sample(d, x_T(), karras(3), solver="dpmpp_2m", check_output=False)
    assert len(calls) == 3 and torch.isnan(out).all()  # 2 steps, then the final denoise
    # a DiffusionModel is checked by its own setting, once
    model = ld3_ext.wrap_model(lambda x, s: x * float("nan"), ld3_ext.EDM(), prediction="x0", time_input="sigma",
                               check_output=False)
    assert torch.isnan(F.sample(model, x_T(), karras(3), solver="dpmpp_2m")).all()


def test_an_explicit_check_output_applies_to_a_diffusion_model_for_that_call():
    """sample(check_output=...) was ignored for a DiffusionModel (its own setting won, both ways)."""
    for own in (True, False):
        model = ld3_ext.wrap_model(lambda x, s: x * float("nan"), ld3_ext.EDM(), prediction="x0",
                                   time_input="sigma", check_output=own)
        with pytest.raises(ld3_ext.ModelOutputError, match="NaN/Inf at step 0"):
            F.sample(model, x_T(), karras(3), solver="dpmpp_2m", check_output=True)
        assert torch.isnan(F.sample(model, x_T(), karras(3), solver="dpmpp_2m", check_output=False)).all()
        assert model.check_output is own  # the caller's model is left as it was
    with pytest.raises(TypeError, match="check_output must be a bool"):
        F.sample(model, x_T(), karras(3), check_output="no")


def test_an_explicit_check_output_runs_the_callers_own_model():
    """The override ran a copy of the model: state the model keeps on itself during the call was lost."""
    class Counting(ld3_ext.DiffusionModel):
        calls = 0

        def predict(self, *a, **k):
            self.calls += 1
            return super().predict(*a, **k)

    model = Counting(lambda x, s: 0.5 * x, ld3_ext.EDM(), prediction="x0", time_input="sigma")
    for check in (None, True, False):
        model.calls = 0
        F.sample(model, x_T(), karras(3), solver="dpmpp_2m", check_output=check)
        assert model.calls == 3 and model.check_output is True, (check, model.calls)
    with pytest.raises(ld3_ext.ModelOutputError):  # the setting comes back after a failing call too
        with model.output_checks(True):
            model.fn = lambda x, s: x * float("nan")
            F.sample(model, x_T(), karras(3), solver="dpmpp_2m", check_output=True)
    assert model.check_output is True


def test_denoiser_integer_output_is_refused(mix):
    """An integer denoiser output is not cast silently (it would carry no gradient): ModelOutputError."""
    with pytest.raises(ld3_ext.ModelOutputError, match=r"torch.int64 tensor at step 0, expected a floating"):
        F.sample(lambda x, sigma: denoiser_of(mix)(x, sigma).round().long(), x_T(), karras(3), solver="dpmpp_2m")


def test_differentiable_in_sigmas(mix):
    sigmas = karras(5, append_zero=False).requires_grad_(True)
    out = F.sample(denoiser_of(mix), x_T(2), sigmas, solver="unipc")
    out.pow(2).sum().backward()
    assert sigmas.grad is not None and torch.isfinite(sigmas.grad).all() and sigmas.grad.abs().sum() > 0


@pytest.mark.parametrize("append_zero", [False, True], ids=["no_zero", "final_denoise"])
def test_gradients_in_sigmas_and_model_sigmas_match_finite_differences(mix, append_zero):
    """The documented gradients w.r.t. sigmas and model_sigmas, against central differences (float64): a
    nonzero gradient alone would not notice a path that is cut (e.g. the model-time path or the final denoise)."""
    d, x = denoiser_of(mix), x_T(2)
    zero = karras(5)[-1:] if append_zero else karras(5)[:0]
    sig = karras(5, append_zero=False)
    msig = sig * torch.linspace(1.1, 0.9, sig.numel(), dtype=torch.float64)  # decoupled network times

    def of_sigmas(s):
        return F.sample(d, x, torch.cat([s, zero]), solver="unipc")

    def of_model_sigmas(m):
        return F.sample(d, x, torch.cat([sig, zero]), model_sigmas=torch.cat([m, zero]), solver="unipc")

    assert torch.autograd.gradcheck(of_sigmas, (sig.clone().requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(of_model_sigmas, (msig.clone().requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_bad_input(mix):
    d = denoiser_of(mix)
    x = x_T()
    with pytest.raises(ValueError, match="solver must be"):
        F.sample(d, x, karras(4), solver="lms")
    with pytest.raises(ValueError, match="strictly decreasing"):
        F.sample(d, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="only the last entry may be 0"):
        F.sample(d, x, torch.tensor([2.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="length"):
        F.sample(d, x, karras(4), model_sigmas=karras(5))
    with pytest.raises(ValueError, match="both end"):
        F.sample(d, x, karras(4), model_sigmas=karras(5, append_zero=False))
    with pytest.raises(TypeError, match="denoiser"):
        F.sample(42, x, karras(4))
    with pytest.raises(TypeError, match="keyword"):
        F.sample(d, x, karras(4), solver=ld3_ext.Euler(), order=2)
    bad = x.clone()
    bad[0, 0] = float("nan")
    for sig in (karras(4), torch.tensor([2.0, 0.0])):  # the second: only the final denoise, no solver step
        with pytest.raises(ValueError, match=r"^x contains NaN/Inf$"):
            F.sample(d, bad, sig)


def test_heun_final_denoise_nan_names_its_step(mix):
    """Heun with a trailing 0: 2 evaluations per interval, then the final denoise is evaluation 2(N-1)."""
    calls = []

    def d(x, sigma):
        calls.append(float(sigma[0]))
        return x * float("nan") if len(calls) == 7 else denoiser_of(mix)(x, sigma)
    with pytest.raises(ld3_ext.ModelOutputError, match="NaN/Inf at step 6 "):
        F.sample(d, x_T(), karras(4), solver="heun")
    assert calls[-1] == pytest.approx(float(karras(4)[-2]), rel=1e-12)  # the 7th call: the final denoise


# --- callback: k-diffusion's (one call per grid interval) -------------------------------------------------

def _record(into):
    def cb(info):
        into.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in info.items()})
    return cb


@pytest.mark.parametrize("ours,theirs,kw", KD_PAIRS, ids=[p[0] for p in KD_PAIRS])
@pytest.mark.parametrize("append_zero", [True, False])
def test_callback_matches_k_diffusion(mix, ours, theirs, kw, append_zero):
    """Same number of calls, same i, sigma, sigma_hat, x and denoised as k-diffusion's sampler (Heun: one
    call per interval, from its first evaluation), so i / (len(sigmas) - 1) stays below 1."""
    from _oracles import load_kdiffusion_sampling

    K = load_kdiffusion_sampling()
    sigmas = karras(6, append_zero=append_zero)
    d = denoiser_of(mix)
    ref, got = [], []
    getattr(K, theirs)(d, x_T(), sigmas, disable=True, callback=_record(ref), **kw)
    F.sample(d, x_T(), sigmas, solver=ours, callback=_record(got))
    assert len(got) == len(ref) == len(sigmas) - 1
    assert [c["i"] for c in got] == [c["i"] for c in ref] == list(range(len(sigmas) - 1))
    for a, b in zip(got, ref):
        assert set(a) == set(b)
        for k in ("sigma", "sigma_hat"):
            torch.testing.assert_close(torch.as_tensor(a[k], dtype=torch.float64),
                                       torch.as_tensor(b[k], dtype=torch.float64), rtol=1e-12, atol=0)
        torch.testing.assert_close(a["x"], b["x"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a["denoised"], b["denoised"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_heun_callback_once_per_interval(mix, backend, grad):
    """Both Heun backends (and the whole-sampler autograd path) report the first evaluation of each interval;
    with decoupled model sigmas, sigma is the grid's and sigma_hat where the network ran."""
    sigmas = karras(5, append_zero=False)
    msig = sigmas.clone()
    msig[1:-1] *= 1.03
    seen = []
    x = x_T().requires_grad_(grad)
    F.sample(denoiser_of(mix), x, sigmas, solver="heun", backend=backend, model_sigmas=msig, callback=_record(seen))
    assert [c["i"] for c in seen] == [0, 1, 2, 3]
    assert [float(c["sigma"]) for c in seen] == sigmas[:-1].tolist()
    assert [float(c["sigma_hat"]) for c in seen] == msig[:-1].tolist()


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun"])
def test_backward_re_evaluations_do_not_call_back(mix, solver):
    """The network evaluations a backward pass redoes (a second backward, double backward) are not new steps:
    no callback for them."""
    seen = []
    x = x_T().requires_grad_(True)
    y = F.sample(denoiser_of(mix), x, karras(5, append_zero=False), solver=solver, callback=_record(seen))
    assert len(seen) == 4
    y.pow(2).sum().backward(retain_graph=True)
    y.pow(2).sum().backward(retain_graph=True)  # the graphs were consumed: the network is evaluated again
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    torch.autograd.grad(g.sum(), x)
    assert len(seen) == 4


# --- DiffusionModel with its own schedule: sigmas must be in its range ------------------------------------

def _sd_model():
    calls = []

    def net(x, t):
        calls.append(float(t.reshape(-1)[0]))
        return torch.zeros_like(x)
    sched = ld3_ext.VPDiscrete.linear(0.00085, 0.012)  # Stable Diffusion's: edm sigma 0.0292 .. 14.61
    return ld3_ext.wrap_model(net, sched, prediction="eps"), sched, calls


def test_sigmas_outside_a_model_schedule_are_refused():
    model, sched, calls = _sd_model()
    x = torch.randn(2, 4, dtype=torch.float64)
    lo, hi = sched.edm_sigma(torch.tensor([sched.t_min, sched.t_max], dtype=torch.float64)).tolist()
    with pytest.raises(ValueError, match=r"sigmas must lie in the model's sigma range \[0.029\d*, 14.61\d*\]"):
        F.sample(model, x, karras(5), solver="euler")  # Karras 80 -> 0.002: would run at index 1280 and -1
    # just past either end is not round-off (t off by 1.6e-5 and 1e-5: tolerance 1e-6)
    for bad in (torch.tensor([hi * 1.0001, 1.0, 0.0]), torch.tensor([hi, 1.0, lo * 0.99])):
        with pytest.raises(ValueError, match="sigmas must lie"):
            F.sample(model, x, bad.double(), solver="euler")
    with pytest.raises(ValueError, match="model_sigmas must lie"):
        F.sample(model, x, torch.tensor([hi, 1.0, lo, 0.0], dtype=torch.float64), solver="euler",
                 model_sigmas=torch.tensor([hi, 1.0, lo / 2, 0.0], dtype=torch.float64))
    assert calls == []  # refused before the network runs
    # the full range, through float32 round-off, with a trailing 0, is accepted
    t = ld3_ext.discretizations.logsnr_uniform(sched, 5)
    sig = torch.cat([sched.edm_sigma(t).float(), torch.zeros(1)])
    assert sig[0] == torch.tensor(hi, dtype=torch.float32) and sig[-2] == torch.tensor(lo, dtype=torch.float32)
    out = F.sample(model, x.float(), sig, solver="dpmpp_2m")
    assert torch.isfinite(out).all() and len(calls) == t.numel()  # N steps, then the final denoise
    assert -1e-3 <= min(calls) and max(calls) <= 999 + 1e-3  # the network's indices stay in 0..999


def test_to_denoiser_refuses_sigma_outside_the_schedule():
    model, sched, calls = _sd_model()
    d = F.to_denoiser(model)
    x = torch.randn(2, 4, dtype=torch.float64)
    hi = float(sched.edm_sigma(torch.tensor(sched.t_max, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"sigma must lie in the model's sigma range \[0.029\d*, 14.61\d*\]"):
        d(x, torch.full((2,), 80.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma must lie"):
        d(x, torch.full((2,), 0.002, dtype=torch.float64))
    assert calls == []
    assert torch.isfinite(d(x, torch.full((2,), hi, dtype=torch.float64))).all() and len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_denoiser_takes_the_range_ends_rounded_to_a_half_state(dtype):
    """k-diffusion passes sigma * ones in x's dtype: SD's sigma_max 14.6146 arrives as 14.617 (float16) or 14.625
    (bfloat16), past the range by the dtype's round-off only.  It is the range's end (it was refused, so a half
    state could not start from the model's own sigma_max), also when it arrives in a wider dtype with a half state
    (ld3_ext.sample hands a float32 image of its half grid: refused before, half-precision audit); with a float32
    state a float64 14.625, or anything past the half round-off, is not."""
    model, sched, calls = _sd_model()
    d = F.to_denoiser(model)
    lo, hi = sched.edm_sigma(torch.tensor([sched.t_min, sched.t_max], dtype=torch.float64)).tolist()
    x = torch.randn(2, 4).to(dtype)
    sig = torch.full((2,), hi).to(dtype)
    assert float(sig[0]) > hi  # rounded off the range
    assert d(x, sig).dtype == dtype
    assert calls[-1] == pytest.approx(999.0, abs=1e-9)  # evaluated at the end, not past it
    assert d(x, torch.full((2,), lo).to(dtype)).dtype == dtype  # the low end (rounded either way)
    assert 0.0 <= calls[-1] < 0.01
    wide = torch.full((2,), float(torch.tensor(hi).to(dtype)), dtype=torch.float64)
    assert d(x, wide).dtype == dtype and calls[-1] == pytest.approx(999.0, abs=1e-9)
    for xx, bad in ((x.float(), wide), (x, torch.full((2,), hi * 1.01).to(dtype))):
        with pytest.raises(ValueError, match="sigma must lie"):
            d(xx, bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sample_takes_sigmas_rounded_past_the_range_ends_by_their_dtype(dtype):
    """The same rule for sample(): a half grid from the model's own sigma_max (k-diffusion's get_sigmas in the
    state's dtype) starts at the range's end instead of being refused; past the round-off it still is."""
    model, sched, calls = _sd_model()
    lo, hi = sched.edm_sigma(torch.tensor([sched.t_min, sched.t_max], dtype=torch.float64)).tolist()
    x = torch.randn(2, 4).to(dtype)
    sigmas = torch.tensor([hi, 5.0, 1.0, lo]).to(dtype)
    assert float(sigmas[0]) > hi  # rounded off the range
    out = F.sample(model, x, sigmas, solver="euler")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert calls[0] == pytest.approx(999.0, abs=1e-9)  # the first evaluation at the end, not past it
    calls.clear()
    F.sample(model, x, torch.tensor([8.0, 1.0, 0.0]).to(dtype), model_sigmas=torch.tensor([hi, 1.0, 0.0]).to(dtype),
             solver="euler")
    assert calls[0] == pytest.approx(999.0, abs=1e-9)
    for bad in (sigmas.double(), torch.tensor([hi * 1.01, 1.0, 0.0]).to(dtype)):
        with pytest.raises(ValueError, match="sigmas must lie"):
            F.sample(model, x, bad, solver="euler")


# --- k-diffusion's sampler signatures ---------------------------------------------------------------------

def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]


@pytest.mark.parametrize("ours,theirs", [("sample_euler", "sample_euler"), ("sample_heun", "sample_heun"),
                                         ("sample_dpmpp_2m", "sample_dpmpp_2m"),
                                         ("sample_dpmpp_3m", "sample_dpmpp_3m_sde")])
def test_named_samplers_have_k_diffusion_signatures(ours, theirs):
    """Same parameters, in k-diffusion's order, with its defaults -- except eta, whose default is the
    deterministic 0 (k-diffusion's sample_dpmpp_3m_sde defaults to the SDE, eta = 1)."""
    from _oracles import load_kdiffusion_sampling

    K = load_kdiffusion_sampling()
    mine, ref = _params(getattr(F, ours)), _params(getattr(K, theirs))
    if theirs == "sample_dpmpp_3m_sde":
        ref = [(n, 0.0 if n == "eta" else v) for n, v in ref]
    assert mine == ref
    assert getattr(F, ours).__name__ == ours


def test_named_samplers_accept_deterministic_noise_arguments(mix):
    d = denoiser_of(mix)
    sig = karras(5)
    for name, kw in [("euler", dict(s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0)),
                     ("heun", dict(s_churn=0.0, s_noise=0.5)),  # s_noise only scales churn noise
                     ("heun", dict(s_churn=1.0, s_tmin=100.0)),  # the churn window misses every sigma
                     ("dpmpp_3m", dict(eta=0.0, s_noise=1.0, noise_sampler=None))]:
        out = getattr(F, f"sample_{name}")(d, x_T(), sig, None, None, True, **kw)
        torch.testing.assert_close(out, F.sample(d, x_T(), sig, solver=name), rtol=0, atol=0)
    # k-diffusion's positional order: extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise
    torch.testing.assert_close(F.sample_euler(d, x_T(), sig, None, None, None, 0.0, 0.0, math.inf, 1.0),
                               F.sample(d, x_T(), sig, solver="euler"), rtol=0, atol=0)


def test_named_samplers_refuse_stochastic_arguments(mix):
    d = denoiser_of(mix)
    with pytest.raises(ValueError, match=r"s_churn=0.5 > 0 .*stochastic"):
        F.sample_euler(d, x_T(), karras(5), s_churn=0.5)
    with pytest.raises(ValueError, match=r"s_churn=1.0 > 0"):
        F.sample_heun(d, x_T(), karras(5), s_churn=1.0, s_tmin=0.05, s_tmax=1.0)  # window holds 2 sigmas
    with pytest.raises(ValueError, match="s_churn must be a number >= 0"):
        F.sample_heun(d, x_T(), karras(5), s_churn=-0.1)
    with pytest.raises(ValueError, match=r"eta=1.0 > 0 .*stochastic"):
        F.sample_dpmpp_3m(d, x_T(), karras(5), eta=1.0)
    with pytest.raises(ValueError, match="eta must be"):
        F.sample_dpmpp_3m(d, x_T(), karras(5), eta=float("nan"))


@pytest.mark.parametrize("name", ["step", "returns"])
def test_model_keywords_named_like_predicts_own_are_refused_on_every_path(name):
    """A final-denoise-only grid and to_denoiser passed extra_args straight to predict: returns='eps' made the
    result None, step was swallowed (or clashed).  Now refused by name, as solver.sample refuses them."""
    model, sched, calls = _sd_model()
    x = torch.randn(2, 4, dtype=torch.float64)
    for sigmas in ([1.0, 0.0], [5.0, 1.0, 0.0]):
        with pytest.raises(TypeError, match=rf"extra_args: model keyword arguments \['{name}'\] clash"):
            F.sample(model, x, sigmas, solver="euler", extra_args={name: "eps" if name == "returns" else 1})
    d = F.to_denoiser(model)
    with pytest.raises(TypeError, match=rf"model keyword arguments \['{name}'\] clash"):
        d(x, torch.full((2,), 1.0, dtype=torch.float64), **{name: "eps" if name == "returns" else 3})
    assert calls == []


@pytest.mark.parametrize("checkpoint", [False, True])
def test_an_explicit_check_output_holds_for_the_backward_too(checkpoint):
    """checkpoint_model=True re-evaluates the network in the backward, after sample() returned: the call's
    check_output=False must still hold there (it did not once the override was undone on return)."""
    model = ld3_ext.DiffusionModel(lambda x, s: x * float("nan"), ld3_ext.EDM(), prediction="x0",
                                   time_input="sigma")
    x = x_T(2).requires_grad_()
    out = F.sample(model, x, karras(3), solver="dpmpp_2m", check_output=False, checkpoint_model=checkpoint)
    out.sum().backward()
    assert torch.isnan(out).all() and model.check_output is True


def test_an_explicit_check_output_is_per_thread_and_leaves_the_model_setting_alone():
    """Two threads sharing one model: each call's override holds only for its own evaluations, and the model's
    own setting is the same afterwards (a save/set/restore of the attribute interleaved and lost it)."""
    import threading
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def net(x, s):
        name = threading.current_thread().name
        if name == "A":
            a_in.set()
            b_in.wait(5)
        elif name == "B":
            b_in.set()
            a_done.wait(5)
        return x * float("nan")

    model = ld3_ext.DiffusionModel(net, ld3_ext.EDM(), prediction="x0", time_input="sigma")

    def run(name, check):
        try:
            F.sample(model, x_T(2), karras(2, append_zero=False), solver="euler", check_output=check)
            seen[name] = "passed"
        except ld3_ext.ModelOutputError:
            seen[name] = "raised"
        finally:
            if name == "A":
                a_done.set()

    ta = threading.Thread(target=run, args=("A", False), name="A")
    tb = threading.Thread(target=lambda: (a_in.wait(5), run("B", True)), name="B")
    ta.start(); tb.start(); ta.join(10); tb.join(10)  # noqa: E702
    assert seen == {"A": "passed", "B": "raised"} and model.check_output is True


@pytest.mark.parametrize("sigmas", [[10.0, 1.0, 0.0], [10.0, 0.0]])
def test_x_is_named_in_its_own_terms(sigmas):
    """sample() calls its state x: an empty batch was refused as 'x_T' (the solver's name; a final-denoise-only
    grid reached no solver at all), a meta x failed later naming nothing."""
    den = lambda x, sigma: 0.5 * x
    for bad, match in ((torch.randn(0, 3), r"x must have a non-empty batch dimension, got shape \(0, 3\)"),
                       (torch.tensor(1.0), r"x must have a non-empty batch dimension, got shape \(\)"),
                       (torch.randn(2, 3, device="meta"), "x is on the meta device")):
        with pytest.raises(ValueError, match=match):
            ld3_ext.sample(den, bad, torch.tensor(sigmas))
    assert ld3_ext.sample(den, torch.randn(1, 3), torch.tensor(sigmas)).shape == (1, 3)


@pytest.mark.parametrize("bad", ["a", None, [1.0, "x"]])
def test_to_denoiser_names_a_sigma_that_is_not_numbers(bad):
    den = ld3_ext.to_denoiser(ld3_ext.testbeds.ring2d().model(ld3_ext.EDM()))
    with pytest.raises(TypeError, match="sigma must be a number or a tensor of sigmas"):
        den(torch.randn(2, 2), bad)
