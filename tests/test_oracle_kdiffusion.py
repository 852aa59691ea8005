"""Oracle: our solvers vs k-diffusion's samplers (k_diffusion/sampling.py, 0.1.1.post1), float64.

Setup: EDM schedule (alpha = 1, sigma = t), the exact denoiser of a Gaussian mixture (ld3_ext.testbeds)
as a k-diffusion style model ``denoiser(x, sigma) -> x0``, and random strictly decreasing float sigma
grids that end at sigma_min > 0 (so k-diffusion never takes its "denoise to zero" branch).
Correspondence:
  sample_euler                    <-> Euler
  sample_heun (s_churn = 0)       <-> Heun
  sample_dpmpp_2m                 <-> DPMSolverPP(order=2, solver_type="midpoint", lower_order_final=False)
                                      (k-diffusion takes a 2nd-order last step when sigma_next > 0)
  sample_dpmpp_3m_sde(eta = 0)    <-> DPMSolverPP(order=3, solver_type="heun", lower_order_final=False)
Both sides compute in float64, so they must agree to round-off (1e-10 relative; measured ~1e-15).
"""
from __future__ import annotations

import pytest
import torch

import ld3_ext
from conftest import random_decreasing_grid, smooth_mixture, CallCounter
from _oracles import load_kdiffusion_sampling

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("single_thread")]
RTOL = 1e-10


@pytest.fixture(scope="module")
def K():
    return load_kdiffusion_sampling()


@pytest.fixture(scope="module")
def setup():
    sched = ld3_ext.EDM(0.002, 80.0)
    gm = smooth_mixture(dim=3, n_modes=4, std=0.3, seed=3)

    def denoiser(x, sigma):  # k-diffusion convention: sigma is a [B] tensor
        s = sigma.reshape(-1)[0]
        return gm.denoise(x, torch.ones((), dtype=x.dtype), s)

    x_T = 80.0 * torch.randn(6, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return sched, denoiser, x_T


def _kd_runs(K):
    no_noise = lambda *a, **k: 0.0  # noqa: E731 -- eta = 0 never uses it; avoids building a Brownian tree
    return {
        "euler": (lambda: ld3_ext.Euler(backend="reference"),
                  lambda m, x, s: K.sample_euler(m, x, s, disable=True)),
        "heun": (lambda: ld3_ext.Heun(backend="reference"),
                 lambda m, x, s: K.sample_heun(m, x, s, disable=True, s_churn=0.0)),
        # the fused backend runs Heun as a chain of multistep updates (other rounding, same method)
        "heun_fused": (lambda: ld3_ext.Heun(backend="fused"),
                       lambda m, x, s: K.sample_heun(m, x, s, disable=True, s_churn=0.0)),
        "dpmpp_2m": (lambda: ld3_ext.DPMSolverPP(2, solver_type="midpoint", lower_order_final=False, backend="reference"),
                     lambda m, x, s: K.sample_dpmpp_2m(m, x, s, disable=True)),
        "dpmpp_3m": (lambda: ld3_ext.DPMSolverPP(3, solver_type="heun", lower_order_final=False, backend="reference"),
                     lambda m, x, s: K.sample_dpmpp_3m_sde(m, x, s, eta=0.0, disable=True, noise_sampler=no_noise)),
    }


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["euler", "heun", "heun_fused", "dpmpp_2m", "dpmpp_3m"])
@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (3, 2), (7, 3), (12, 4)])
def test_matches_kdiffusion_on_random_grids(K, setup, name, n, seed):
    sched, denoiser, x_T = setup
    ours_factory, theirs = _kd_runs(K)[name]
    # random float grid strictly inside (sigma_min, sigma_max) except the end points
    sig = random_decreasing_grid(80.0, 0.002, n, seed=seed)
    model = ld3_ext.wrap_model(denoiser, sched, prediction="edm")
    ours = ours_factory().sample(model, x_T, sig)
    ref = theirs(denoiser, x_T.clone(), sig.clone())
    assert ours.dtype == torch.float64
    assert rel_err(ours, ref) < RTOL, (name, n, rel_err(ours, ref))


@pytest.mark.parametrize("name", ["euler", "heun", "heun_fused", "dpmpp_2m", "dpmpp_3m"])
def test_matches_kdiffusion_on_sub_range(K, setup, name):
    """A grid that does not start at sigma_max nor end at sigma_min (any float sigmas in range)."""
    sched, denoiser, x_T = setup
    ours_factory, theirs = _kd_runs(K)[name]
    sig = random_decreasing_grid(17.3, 0.0131, 6, seed=11)
    model = ld3_ext.wrap_model(denoiser, sched, prediction="edm")
    x = x_T * (17.3 / 80.0)
    assert rel_err(ours_factory().sample(model, x, sig), theirs(denoiser, x.clone(), sig.clone())) < RTOL


@pytest.mark.parametrize("name", ["euler", "heun", "heun_fused", "dpmpp_2m", "dpmpp_3m"])
def test_same_number_of_model_calls_as_kdiffusion(K, setup, name):
    sched, denoiser, x_T = setup
    ours_factory, theirs = _kd_runs(K)[name]
    sig = random_decreasing_grid(80.0, 0.002, 5, seed=5)
    c_ours, c_theirs = CallCounter(denoiser), CallCounter(denoiser)
    ours_factory().sample(ld3_ext.wrap_model(c_ours, sched, prediction="edm"), x_T, sig)
    theirs(c_theirs, x_T.clone(), sig.clone())
    assert c_ours.calls == c_theirs.calls == (10 if name.startswith("heun") else 5)


def test_mixture_model_and_edm_denoiser_agree(K, setup):
    """The testbed's own x0-model and the k-diffusion style denoiser are the same function."""
    sched, denoiser, x_T = setup
    gm = smooth_mixture(dim=3, n_modes=4, std=0.3, seed=3)
    sig = random_decreasing_grid(80.0, 0.002, 6, seed=9)
    a = ld3_ext.DPMSolverPP(3, backend="reference").sample(gm.model(sched), x_T, sig)
    b = ld3_ext.DPMSolverPP(3, backend="reference").sample(ld3_ext.wrap_model(denoiser, sched, prediction="edm"), x_T, sig)
    assert rel_err(a, b) < 1e-13


def test_tolerance_is_able_to_fail(K, setup):
    """A perturbed grid (one sigma moved by 1e-6 relative) must be detected by the 1e-10 tolerance."""
    sched, denoiser, x_T = setup
    sig = random_decreasing_grid(80.0, 0.002, 7, seed=3)
    sig2 = sig.clone()
    sig2[3] *= 1.0 + 1e-6
    model = ld3_ext.wrap_model(denoiser, sched, prediction="edm")
    ours = ld3_ext.DPMSolverPP(2, lower_order_final=False, backend="reference").sample(model, x_T, sig2)
    ref = K.sample_dpmpp_2m(denoiser, x_T.clone(), sig.clone(), disable=True)
    assert rel_err(ours, ref) > RTOL
