"""ld3_ext.functional: the k-diffusion-style API, against k_diffusion.sampling and against our solvers."""
from __future__ import annotations


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
    with pytest.raises(ld3_ext.ModelOutputError, match="NaN/Inf" + (" at step 1" if bad_call == 2 else "")):
        F.sample(d, x_T(), karras(3), solver="dpmpp_2m")
    calls.clear()
    out = F.sample(d, x_T(), karras(3), solver="dpmpp_2m", check_output=False)
    assert len(calls) == 3 and torch.isnan(out).all()  # 2 steps, then the final denoise
    # a DiffusionModel is checked by its own setting, once
    model = ld3_ext.wrap_model(lambda x, s: x * float("nan"), ld3_ext.EDM(), prediction="x0", time_input="sigma",
                               check_output=False)
    assert torch.isnan(F.sample(model, x_T(), karras(3), solver="dpmpp_2m")).all()


def test_denoiser_integer_output_is_refused(mix):
    """An integer denoiser output is not cast silently (it would carry no gradient): ModelOutputError."""
    with pytest.raises(ld3_ext.ModelOutputError, match=r"torch.int64 tensor at step 0, expected a floating"):
        F.sample(lambda x, sigma: denoiser_of(mix)(x, sigma).round().long(), x_T(), karras(3), solver="dpmpp_2m")


def test_differentiable_in_sigmas(mix):
    sigmas = karras(5, append_zero=False).requires_grad_(True)
    out = F.sample(denoiser_of(mix), x_T(2), sigmas, solver="unipc")
    out.pow(2).sum().backward()
    assert sigmas.grad is not None and torch.isfinite(sigmas.grad).all() and sigmas.grad.abs().sum() > 0


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
