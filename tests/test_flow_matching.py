"""Rectified-flow models (prediction="velocity", FlowMatching: alpha = 1 - t, sigma = t) with our solvers.

Oracles: the exact ODE solution of a Gaussian mixture (testbeds; its exact denoiser turned into a
velocity v = (x - D)/t), diffusers' FlowMatchEulerDiscreteScheduler, and diffusers' DPMSolverMultistep /
UniPCMultistep schedulers in their flow-sigma modes.

Sigma mapping for diffusers (worked out from its code): with ``use_flow_sigmas=True`` diffusers' "sigma"
IS our flow time t (alpha_t = 1 - sigma, sigma_t = sigma; its x is our x, no VP/VE rescaling) and
``flow_prediction`` is our velocity (x0 = x - sigma v).  FlowMatchEuler's step x + (sigma_next - sigma) v
is the same update.  So we drive all three by overwriting ``scheduler.sigmas`` (float32) with our grid
t_0..t_N after ``set_timesteps(N)``; the timesteps they hold are then only used to find the step index.
"""
from __future__ import annotations

import pytest
import torch

import ld3_ext
from ld3_ext.discretizations import logsnr_uniform, time_uniform
from conftest import random_decreasing_grid, smooth_mixture


# tiny tensors on a shared 2-core box: extra threads only add contention
pytestmark = pytest.mark.usefixtures("single_thread")


def velocity_model(mix, schedule):
    """The exact velocity of ``mix`` under the flow schedule, wrapped as a flow model (network time = t)."""
    def exact_velocity(x, t):
        t0 = t.reshape(-1)[0]
        d = mix.denoise(x, (1.0 - t0).to(x.dtype), t0.to(x.dtype))
        return (x - d) / t0.to(x.dtype)
    return ld3_ext.wrap_model(exact_velocity, schedule, prediction="velocity", time_input="t")


@pytest.fixture(scope="module")
def setup():
    mix = smooth_mixture(dim=2, n_modes=3)
    sched = ld3_ext.FlowMatching()
    model = velocity_model(mix, sched)
    x_T = mix.prior_noise(sched, 16, generator=torch.Generator().manual_seed(0))
    ref = mix.reference_solution(sched, x_T)
    return mix, sched, model, x_T, ref


def test_velocity_conversion_matches_exact_denoiser(setup):
    mix, sched, model, x_T, _ = setup
    t = torch.tensor(0.37, dtype=torch.float64)
    x = 0.63 * mix.sample(8, torch.Generator().manual_seed(1)) + 0.37 * torch.randn(8, 2, dtype=torch.float64)
    x0, eps = model.predict(x, t)
    torch.testing.assert_close(x0, mix.denoise(x, 1 - t, t))
    torch.testing.assert_close((1 - t) * x0 + t * eps, x)  # x = alpha x0 + sigma eps


@pytest.mark.parametrize("solver,min_rate", [(ld3_ext.Euler(), 0.8), (ld3_ext.DPMSolverPP(2), 1.6),
                                             (ld3_ext.DPMSolverPP(3), 1.6), (ld3_ext.UniPC(3), 1.6),
                                             (ld3_ext.UniPC(2, variant="bh2"), 1.6)],
                         ids=["euler", "dpmpp2", "dpmpp3", "unipc3", "unipc2-bh2"])
def test_solvers_converge_to_exact_flow_ode(setup, solver, min_rate):
    """Errors fall with NFE at (about) the solver's order, down to small values: the flow model, the
    velocity->(x0, eps) conversion and the solver coefficients on alpha = 1 - t agree.  (Measured rates on
    time-uniform grids, NFE 20 -> 80: Euler 1.0, DPM++2M 2.0, DPM++3M 2.0, UniPC-3 2.7, UniPC-2 bh2 2.1; the
    first-order final step of lower_order_final caps the higher orders near 2.)"""
    _, sched, model, x_T, ref = setup
    solver.backend = "reference"
    errs = []
    for n in (20, 40, 80):
        out = solver.sample(model, x_T, time_uniform(sched, n))
        errs.append((out - ref).abs().max().item())
    rate = 0.5 * torch.log2(torch.tensor(errs[0] / errs[2])).item()
    assert errs[0] > errs[1] > errs[2]
    assert rate >= min_rate, (errs, rate)
    assert errs[2] < (5e-2 if solver.order == 1 else 2e-3), errs


def test_shift_applies_to_discretization():
    """The SD3/Flux shift (t' = s t / (1 + (s - 1) t), owned by ld3_ext.discretizations) moves the interior
    of a flow grid towards high noise for s > 1 and keeps a valid grid."""
    plain = time_uniform(ld3_ext.FlowMatching(), 6)
    for shift in (3.0, 0.5):
        s = ld3_ext.FlowMatching(shift=shift)
        t = time_uniform(s, 6)
        assert t[0] == s.t_max and t[-1] == s.t_min and torch.all(t[1:] < t[:-1])
        f = shift * plain / (1 + (shift - 1) * plain)
        assert torch.all((t[1:-1] > plain[1:-1]) if shift > 1 else (t[1:-1] < plain[1:-1]))
        # the shift formula up to the affine remap onto [t_min, t_max] (exact to 1e-14 in
        # test_discretizations.py::test_flow_shift): within t_min = 1e-3 of it (measured gap 2e-3 of the unmapped)
        torch.testing.assert_close(t[1:-1], f[1:-1], rtol=0, atol=3 * s.t_min)


def _drive_diffusers(scheduler, model, x_T, t):
    """Run a diffusers flow scheduler on our grid t (overwritten sigmas), model output = our velocity."""
    n = t.numel() - 1
    scheduler.set_timesteps(n)
    scheduler.sigmas = t.to(torch.float32).clone()
    x = x_T.clone()
    for i, ts in enumerate(scheduler.timesteps):
        v = model.fn(x, t[i].to(x.dtype).expand(x.shape[0]))
        x = scheduler.step(v, ts, x).prev_sample
    return x


def test_flow_match_euler_scheduler(setup):
    diffusers = pytest.importorskip("diffusers")
    mix, sched, model, x_T, _ = setup
    x32 = x_T.float()
    m32 = velocity_model(mix, sched)
    t = random_decreasing_grid(sched.t_max, sched.t_min, 7, seed=3)
    ours = ld3_ext.Euler(backend="reference").sample(m32, x32, t)
    theirs = _drive_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(), m32, x32, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_diffusers_dpmsolver_flow_sigmas(setup, order):
    diffusers = pytest.importorskip("diffusers")
    mix, sched, model, x_T, _ = setup
    m32 = velocity_model(mix, sched)
    x32 = x_T.float()
    t = random_decreasing_grid(sched.t_max, sched.t_min, 8, seed=4)
    dpm = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                solver_order=order, lower_order_final=True,
                                                final_sigmas_type="zero")
    theirs = _drive_diffusers(dpm, m32, x32, t)
    ours = ld3_ext.DPMSolverPP(order, lower_order_final=True, backend="reference").sample(m32, x32, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order,variant", [(2, "bh2"), (3, "bh1"), (3, "bh2")])
def test_diffusers_unipc_flow_sigmas(setup, order, variant):
    diffusers = pytest.importorskip("diffusers")
    mix, sched, model, x_T, _ = setup
    m32 = velocity_model(mix, sched)
    x32 = x_T.float()
    t = random_decreasing_grid(sched.t_max, sched.t_min, 8, seed=5)
    uni = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            solver_order=order, solver_type=variant, lower_order_final=True)
    theirs = _drive_diffusers(uni, m32, x32, t)
    ours = ld3_ext.UniPC(order, variant=variant, backend="reference").sample(m32, x32, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_flow_model_rejects_vp_schedule():
    with pytest.raises(ValueError, match="FlowMatching"):
        ld3_ext.wrap_model(lambda x, t: x, ld3_ext.VPLinear(), prediction="velocity")
    with pytest.raises(ValueError, match="FlowMatching"):
        ld3_ext.wrap_model(lambda x, t: x, ld3_ext.EDM(), prediction="velocity")


def test_ld3_trainer_on_flow_mixture(setup):
    """A short LD3 fit on the flow-matching mixture (exact teacher) does not lose to its initial grid."""
    from ld3_ext import training
    mix, sched, _, _, _ = setup
    model = velocity_model(mix, sched)
    model.testbed = mix
    trainer = training.LD3Trainer(model, solver=ld3_ext.DPMSolverPP(2), nfe=4, teacher="exact", reference=mix,
                                  sample_shape=(2,), n_train=8, n_valid=8, batch_size=4, valid_batch_size=8,
                                  rounds_v1=1, rounds_v2=1, progress=False, dtype=torch.float64,
                                  model_name="flow-gmm-test")
    learned = trainer.fit()
    t, tm = learned.timesteps, learned.model_timesteps
    assert t[0] == pytest.approx(sched.t_max) and t[-1] == pytest.approx(sched.t_min)
    assert torch.all(t[1:] < t[:-1])
    z = mix.prior_noise(sched, 32, generator=torch.Generator().manual_seed(9))
    ref = mix.reference_solution(sched, z)
    solver = ld3_ext.DPMSolverPP(2)
    err0 = (solver.sample(model, z, logsnr_uniform(sched, 4)) - ref).pow(2).mean()
    err1 = (solver.sample(model, z, t, tm) - ref).pow(2).mean()
    assert err1 <= err0 * 1.05, (err0, err1)


def test_to_diffusers_flow_sigmas_drive_flow_match_euler(setup):
    """A learned schedule of a flow model, exported with to_diffusers(): its flow_sigmas (diffusers' flow units,
    sigma = t) set into FlowMatchEulerDiscreteScheduler as README and the docstring say -- the sigmas and the
    timesteps -- and driven by a pipeline's loop (the network sees scheduler.timesteps) give the schedule's own
    sample.  The sigmas alone leave the network at diffusers' own times, and the sigmas key (sigma/alpha, the
    k-diffusion units) read as flow sigmas is wrong too: the traps the recipe avoids."""
    diffusers = pytest.importorskip("diffusers")
    from ld3_ext.schedule_file import LearnedSchedule
    mix, sched, _, x_T, _ = setup
    m32 = velocity_model(mix, sched)
    x32 = x_T.float()
    solver = ld3_ext.Euler(backend="reference")
    t = random_decreasing_grid(sched.t_max, sched.t_min, 6, seed=7)
    learned = LearnedSchedule(t, solver_config=solver.config(), nfe=6, schedule_config=sched.config())
    d = learned.to_diffusers()
    assert d["flow_sigmas"] == t.tolist() and d["flow_model_sigmas"] == t.tolist()
    ours = learned.sample(m32, x32)

    def drive(sigmas, set_timesteps=True):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
        n_train = scheduler.config.num_train_timesteps
        scheduler.set_timesteps(len(sigmas) - 1)
        scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        if set_timesteps:
            scheduler.timesteps = torch.tensor(sigmas[:-1], dtype=torch.float32) * n_train
        x = x32
        for ts in scheduler.timesteps:  # a pipeline's loop: the network gets ts (the flow time times n_train)
            v = m32.fn(x, (ts / n_train).to(x.dtype).expand(x.shape[0]))
            x = scheduler.step(v, ts, x).prev_sample
        return x

    torch.testing.assert_close(drive(d["flow_sigmas"]), ours, rtol=1e-5, atol=1e-5)
    assert (drive(d["flow_sigmas"], set_timesteps=False) - ours).abs().max() > 1e-2  # diffusers' network times
    wrong = drive([min(s, 0.999) for s in d["sigmas"]])  # sigma/alpha read as flow sigmas (clipped below 1)
    assert (wrong - ours).abs().max() > 1e-2


def test_learned_schedule_samples_a_flow_model_with_another_shift():
    """A flow shift changes only the hand-made grids, not alpha or sigma: LearnedSchedule.sample refused a model
    whose schedule differs by its shift alone (Flux varies it with resolution); another range is still refused."""
    from ld3_ext.schedule_file import LearnedSchedule
    learned_on = ld3_ext.FlowMatching(shift=3.0)
    t = ld3_ext.discretizations.time_uniform(learned_on, 4)
    ls = LearnedSchedule(t, solver_config=ld3_ext.DPMSolverPP(2).config(), nfe=4, schedule_config=learned_on.config())
    fn = lambda x, tt: -x  # noqa: E731
    x = torch.randn(2, 3, dtype=torch.float64)
    other = ld3_ext.wrap_model(fn, ld3_ext.FlowMatching(shift=1.0), prediction="velocity")
    want = ld3_ext.DPMSolverPP(2).sample(other, x, t)
    torch.testing.assert_close(ls.sample(other, x), want, rtol=0, atol=0)
    narrower = ld3_ext.wrap_model(fn, ld3_ext.FlowMatching(t_max=0.9, shift=3.0), prediction="velocity")
    with pytest.raises(ValueError, match="other noise levels"):
        ls.sample(narrower, x)
