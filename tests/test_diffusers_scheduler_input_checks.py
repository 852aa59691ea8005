"""LD3Scheduler / diffusers adapter input handling: Heun's step count and interval starts, configs we cannot map
(invert_sigmas), and constructor arguments (grid dtype/values, guidance_scale, variance_type, num_train_timesteps).
Bad input must raise an exception naming the argument, never run with a silently wrong meaning."""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import ld3_ext  # noqa: E402
from ld3_ext.integrations.diffusers import (DiffusersConfigError, from_diffusers,  # noqa: E402
                                            schedule_from_diffusers_config)
from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

from _tiny_unets import tiny_unet  # noqa: E402

VPD = ld3_ext.VPDiscrete.linear()


def heun_scheduler(n=5):
    t = ld3_ext.discretizations.logsnr_uniform(VPD, n)
    return LD3Scheduler.from_timesteps(t, solver={"name": "heun", "backend": "reference"}, schedule=VPD), t


def img2img_timesteps(sch, num_inference_steps, strength):
    """What StableDiffusionImg2ImgPipeline does after set_timesteps: its own get_timesteps (slice + begin index)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    return StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sch), num_inference_steps,
                                                        strength, "cpu")


# ---- 1. Heun: num_inference_steps counts steps (intervals), as HeunDiscreteScheduler's does ---------------------
@pytest.mark.parametrize("nfe", [10, 11])
def test_heun_stored_grid_refuses_its_evaluation_count_as_num_inference_steps(nfe):
    sch, _ = heun_scheduler(5)
    with pytest.raises(ValueError, match=r"num_inference_steps=5\b.*Heun"):
        sch.set_timesteps(nfe)


def test_heun_img2img_strength_counts_intervals():
    """strength 0.6 of 5 Heun steps keeps the last 3 intervals: begin index 2*2, 6 network evaluations."""
    sch, t = heun_scheduler(5)
    sch.set_timesteps(5)
    full = sch.timesteps.clone()
    assert full.numel() == 10 and sch.num_inference_steps == 5
    ts, n_left = img2img_timesteps(sch, 5, 0.6)
    assert n_left == 3 and sch.begin_index == 4 and len(ts) == 6
    torch.testing.assert_close(sch.timesteps, full[4:], rtol=0, atol=0)
    # add_noise at the first kept timestep noises to the grid time t[2]
    x0, noise = torch.ones(1, 2), torch.full((1, 2), 0.5)
    torch.testing.assert_close(sch.add_noise(x0, noise, ts[:1]),
                               VPD.alpha(t[2]).float() * x0 + VPD.sigma(t[2]).float() * noise)


def test_heun_baseline_grid_takes_steps():
    sch = LD3Scheduler(solver_config={"name": "heun"}, discretization="time_uniform")
    sch.set_timesteps(4)
    assert sch.num_inference_steps == 4 and sch.timesteps.numel() == 8


def test_multistep_stored_grid_still_takes_its_step_count():
    t = ld3_ext.discretizations.logsnr_uniform(VPD, 5)
    sch = LD3Scheduler.from_timesteps(t, solver="dpmpp", schedule=VPD)
    sch.set_timesteps(5)
    assert sch.timesteps.numel() == 5
    with pytest.raises(ValueError, match="num_inference_steps=5"):
        sch.set_timesteps(6)


# ---- 2. Heun: a solve cannot start at an interval's corrector evaluation ---------------------------------------
def _run(sch, ts, x):
    for tt in ts:
        x = sch.step(torch.zeros_like(x), tt, x).prev_sample
    return x


@pytest.mark.parametrize("start", [1, 3, 9])
@pytest.mark.parametrize("how", ["view", "float", "tensor_copy"])
def test_heun_odd_start_is_refused_whether_view_or_value(how, start):
    """timesteps[odd:] starts inside an interval.  A view says so by its offset; a value equal to the next
    interval's start is read as that start (diffusers' rule) until the second step shows the repeat."""
    sch, _ = heun_scheduler(5)
    sch.set_timesteps()
    ts = sch.timesteps[start:]
    if how == "float":
        ts = [float(v) for v in ts]
    elif how == "tensor_copy":
        ts = [v.clone() for v in ts]
    with pytest.raises(ValueError, match=r"timesteps\[%d\].*Heun interval" % start):
        _run(sch, ts, torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("how", ["view", "float"])
def test_heun_even_start_by_view_or_value_gives_the_same_solve(how):
    sch, _ = heun_scheduler(5)
    sch.set_timesteps()
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ref_sch, _ = heun_scheduler(5)
    ref_sch.set_timesteps()
    ref_sch.set_begin_index(4)
    ref = _run(ref_sch, ref_sch.timesteps, x)
    ts = sch.timesteps[4:]
    out = _run(sch, ts if how == "view" else [float(v) for v in ts], x)
    assert sch.begin_index == 4
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.equal(out, x)


# ---- 3. invert_sigmas (Mochi) -------------------------------------------------------------------------------
def test_invert_sigmas_config_is_refused():
    cfg = dict(diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config)
    with pytest.raises(DiffusersConfigError, match="invert_sigmas"):
        schedule_from_diffusers_config(cfg)
    with pytest.raises(DiffusersConfigError, match="invert_sigmas"):
        from_diffusers(tiny_unet(), cfg)
    with pytest.raises(DiffusersConfigError, match="invert_sigmas"):
        LD3Scheduler.from_config(cfg)
    with pytest.raises(DiffusersConfigError, match="invert_sigmas"):
        LD3Scheduler.from_timesteps([1.0, 0.5, 0.01], solver="euler", scheduler_config=cfg)
    # the default (False) is an ordinary flow config
    sched, pred = schedule_from_diffusers_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert isinstance(sched, ld3_ext.FlowMatching) and sched.shift == 3.0 and pred == "velocity"


# ---- 4. constructor arguments --------------------------------------------------------------------------------
def test_complex_grid_is_refused():
    t = ld3_ext.discretizations.logsnr_uniform(VPD, 4)
    for grid in (t.to(torch.complex128), t.to(torch.complex128) + 0.1j, [complex(v) for v in t.tolist()]):
        with pytest.raises(TypeError, match="ld3_timesteps"):
            LD3Scheduler(ld3_timesteps=grid)
    with pytest.raises(TypeError, match="ld3_timesteps"):
        LD3Scheduler.from_timesteps(t.to(torch.complex128) + 0.1j, solver="euler", schedule=VPD)
    with pytest.raises(TypeError, match="ld3_model_timesteps"):
        LD3Scheduler(ld3_timesteps=t.tolist(), ld3_model_timesteps=t.to(torch.complex64))
    with pytest.raises(TypeError, match="ld3_model_timesteps"):
        LD3Scheduler.from_timesteps(t, t.to(torch.complex128), solver="euler", schedule=VPD)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_grid_is_refused(bad):
    t = ld3_ext.discretizations.logsnr_uniform(VPD, 4).tolist()
    with pytest.raises(ValueError, match="ld3_timesteps.*NaN or Inf"):
        LD3Scheduler(ld3_timesteps=t[:2] + [bad] + t[3:])
    with pytest.raises(ValueError, match="ld3_model_timesteps.*NaN or Inf"):
        LD3Scheduler(ld3_timesteps=t, ld3_model_timesteps=t[:2] + [bad] + t[3:])


@pytest.mark.parametrize("grid, exc", [("abc", TypeError), ([True, False], TypeError),
                                       (torch.tensor([1, 0]), TypeError), ([[1.0, 0.5], [0.4, 0.1]], ValueError),
                                       ([1.0, "0.5", 0.01], TypeError), (0.5, TypeError)],
                         ids=["str", "bools", "int-tensor", "2d", "str-entry", "scalar"])
def test_non_numeric_grid_is_refused(grid, exc):
    with pytest.raises(exc, match="ld3_timesteps"):
        LD3Scheduler(ld3_timesteps=grid)


@pytest.mark.parametrize("bad, exc", [("7.5", TypeError), ("abc", TypeError), (True, TypeError),
                                      (torch.tensor(7.5), TypeError), (float("nan"), ValueError),
                                      (float("inf"), ValueError)],
                         ids=["str-number", "str", "bool", "tensor", "nan", "inf"])
def test_bad_guidance_scale_is_refused(bad, exc):
    with pytest.raises(exc, match="guidance_scale"):
        LD3Scheduler(guidance_scale=bad)
    with pytest.raises(exc, match="guidance_scale"):
        LD3Scheduler().check_guidance(bad)


def test_numeric_guidance_scale_is_kept():
    assert LD3Scheduler(guidance_scale=7).guidance_scale == 7.0
    assert LD3Scheduler(guidance_scale=np.float32(2.5)).guidance_scale == 2.5
    assert LD3Scheduler(guidance_scale=None).guidance_scale is None


@pytest.mark.parametrize("bad", ["learnd_range", "Learned", "", "fixed"])
def test_misspelled_variance_type_is_refused(bad):
    with pytest.raises(ValueError, match="variance_type"):
        LD3Scheduler(variance_type=bad)
    cfg = dict(diffusers.DDPMScheduler().config, variance_type=bad)
    with pytest.raises(ValueError, match="variance_type"):
        from_diffusers(tiny_unet(), cfg)


@pytest.mark.parametrize("vt, learned", [(None, False), ("fixed_small", False), ("fixed_small_log", False),
                                         ("fixed_large", False), ("fixed_large_log", False), ("learned", True),
                                         ("learned_range", True)])
def test_diffusers_variance_types_are_accepted(vt, learned):
    assert LD3Scheduler(variance_type=vt)._learned_variance is learned


def test_num_train_timesteps_must_match_the_schedule():
    with pytest.raises(ValueError, match="num_train_timesteps=500.*1000"):
        LD3Scheduler(num_train_timesteps=500, schedule_config=VPD.config())
    with pytest.raises(ValueError, match="num_train_timesteps=1000.*trained_betas.*500"):
        LD3Scheduler(num_train_timesteps=1000, trained_betas=torch.linspace(1e-4, 0.02, 500).tolist())
    with pytest.raises(ValueError, match="num_train_timesteps=1000.*trained_betas.*500"):
        schedule_from_diffusers_config({"num_train_timesteps": 1000,
                                        "trained_betas": torch.linspace(1e-4, 0.02, 500).tolist()})
    t = ld3_ext.discretizations.logsnr_uniform(VPD, 4)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        LD3Scheduler.from_timesteps(t, solver="euler", schedule=VPD,
                                    scheduler_config=diffusers.DDPMScheduler(num_train_timesteps=500).config)
    # consistent: accepted, and the network units follow the schedule's N
    sch = LD3Scheduler(num_train_timesteps=1000, schedule_config=VPD.config(), ld3_timesteps=t.tolist())
    sch.set_timesteps()
    assert sch.timesteps[0].item() == pytest.approx(999.0) and len(sch) == 1000


@pytest.mark.parametrize("bad", [0, -5, "1000", 1000.0, True])
def test_flow_num_train_timesteps_is_checked(bad):
    fm = ld3_ext.FlowMatching()
    with pytest.raises((TypeError, ValueError), match="num_train_timesteps"):
        LD3Scheduler(num_train_timesteps=bad, schedule_config=fm.config(), prediction_type="flow_prediction")
    with pytest.raises((TypeError, ValueError), match="num_train_timesteps"):
        LD3Scheduler(num_train_timesteps=bad, prediction_type="flow_prediction", use_flow_sigmas=True)


def test_flow_num_train_timesteps_sets_the_network_units():
    fm = ld3_ext.FlowMatching()
    sch = LD3Scheduler(num_train_timesteps=500, schedule_config=fm.config(), prediction_type="flow_prediction",
                       solver_config={"name": "euler"}, discretization="time_uniform")
    sch.set_timesteps(4)
    assert math.isclose(sch.timesteps[0].item(), 500 * fm.t_max, rel_tol=1e-6)


def test_a_config_whose_schedule_ld3scheduler_cannot_hold_is_refused():
    """CogVideoX's snr_shift_scale (a class default too) is not an LD3Scheduler field: from_timesteps built the
    unshifted schedule and read the network with it."""
    import diffusers
    from ld3_ext.integrations.diffusers import DiffusersConfigError, schedule_from_diffusers_config
    cfg = diffusers.CogVideoXDDIMScheduler().config
    schedule, _ = schedule_from_diffusers_config(cfg)
    t = ld3_ext.discretizations.get_discretization("time_uniform", schedule, 4)
    with pytest.raises(DiffusersConfigError, match="snr_shift_scale"):
        LD3Scheduler.from_timesteps(t, solver_config={"name": "dpmpp", "order": 2}, scheduler_config=cfg)
    # carried by an explicit schedule_config, the shifted schedule is the one used
    sch = LD3Scheduler.from_timesteps(t, solver_config={"name": "dpmpp", "order": 2}, scheduler_config=cfg,
                                      schedule_config=schedule.config())
    assert sch.schedule.same_as(schedule)
    # a plain DDIM config still goes through
    LD3Scheduler.from_timesteps(t, solver_config={"name": "dpmpp", "order": 2},
                                scheduler_config=diffusers.DDIMScheduler().config)
