"""Oracle: our solvers vs diffusers 0.42.x schedulers driven on arbitrary float sigma grids.

Coordinates (made explicit because diffusers and we use different ones):
  * diffusers' ``scheduler.sigmas`` are the variance-exploding noise levels  s = sigma_t/alpha_t
    (``edm_sigma`` here), and its multistep schedulers hold the state in VP coordinates with
    alpha_t = 1/sqrt(1 + s^2), sigma_t = s alpha_t (``_sigma_to_alpha_sigma_t``).
  * Our EDM schedule has alpha = 1, sigma = t = s, i.e. the VE state.  Hence
        x_vp = x_ve * alpha_t = x_ve / sqrt(1 + s^2),
    and the data prediction x0 is the same in both views (E[x0 | x_t] does not depend on the scaling).
    DPM-Solver++ and UniPC are exponential integrators in lambda = -log s, which is the same number in
    both views, so the two solves are the same computation expressed in different coordinates.
  * The model given to diffusers is the mixture's exact posterior mean evaluated at the VP state:
    gm.denoise(x_vp, alpha_t, sigma_t) ("sample" prediction) or the matching epsilon
    (x_vp - alpha_t x0)/sigma_t ("epsilon").
  * diffusers truncates float timesteps to ints, so we call ``set_timesteps(N)`` (which only fixes the
    number of steps and the integer labels passed back to ``step``) and then overwrite
    ``scheduler.sigmas`` with our float64 grid (N + 1 entries, ending at sigma_min > 0, i.e.
    ``final_sigmas_type="sigma_min"``).  Every coefficient is computed from ``scheduler.sigmas``.
  * EulerDiscreteScheduler keeps the VE state x_ve (init_noise_sigma = s_max) and its
    ``scale_model_input`` hands the model x_ve/sqrt(1 + s^2) = x_vp.

Tolerances:
  * UniPCMultistepScheduler computes in the sample's dtype: float64 end to end -> 1e-12 relative.
  * DPMSolverMultistepScheduler.step and EulerDiscreteScheduler.step cast the state to float32 at every
    step (``sample = sample.to(torch.float32)``), so each step adds ~6e-8 relative rounding; through
    step() we require 2e-6 relative (measured 1e-7 .. 5e-7).  Euler in the VE view additionally cancels
    O(sigma_max) terms in float32 (measured 7e-6 relative for one step 80 -> 0.002), so it also gets
    8 float32 ulps of |x_T| of absolute slack.  The same DPM-Solver++ update
    functions driven without that cast (float64 state) must agree to 1e-12.
"""
from __future__ import annotations

import pytest
import torch

import ld3_ext
from conftest import random_decreasing_grid, smooth_mixture

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("single_thread")]

RTOL_F64 = 1e-12
RTOL_F32_STATE = 2e-6


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def gm():
    return smooth_mixture(dim=4, n_modes=3, std=0.3, seed=1)


@pytest.fixture(scope="module")
def edm_sched():
    return ld3_ext.EDM(0.002, 80.0)


def _vp_alpha_sigma(s):
    alpha = 1.0 / torch.sqrt(1.0 + s * s)
    return alpha, s * alpha


def run_diffusers_multistep(scheduler, sigmas, x_T_ve, gm, prediction="sample"):
    """Drive a DPM-Solver/UniPC multistep scheduler on the float VE-sigma grid ``sigmas``; returns x_ve."""
    n = sigmas.numel() - 1
    scheduler.set_timesteps(n)
    assert len(scheduler.timesteps) == n
    scheduler.sigmas = sigmas.clone()  # float64 VE sigmas, overwrite the truncated-integer ones
    x = x_T_ve * _vp_alpha_sigma(sigmas[0])[0]  # x_vp
    for i, ts in enumerate(scheduler.timesteps):
        a, s = _vp_alpha_sigma(sigmas[i])
        x0 = gm.denoise(x, a, s)
        out = x0 if prediction == "sample" else (x - a * x0) / s
        x = scheduler.step(out, ts, x).prev_sample
    return x / _vp_alpha_sigma(sigmas[-1])[0]


def dpm_kwargs(order, solver_type, lower_order_final=False, prediction="sample"):
    return dict(solver_order=order, algorithm_type="dpmsolver++", solver_type=solver_type,
                final_sigmas_type="sigma_min", lower_order_final=lower_order_final, prediction_type=prediction)


# ------------------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, data prediction)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("prediction", ["sample", "epsilon"])
def test_dpmsolver_multistep_step(gm, edm_sched, order, solver_type, prediction):
    sig = random_decreasing_grid(80.0, 0.002, 9, seed=order)
    x_T = 80.0 * torch.randn(5, 4, generator=torch.Generator().manual_seed(order), dtype=torch.float64)
    ref = run_diffusers_multistep(DPMSolverMultistepScheduler(**dpm_kwargs(order, solver_type, prediction=prediction)),
                                  sig, x_T, gm, prediction)
    ours = ld3_ext.DPMSolverPP(order, solver_type=solver_type, lower_order_final=False,
                               backend="reference").sample(gm.model(edm_sched), x_T, sig)
    assert rel_err(ours, ref) < RTOL_F32_STATE


@pytest.mark.parametrize("order", [2, 3])
def test_dpmsolver_multistep_lower_order_final(gm, edm_sched, order):
    """Below 15 steps diffusers' lower_order_final makes the last step 1st and the one before <= 2nd order."""
    sig = random_decreasing_grid(80.0, 0.002, 6, seed=21)
    x_T = 80.0 * torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = run_diffusers_multistep(DPMSolverMultistepScheduler(**dpm_kwargs(order, "midpoint", lower_order_final=True)),
                                  sig, x_T, gm)
    ours = ld3_ext.DPMSolverPP(order, lower_order_final=True, backend="reference").sample(gm.model(edm_sched), x_T, sig)
    assert rel_err(ours, ref) < RTOL_F32_STATE
    other = ld3_ext.DPMSolverPP(order, lower_order_final=False, backend="reference").sample(gm.model(edm_sched), x_T, sig)
    assert rel_err(other, ref) > 100 * RTOL_F32_STATE  # the comparison can tell the two apart


def run_dpm_update_functions_float64(scheduler, sigmas, x_T_ve, gm, order):
    """diffusers' DPM-Solver++ update functions with step()'s bookkeeping but no float32 cast."""
    n = sigmas.numel() - 1
    scheduler.set_timesteps(n)
    scheduler.sigmas = sigmas.clone()
    scheduler._step_index = 0
    x = x_T_ve * _vp_alpha_sigma(sigmas[0])[0]
    for i in range(n):
        a, s = _vp_alpha_sigma(sigmas[i])
        mo = scheduler.convert_model_output(gm.denoise(x, a, s), sample=x)
        for k in range(order - 1):
            scheduler.model_outputs[k] = scheduler.model_outputs[k + 1]
        scheduler.model_outputs[-1] = mo
        p = min(order, scheduler.lower_order_nums + 1)
        if p == 1:
            x = scheduler.dpm_solver_first_order_update(mo, sample=x)
        elif p == 2:
            x = scheduler.multistep_dpm_solver_second_order_update(scheduler.model_outputs, sample=x)
        else:
            x = scheduler.multistep_dpm_solver_third_order_update(scheduler.model_outputs, sample=x)
        scheduler.lower_order_nums = min(scheduler.lower_order_nums + 1, order)
        scheduler._step_index += 1
    assert x.dtype == torch.float64
    return x / _vp_alpha_sigma(sigmas[-1])[0]


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmsolver_update_formulas_float64(gm, edm_sched, order, solver_type):
    sig = random_decreasing_grid(80.0, 0.002, 8, seed=10 + order)
    x_T = 80.0 * torch.randn(5, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = run_dpm_update_functions_float64(DPMSolverMultistepScheduler(**dpm_kwargs(order, solver_type)), sig, x_T, gm, order)
    ours = ld3_ext.DPMSolverPP(order, solver_type=solver_type, lower_order_final=False,
                               backend="reference").sample(gm.model(edm_sched), x_T, sig)
    assert rel_err(ours, ref) < RTOL_F64


# ------------------------------------------------------------------------------------------------
# UniPC (bh1 / bh2, orders 1-3); diffusers applies UniC at the start of the next step() call with the
# model output at the predictor point - the same thing as our corrector, which reuses that output.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("lower_order_final", [False, True])
def test_unipc_multistep(gm, edm_sched, order, variant, lower_order_final):
    sig = random_decreasing_grid(80.0, 0.002, 8, seed=order + 7)
    x_T = 80.0 * torch.randn(5, 4, generator=torch.Generator().manual_seed(order), dtype=torch.float64)
    sch = UniPCMultistepScheduler(solver_order=order, solver_type=variant, final_sigmas_type="sigma_min",
                                  lower_order_final=lower_order_final, prediction_type="sample")
    ref = run_diffusers_multistep(sch, sig, x_T, gm)
    ours = ld3_ext.UniPC(order, variant=variant, lower_order_final=lower_order_final,
                         backend="reference").sample(gm.model(edm_sched), x_T, sig)
    assert ref.dtype == torch.float64
    assert rel_err(ours, ref) < RTOL_F64


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_without_corrector(gm, edm_sched, order):
    """disable_corrector for every step = our use_corrector=False (plain UniP)."""
    n = 7
    sig = random_decreasing_grid(80.0, 0.002, n, seed=4)
    x_T = 80.0 * torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sch = UniPCMultistepScheduler(solver_order=order, solver_type="bh2", final_sigmas_type="sigma_min",
                                  lower_order_final=False, prediction_type="sample", disable_corrector=list(range(n)))
    ref = run_diffusers_multistep(sch, sig, x_T, gm)
    ours = ld3_ext.UniPC(order, variant="bh2", lower_order_final=False, use_corrector=False,
                         backend="reference").sample(gm.model(edm_sched), x_T, sig)
    assert rel_err(ours, ref) < RTOL_F64


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_on_vp_discrete_schedule(gm, order, variant):
    """Same comparison on the scheduler's own VP-discrete schedule: our VPDiscrete(alphas_cumprod) at float
    times t_i, diffusers fed sigmas_i = edm_sigma(t_i); the states are both VP, no conversion needed."""
    sch = UniPCMultistepScheduler(solver_order=order, solver_type=variant, final_sigmas_type="sigma_min",
                                  lower_order_final=False, prediction_type="epsilon")
    vp = ld3_ext.VPDiscrete(alphas_cumprod=sch.alphas_cumprod.to(torch.float64))
    t = random_decreasing_grid(vp.t_max, vp.t_min, 7, seed=2, log=False)
    sig = vp.edm_sigma(t)
    x_T = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_vp = run_diffusers_multistep(sch, sig, x_T / vp.alpha(t[0]), gm, prediction="epsilon") * vp.alpha(t[-1])
    ours = ld3_ext.UniPC(order, variant=variant, lower_order_final=False,
                         backend="reference").sample(gm.model(vp), x_T, t)
    assert rel_err(ours, ref_vp) < 1e-11


# ------------------------------------------------------------------------------------------------
# Euler
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 10])
def test_euler_discrete(gm, edm_sched, n):
    sig = random_decreasing_grid(80.0, 0.002, n, seed=n)
    x_T = 80.0 * torch.randn(5, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    sch = EulerDiscreteScheduler(prediction_type="epsilon")
    sch.set_timesteps(n)
    sch.sigmas = sig.clone()
    x = x_T.clone()  # EulerDiscrete keeps the VE state
    for i, ts in enumerate(sch.timesteps):
        x_in = sch.scale_model_input(x, ts)  # = x_vp
        a, s = _vp_alpha_sigma(sig[i])
        eps = (x_in - a * gm.denoise(x_in, a, s)) / s
        x = sch.step(eps, ts, x).prev_sample
    ours = ld3_ext.Euler(backend="reference").sample(gm.model(edm_sched), x_T, sig)
    # In the VE view the Euler update x + (s_next - s)(x - x0)/s cancels O(s_max) terms in float32, so the
    # rounding scales with |x_T| (~80), not with the O(1) result: allow 8 float32 ulps of |x_T| on top.
    err = float((ours - x).norm())
    assert err < RTOL_F32_STATE * float(x.norm()) + 8 * torch.finfo(torch.float32).eps * float(x_T.norm())
    assert err < 1e-4 * float(x.norm())
