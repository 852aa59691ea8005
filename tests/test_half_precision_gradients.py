"""Gradients through a half-precision solve near VPLinear's t=1, where alpha^2 ~ 4e-5: an eps network's
eps -> x0 conversion and an "edm" network's input scaling x/alpha divide by alpha, and done in float16
their backward overflowed (dL/d model_timesteps[0] = +-inf on both backends).  Both run in float32 for
half states."""
from __future__ import annotations

import pytest
import torch

import ld3_ext
from ld3_ext.discretizations import get_discretization
from ld3_ext.solvers import make_solver
from ld3_ext.testbeds import GaussianMixture

D = 3 * 8 * 8


DATA = GaussianMixture([[0.3] * D], [[0.5] * D], event_shape=(3, 8, 8))  # N(0.3, 0.5^2) per pixel


def _float32(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _eps_network(schedule, float32_output: bool = True):
    """The exact noise prediction, computed in float32 for a half x (as a network under autocast would);
    its output is float32 or rounded to x's dtype."""
    def fn(x, t):
        xw = _float32(x)
        t0 = t.reshape(-1)[0]
        alpha, sigma = schedule.alpha(t0).to(xw.dtype), schedule.sigma(t0).to(xw.dtype)
        eps = (xw - alpha * DATA.denoise(xw, alpha, sigma)) / sigma
        return eps if float32_output else eps.to(x.dtype)
    return ld3_ext.wrap_model(fn, schedule, prediction="eps", time_input="t")


def _edm_network(schedule):
    """The exact k-diffusion style denoiser D(x/alpha, sigma/alpha) -> x0, in float32 for a half x."""
    def fn(x_scaled, edm_sigma):
        xw = _float32(x_scaled)
        return DATA.denoise(xw, torch.ones((), dtype=xw.dtype), edm_sigma.reshape(-1)[0].to(xw.dtype))
    return ld3_ext.wrap_model(fn, schedule, prediction="edm")


def _gradients(solver_name, backend, dtype, network=_eps_network):
    """d(sum of squares of the sample) w.r.t. x_T, timesteps and model_timesteps (the first at t=1)."""
    schedule = ld3_ext.VPLinear()
    model = network(schedule)
    g = torch.Generator().manual_seed(0)
    x_T = (torch.randn(64, 3, 8, 8, dtype=torch.float64, generator=g) * schedule.prior_std()).to(dtype)
    x_T.requires_grad_()
    t = get_discretization("logsnr", schedule, 6).double().requires_grad_()
    tm = t.detach().clone().requires_grad_()
    out = make_solver(solver_name, backend=backend).sample(model, x_T, t, tm)
    return torch.autograd.grad(out.float().square().sum(), [x_T, t, tm])


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# measured relative errors against float32 (float16, bfloat16): x_T 1e-2 / 7e-2 (the reference backend's
# per-step half gradients), timesteps 3e-4 / 4e-3, model_timesteps 3e-4 / 3e-3, its first entry (at t=1)
# 2e-4 / 7e-3; before the fix that entry was -inf in float16 and 6x too large with the wrong sign in bfloat16
BOUNDS = {torch.float16: {"x_T": 0.05, "timesteps": 3e-3, "model_timesteps": 3e-3, "first": 2e-3},
          torch.bfloat16: {"x_T": 0.3, "timesteps": 3e-2, "model_timesteps": 3e-2, "first": 5e-2}}


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver_name", ["dpmpp", "unipc"])
def test_half_state_gradients_match_float32(solver_name, dtype, backend):
    want = _gradients(solver_name, backend, torch.float32)
    got = _gradients(solver_name, backend, dtype)
    for name, g, w in zip(("x_T", "timesteps", "model_timesteps"), got, want):
        assert bool(torch.isfinite(g).all()), f"{name}: non-finite gradient {g.flatten()[:4].tolist()}"
        err = _relative(g, w)
        assert err < BOUNDS[dtype][name], f"{name}: relative error {err:.3g} against float32"
    first, want_first = float(got[2][0]), float(want[2][0])
    assert abs(first - want_first) < BOUNDS[dtype]["first"] * abs(want_first), (first, want_first)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_half_network_output_gives_finite_time_gradients(backend):
    # a float16 network output carries only float16's digits into x0 = (x - sigma eps) / alpha, so near t=1
    # dL/d model_timesteps[0] is not accurate; but it must stay finite, and the gradients as a whole stay near the
    # float32 network's (measured relative errors 1.0e-2, 9.8e-3 and 2.2e-3 for x_T, timesteps and model_timesteps)
    half_output = lambda schedule: _eps_network(schedule, float32_output=False)  # noqa: E731
    got = _gradients("dpmpp", backend, torch.float16, half_output)
    want = _gradients("dpmpp", backend, torch.float32)
    for name, g, w, bound in zip(("x_T", "timesteps", "model_timesteps"), got, want, (0.05, 0.05, 0.02)):
        assert bool(torch.isfinite(g).all()), name
        assert _relative(g, w) < bound, f"{name}: relative error {_relative(g, w):.3g} against float32"


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver_name", ["dpmpp", "ipndm"])
def test_edm_network_time_gradient_in_half_precision(solver_name, dtype, backend):
    # measured: dL/d model_timesteps[0] within 1.3e-3 (float16) / 9e-3 (bfloat16) of float32; +-inf in
    # float16 before the input scaling ran in float32
    want = _gradients(solver_name, backend, torch.float32, _edm_network)
    got = _gradients(solver_name, backend, dtype, _edm_network)
    assert all(bool(torch.isfinite(g).all()) for g in got)
    first, want_first = float(got[2][0]), float(want[2][0])
    assert abs(first - want_first) < {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype] * abs(want_first), \
        (first, want_first)
