"""LD3Scheduler / diffusers adapter input handling: Heun's step count and interval starts, configs we cannot map
(invert_sigmas), and constructor arguments (grid dtype/values, guidance_scale, variance_type, num_train_timesteps).
Bad input must raise an exception naming the argument, never run with a silently wrong meaning."""
from __future__ import annotations

import types

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
