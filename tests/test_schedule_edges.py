"""Edges of the noise schedules and schedule documents found by review, each reproduced before its fix."""
import pytest
import torch

import ld3_ext


# ---------------------------------------------------------------------------------------------
# schedules: inverse_lambda takes Python numbers like the other methods; VPLinear's ends are not 0/0
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [ld3_ext.EDM(), ld3_ext.VPLinear(), ld3_ext.VPCosine(), ld3_ext.FlowMatching(),
                                      ld3_ext.VPDiscrete.linear()], ids=lambda s: type(s).__name__)
def test_inverse_lambda_takes_a_python_number(schedule):
    t = 0.5 * (schedule.t_min + schedule.t_max)
    lam = float(schedule.lambda_(torch.tensor(t, dtype=torch.float64)))
    got = schedule.inverse_lambda(lam)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    assert abs(float(got) - t) < 1e-9 * max(1.0, t)


def test_vp_linear_with_zero_beta_min_maps_sigma_zero_to_t_zero():
    s = ld3_ext.VPLinear(beta_min=0.0)
    assert float(s.t_from_edm_sigma(torch.tensor(0.0, dtype=torch.float64))) == 0.0
    t = torch.tensor([1e-3, 0.3, 1.0], dtype=torch.float64)  # and the rest of the range still inverts
    torch.testing.assert_close(s.inverse_lambda(s.lambda_(t)), t, rtol=1e-10, atol=0)


@pytest.mark.parametrize("betas", [(0.0, 1e-160), (0.0, 1e-300), (1e-200, 2e-200)])
def test_vp_linear_with_tiny_betas_inverts_lambda(betas):
    """The constructor accepts betas of any positive size; below ~1e-154 the root's squares underflowed and
    inverse_lambda came back 1e140 times too large (or 2x off), so the logsnr grid left the schedule's range."""
    s = ld3_ext.VPLinear(beta_min=betas[0], beta_max=betas[1])
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.inverse_lambda(s.lambda_(t)), t, rtol=1e-12, atol=0)
    grid = ld3_ext.discretizations.logsnr_uniform(s, 4)
    assert bool((grid[1:] < grid[:-1]).all()) and float(grid.max()) <= s.t_max


def test_vp_linear_at_infinite_noise_is_infinite_time():
    for s in (ld3_ext.VPLinear(), ld3_ext.VPLinear(beta_min=0.0)):
        assert float(s.t_from_edm_sigma(torch.tensor(float("inf"), dtype=torch.float64))) == float("inf")


# ---------------------------------------------------------------------------------------------
# LearnedSchedule.from_dict: model_timesteps optional (as in the constructor), format and version checked
# ---------------------------------------------------------------------------------------------
def _learned():
    from ld3_ext.schedule_file import LearnedSchedule
    s = ld3_ext.VPLinear()
    ts = ld3_ext.discretizations.logsnr_uniform(s, 5)
    return LearnedSchedule(ts, solver_config=ld3_ext.DPMSolverPP(3).config(), nfe=5, schedule_config=s.config())


def test_from_dict_refuses_a_newer_version_or_another_format():
    from ld3_ext.schedule_file import LearnedSchedule, ScheduleFileError
    d = _learned().to_dict()
    with pytest.raises(ScheduleFileError, match="newer"):
        LearnedSchedule.from_dict({**d, "version": d["version"] + 1})
    with pytest.raises(ScheduleFileError, match="format"):
        LearnedSchedule.from_dict({**d, "format": "something-else"})


def test_from_dict_without_model_timesteps_uses_the_timesteps():
    from ld3_ext.schedule_file import LearnedSchedule
    d = _learned().to_dict()
    got = LearnedSchedule.from_dict({k: d[k] for k in ("timesteps", "solver", "nfe", "schedule")})
    assert torch.equal(got.model_timesteps, got.timesteps)


def test_from_dict_names_a_missing_field():
    from ld3_ext.schedule_file import LearnedSchedule, ScheduleFileError
    d = _learned().to_dict()
    with pytest.raises(ScheduleFileError, match="'nfe'"):
        LearnedSchedule.from_dict({k: v for k, v in d.items() if k != "nfe"})


def test_discrete_schedule_copies_its_knots_once_per_device_and_dtype():
    """The knots are read about twice a sampler step; on a GPU each host-to-device copy waited for the stream.
    One copy per (device, dtype), made as a plain tensor even under inference_mode (a later autograd call uses
    it), and left out of pickles (a GPU copy would not load on a CPU-only machine)."""
    import pickle
    s = ld3_ext.VPDiscrete.linear(0.00085, 0.012)
    t32 = torch.tensor([0.3, 0.5], dtype=torch.float32)
    with torch.inference_mode():
        first = s._knots(t32)
    again = s._knots(t32.clone())
    assert all(a is b for a, b in zip(first, again)) and not any(k.is_inference() for k in again)
    assert [k.dtype for k in again] == [torch.float32] * 2 and len(s._knots_on) == 1
    t = t32.clone().requires_grad_()
    (g,) = torch.autograd.grad(s.alpha(t).sum(), t)  # after the inference_mode call
    fresh = ld3_ext.VPDiscrete.linear(0.00085, 0.012)  # no cached copies: the same float32 computation
    tf = t32.clone().requires_grad_()
    assert torch.equal(g, torch.autograd.grad(fresh.alpha(tf).sum(), tf)[0])
    t64 = t32.double().requires_grad_()
    s.alpha(t64)
    assert len(s._knots_on) == 2
    restored = pickle.loads(pickle.dumps(s))
    assert restored._knots_on == {} and len(s._knots_on) == 2
    torch.testing.assert_close(restored.alpha(t64.detach()), s.alpha(t64.detach()), rtol=0, atol=0)


def test_discrete_schedule_pickled_before_the_device_copies_loads():
    import pickle
    s = ld3_ext.VPDiscrete.linear(0.00085, 0.012)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    state = dict(s.__dict__)
    del state["_knots_on"]  # what an earlier version pickled
    old = ld3_ext.VPDiscrete.__new__(ld3_ext.VPDiscrete)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    assert torch.equal(old.alpha(t), s.alpha(t))
