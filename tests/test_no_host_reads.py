"""A sample call and its backward read no tensor value back to the host once the value checks are off (as
during CUDA-graph capture) and the output checks are deferred (as on a GPU): on a GPU every such read is a
stream sync, and a capture refuses it.  Shown on the CPU with a dispatch-mode recorder, for every schedule,
prediction and solver, both backends, with and without gradients -- the GPU tests (tests/test_cuda_ops.py)
capture only some of these, and only where a GPU is lent."""
import pytest
import torch

import ld3_ext
from conftest import BASE_SCHEDULES, OpRecorder
from ld3_ext import functional, wrappers
from ld3_ext.solvers import base

# _linalg_check_errors: linalg.solve's status check, a read back inside the op (below what a recorder sees)
HOST_READS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "lift_fresh", "lift_fresh_copy",
              "_linalg_check_errors"}
SOLVERS = {
    "dpmpp3": lambda backend: ld3_ext.DPMSolverPP(order=3, backend=backend),
    "unipc3": lambda backend: ld3_ext.UniPC(order=3, backend=backend),
    "ipndm3": lambda backend: ld3_ext.IPNDM(order=3, backend=backend),
    "euler": lambda backend: ld3_ext.Euler(backend=backend),
    "heun": lambda backend: ld3_ext.Heun(backend=backend),
    "dpmpp3-checkpointed": lambda backend: ld3_ext.DPMSolverPP(order=3, backend=backend, checkpoint_model=True),
}


@pytest.fixture
def capturing(monkeypatch):
    """What a capture switches off: the checks that read values (the grid's, x_T's, the deferred outputs')."""
    for module in (wrappers, base, functional):
        monkeypatch.setattr(module, "_capturing", lambda: True)


@pytest.mark.parametrize("grad", [False, True], ids=["sample", "sample+backward"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("schedule_name", sorted(BASE_SCHEDULES))
def test_a_sample_call_reads_no_value_back(schedule_name, solver, backend, grad, capturing):
    if backend == "fused" and not ld3_ext.native_available():
        pytest.skip("needs the native extension")
    sched = BASE_SCHEDULES[schedule_name]()
    prediction = "velocity" if schedule_name == "flow" else "eps"  # a conversion that reads the schedule
    model = ld3_ext.wrap_model(lambda x, t: 0.3 * torch.tanh(x), sched, prediction=prediction)
    grid = ld3_ext.discretizations.logsnr_uniform(sched, 6)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sv = SOLVERS[solver](backend)

    def run():
        t = grid.clone().requires_grad_(grad)
        with model.deferred_output_checks():
            y = sv.sample(model, x, t, model_timesteps=t * 1.0)
            if grad:
                y.square().sum().backward()
        return y
    run()  # warm-up (a capture is preceded by one too)
    rec = OpRecorder()
    with rec:
        run()
    assert len(rec.ops) > 10
    assert not HOST_READS & set(rec.ops), sorted(HOST_READS & set(rec.ops))


@pytest.mark.parametrize("solver", ["dpmpp3", "unipc3", "heun"])
def test_the_diffusers_scheduler_steps_read_no_value_back(solver):
    """A diffusers pipeline calls LD3Scheduler.step once a network evaluation, with its own timestep tensors:
    no step may read a value back (each would stall the pipeline on a GPU)."""
    pytest.importorskip("diffusers")
    from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler
    sched = LD3Scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         solver_config=SOLVERS[solver]("reference").config())
    sched.set_timesteps(6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    rec = OpRecorder()
    with rec:
        for t in sched.timesteps:
            eps = 0.3 * torch.tanh(sched.scale_model_input(x, t))
            x = sched.step(eps, t, x).prev_sample
    assert len(rec.ops) > 10 and bool(torch.isfinite(x).all())
    assert not HOST_READS & set(rec.ops), sorted(HOST_READS & set(rec.ops))


def test_the_k_diffusion_style_sample_defers_an_inner_models_checks():
    """ld3_ext.sample on a DiffusionModel: the solver defers the output checks of the model it is given (on a GPU:
    Solver.sample enters that model's deferred_output_checks block when x_T is on CUDA), here the VE-view wrapper
    _VEModel, whose block did nothing while the wrapped model checked and read back every step.  Driven here step
    by step as the solver drives it: inside the block no evaluation reads back; leaving it raises for the first
    bad step."""
    from ld3_ext.functional import _VEModel
    sched = ld3_ext.VPDiscrete.linear(0.00085, 0.012)
    calls = []

    def net(x, t):
        calls.append(1)
        return 0.3 * torch.tanh(x) * (float("nan") if len(calls) == 3 else 1.0)
    inner = ld3_ext.wrap_model(net, sched, prediction="eps")
    sigmas = sched.edm_sigma(ld3_ext.discretizations.logsnr_uniform(sched, 4))
    ve = _VEModel(inner, ld3_ext.EDM(float(sigmas.min()), float(sigmas.max())), check_output=True)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rec = OpRecorder()
    with pytest.raises(ld3_ext.ModelOutputError, match="at step 2"):
        with ve.deferred_output_checks():
            with rec:
                for i, s in enumerate(sigmas[:-1]):
                    ve.predict(x, s, step=i, returns="x0")
    assert len(calls) == 4 and not HOST_READS & set(rec.ops), sorted(HOST_READS & set(rec.ops))


def test_no_immediate_output_check_reads_back_while_capturing(capturing):
    """An output check outside a deferred block (a checkpointed backward run after sample() returned, a model
    called directly) read back even during a capture, which refuses it."""
    model = ld3_ext.wrap_model(lambda x, t: x * float("nan"), ld3_ext.EDM(), prediction="x0")
    x, t = torch.ones(2, 3), torch.tensor(1.0, dtype=torch.float64)
    rec = OpRecorder()
    with rec:
        model.predict(x, t, step=0)
    assert not HOST_READS & set(rec.ops), sorted(HOST_READS & set(rec.ops))


def test_model_timesteps_are_checked_from_one_copy_to_the_host(monkeypatch):
    """Four reads back (isfinite().all(), min, max, then a copy for the domain check) were one stream sync each on a
    GPU grid, on every sample call with model_timesteps (desk check of the CUDA-only paths).  Now one .cpu() copy:
    on the CPU it is no op at all, so the recorder sees no read (the domain check then works on host numbers, a
    list: its own CPU ops are left out here)."""
    sched = ld3_ext.VPLinear()
    t = ld3_ext.discretizations.logsnr_uniform(sched, 5)
    handed = []
    monkeypatch.setattr(base, "_check_defined", lambda schedule, values, name: handed.append(values))
    rec = OpRecorder()
    with rec:
        base.validate_model_timesteps(sched, t * 1.0, t)
    assert not HOST_READS & set(rec.ops), sorted(HOST_READS & set(rec.ops))
    assert handed == [t.tolist()]
    monkeypatch.undo()
    base.validate_model_timesteps(sched, t[2] * 1.0, t[2])  # a 0-d tensor is read as one time
    for bad, match in ((float("nan"), "NaN or Inf"), (5.0, "must lie in the schedule's range")):
        tm = t.clone()
        tm[2] = bad
        with pytest.raises(ValueError, match=match):
            base.validate_model_timesteps(sched, tm, t)
