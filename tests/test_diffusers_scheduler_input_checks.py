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
    # timesteps stays whole (diffusers' contract): the solve's evaluations are timesteps[begin_index:]
    torch.testing.assert_close(sch.timesteps, full, rtol=0, atol=0)
    torch.testing.assert_close(ts, full[4:], rtol=0, atol=0)
    assert sch.num_inference_steps == 5 and sch.step_index == 4
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
    ref = _run(ref_sch, ref_sch.timesteps[ref_sch.begin_index:], x)
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


# ---- step()'s and set_begin_index's arguments (a Python-API review) ------------------------------------------
def _ddpm_ld3(n=4):
    sch = LD3Scheduler.from_config(diffusers.DDPMScheduler(beta_schedule="scaled_linear").config)
    sch.set_timesteps(n)
    return sch


def _solve(sch, timesteps, x):
    sch.set_timesteps(len(sch._full[0]) - 1)
    for t in timesteps:
        x = sch.step(0.1 * torch.ones_like(x), t, x).prev_sample
    return x, sch.begin_index


def test_a_first_timestep_from_no_entry_is_refused_and_a_rounded_one_is_found():
    """step() took a first timestep that is none of scheduler.timesteps as the start of the solve: a loop that
    starts at interval 2 with int timesteps ran intervals 0 and 1 and returned a half-solved sample.  Now an
    exact entry, or a copy rounded to a half dtype or an int that is near one entry only, is found; anything
    else is refused."""
    sch = _ddpm_ld3()
    ts = sch.timesteps.clone()
    x = torch.randn(1, 3, 8, 8)
    want, begin = _solve(sch, ts[2:], x)
    assert begin == 2
    for rounded in ([int(v) for v in ts[2:]], ts[2:].half(), ts[2:].bfloat16(), [float(v) for v in ts[2:]]):
        got, begin = _solve(sch, rounded, x)
        assert begin == 2 and torch.equal(got, want)
    full, begin = _solve(sch, ts, x)
    assert begin is None and torch.equal(_solve(sch, ts.half(), x)[0], full)
    for bad in (500, 500.0, torch.tensor([500.0]), "abc", None, ts[2] + 5):
        sch.set_timesteps(4)
        with pytest.raises(ValueError, match=r"the first timestep .* is none of scheduler.timesteps \(999, 740.4.*\) "
                                             r"nor a rounded copy of one"):
            sch.step(torch.zeros_like(x), bad, x)
    sch.set_timesteps(4)
    sch.set_begin_index(1)  # a begin index given: the first timestep must be that entry (it was not looked up)
    with pytest.raises(ValueError, match=r"set_begin_index\(1\) starts the solve at timesteps\[1\]"):
        sch.step(torch.zeros_like(x), "any", x)
    assert sch.step(torch.zeros_like(x), int(sch.timesteps[1]), x).prev_sample.shape == x.shape  # a rounded copy


@pytest.mark.parametrize("bad", [1.9, "2", True, None, torch.tensor(1.0)])
def test_set_begin_index_takes_ints_only(bad):
    sch = _ddpm_ld3()
    with pytest.raises(TypeError, match="set_begin_index: begin_index must be an int"):
        sch.set_begin_index(bad)


def test_set_begin_index_takes_numpy_and_tensor_ints():
    sch = _ddpm_ld3()
    sch.set_begin_index(np.int64(2))
    assert sch.begin_index == 2
    sch.set_begin_index(torch.tensor(1))
    assert sch.begin_index == 1


def test_step_names_a_non_tensor_or_integer_input():
    sch = _ddpm_ld3()
    x, t = torch.randn(1, 3, 8, 8), sch.timesteps[0]
    for mo, sa, name, got in ((np.zeros((1, 3, 8, 8), np.float32), x, "model_output", "ndarray"),
                              (None, x, "model_output", "NoneType"),
                              (torch.ones(1, 3, 8, 8, dtype=torch.int64), x, "model_output", "a torch.int64 tensor"),
                              (torch.zeros_like(x), np.zeros((1, 3, 8, 8), np.float32), "sample", "ndarray"),
                              (torch.zeros_like(x), x.long(), "sample", "a torch.int64 tensor")):
        with pytest.raises(TypeError, match=f"LD3Scheduler.step: {name} must be a floating torch.Tensor, got {got}"):
            sch.step(mo, t, sa)
    assert sch.step(torch.zeros_like(x), t, x).prev_sample.dtype == x.dtype  # the refusals left the state alone


def test_set_timesteps_names_a_bad_device():
    sch = _ddpm_ld3()
    with pytest.raises(ValueError, match=r"set_timesteps: device='foo' is not a usable torch device"):
        sch.set_timesteps(4, device="foo")


def test_add_noise_and_the_constructor_name_what_is_not_numbers_or_a_dict():
    sch = _ddpm_ld3()
    x = torch.randn(2, 3, 8, 8)
    for bad in ("5", None, object()):
        with pytest.raises(TypeError, match="add_noise: timesteps must be a number or a tensor of timesteps"):
            sch.add_noise(x, torch.randn_like(x), bad)
        with pytest.raises(TypeError, match="scale_noise: timestep must be a number or a tensor of timesteps"):
            sch.scale_noise(x, bad, torch.randn_like(x))
    for bad in (5, "EDM", [("type", "EDM")]):
        with pytest.raises(TypeError, match="schedule_config must be a dict"):
            LD3Scheduler(schedule_config=bad)
    assert sch.add_noise(x, torch.randn_like(x), sch.timesteps[1]).shape == x.shape


@pytest.mark.parametrize("override,match", [
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),  # diffusers' zero-SNR recipe
    ({"timestep_type": "continuous"}, "timestep_type"),
    ({"snr_shift_scale": 3.0}, "snr_shift_scale"),
    ({"sigma_data": 0.5}, "sigma_data"),
])
def test_from_config_refuses_a_keyword_that_changes_the_model_as_it_refuses_the_config_field(override, match):
    """from_config(cfg, rescale_betas_zero_snr=True) built the plain betas' schedule without a word (ConfigMixin drops a
    keyword LD3Scheduler does not register), while the same field in the config is refused."""
    import diffusers
    from ld3_ext.integrations.diffusers import DiffusersConfigError
    cfg = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           prediction_type="v_prediction").config
    with pytest.raises(DiffusersConfigError, match=match):
        LD3Scheduler.from_config({**cfg, **override})
    with pytest.raises(DiffusersConfigError, match=match):
        LD3Scheduler.from_config(cfg, **override)
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    with pytest.raises(DiffusersConfigError, match="invert_sigmas"):
        LD3Scheduler.from_config(flow, invert_sigmas=True)
    # keywords that leave the model as it is still go through
    LD3Scheduler.from_config(cfg, rescale_betas_zero_snr=False, timestep_spacing="trailing", discretization="edm")
