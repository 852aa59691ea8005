"""LD3Scheduler inside unmodified diffusers pipelines equals ld3_ext's own solver.sample.

Pipelines: DDPMPipeline (UNet2DModel) and StableDiffusionPipeline (UNet2DConditionModel, classifier-free
guidance, prompt embeddings passed directly so no tokenizer/text encoder/VAE is needed).
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import ld3_ext  # noqa: E402
from ld3_ext.integrations.diffusers import DiffusersConfigError, from_diffusers  # noqa: E402
from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler  # noqa: E402


# tiny tensors on a shared 2-core box: extra threads only add contention
pytestmark = pytest.mark.usefixtures("single_thread")

from _tiny_unets import tiny_cond_unet, tiny_unet  # noqa: E402


SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def decoupled(t: torch.Tensor, factor: float = 1.04) -> torch.Tensor:
    """LD3-style network times: interior points moved, endpoints kept."""
    tm = t.clone()
    tm[1:-1] = tm[1:-1] * factor
    return tm


def ddpm_pipeline_vs_solver(unet, cfg, solver, t, tm, n_steps, batch=2, seed=1):
    sch = LD3Scheduler.from_timesteps(t, tm, solver, scheduler_config=cfg)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sch)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), num_inference_steps=n_steps,
               output_type="np").images
    # DDPMPipeline draws x_T with randn_tensor (no init_noise_sigma scaling) and maps x -> clamp(x/2 + 0.5)
    x_T = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    model, _ = from_diffusers(unet, cfg)
    with torch.no_grad():
        ref = solver.sample(model, x_T, t, tm)
    ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return img, ref, sch


SOLVERS = [
    ("dpmpp", dict(order=3)),
    ("dpmpp", dict(order=2, solver_type="heun")),
    ("unipc", dict(order=3, variant="bh1")),
    ("unipc", dict(order=2, variant="bh2")),
    ("ipndm", dict(order=4)),
    ("euler", {}),
    ("heun", {}),
]


@pytest.mark.parametrize("name,kw", SOLVERS, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in SOLVERS])
def test_ddpm_pipeline_equals_solver(name, kw):
    unet = tiny_unet()
    cfg = diffusers.DDPMScheduler(**SD_CONFIG, prediction_type="v_prediction").config
    sched, _ = ld3_ext.integrations.diffusers.schedule_from_diffusers_config(cfg)
    solver = ld3_ext.solvers.SOLVERS[name](backend="reference", **kw)
    n = 4 if name == "heun" else 5
    t = ld3_ext.discretizations.logsnr_uniform(sched, n)
    img, ref, sch = ddpm_pipeline_vs_solver(unet, cfg, solver, t, decoupled(t), n)
    assert abs(img - ref).max() <= 1e-6
    # what the UNet received: the model times in float training-index units t*N - 1
    nfe = solver.nfe(n)
    assert len(sch.timesteps) == nfe and sch.timesteps.dtype == torch.float32
    assert sch.timesteps[0].item() == pytest.approx(999.0)
    if name != "heun":
        torch.testing.assert_close(sch.timesteps, (decoupled(t)[:n] * 1000 - 1).float())


def test_stable_diffusion_pipeline_with_cfg_equals_solver():
    """An unmodified StableDiffusionPipeline (prompt embeddings given; latents out) with LD3Scheduler."""
    unet = tiny_cond_unet()
    cfg = diffusers.DDPMScheduler(**SD_CONFIG).config
    model, sched = from_diffusers(unet, cfg, guidance_scale=3.0)
    solver = ld3_ext.UniPC(order=3, variant="bh2", backend="reference")
    t = ld3_ext.discretizations.time_quadratic(sched, 5)
    tm = decoupled(t, 0.97)
    sch = LD3Scheduler.from_timesteps(t, tm, solver, scheduler_config=cfg)
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=sch,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    cond, unc = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=unc, latents=lat, num_inference_steps=5,
               guidance_scale=3.0, output_type="latent").images
    with torch.no_grad():
        ref = solver.sample(model, lat * sch.init_noise_sigma, t, tm, encoder_hidden_states=cond, uncond=unc)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def minimal_loop(unet, sch, x, n=None, **unet_kw):
    sch.set_timesteps(n)
    x = x * sch.init_noise_sigma
    for tt in sch.timesteps:
        out = unet(sch.scale_model_input(x, tt), tt, **unet_kw).sample
        x = sch.step(out, tt, x).prev_sample
    return x


def test_from_schedule_file(tmp_path):
    from ld3_ext.schedule_file import LearnedSchedule

    unet = tiny_unet()
    cfg = diffusers.DDPMScheduler(**SD_CONFIG).config
    model, sched = from_diffusers(unet, cfg)
    t = ld3_ext.discretizations.edm(sched, 4)
    tm = decoupled(t, 1.02)
    solver = ld3_ext.DPMSolverPP(order=2, backend="reference")
    LearnedSchedule(t, tm, solver_config=solver.config(), nfe=4, schedule_config=sched.config()).save(
        str(tmp_path / "s.json"))
    sch = LD3Scheduler.from_schedule_file(tmp_path / "s.json", scheduler_config=cfg)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = minimal_loop(unet, sch, x)
        ref = solver.sample(model, x * sch.init_noise_sigma, t, tm)
    # the file's solver config carries no backend: the scheduler may use the fused kernels here
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        sch.set_timesteps(10)
    # a schedule learned for another model's betas must not be used silently
    with pytest.raises(DiffusersConfigError, match="alphas_cumprod"):
        LD3Scheduler.from_schedule_file(tmp_path / "s.json", scheduler_config=diffusers.DDPMScheduler().config)
    # save_pretrained / from_pretrained keep the grid and solver
    sch.save_pretrained(tmp_path / "sched")
    sch2 = LD3Scheduler.from_pretrained(tmp_path / "sched")
    with torch.no_grad():
        torch.testing.assert_close(minimal_loop(unet, sch2, x), out, rtol=0, atol=0)


def test_flow_model_in_scheduler_equals_solver():
    """A (random) UNet read as a rectified-flow velocity model with a FlowMatchEuler config and shift."""
    unet = tiny_unet()
    cfg = diffusers.FlowMatchEulerDiscreteScheduler(shift=2.0).config
    model, sched = from_diffusers(unet, cfg)
    assert isinstance(sched, ld3_ext.FlowMatching) and model.prediction == "velocity"
    t = ld3_ext.discretizations.time_uniform(sched, 5)  # shifted grid
    for solver in (ld3_ext.DPMSolverPP(3, backend="reference"), ld3_ext.UniPC(2, backend="reference"),
                   ld3_ext.Euler(backend="reference")):
        sch = LD3Scheduler.from_timesteps(t, decoupled(t, 0.98), solver, scheduler_config=cfg)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            out = minimal_loop(unet, sch, x)
            ref = solver.sample(model, x * sch.init_noise_sigma, t, decoupled(t, 0.98))
        # the network reads flow time t * num_train_timesteps, as diffusers' flow schedulers feed it
        torch.testing.assert_close(sch.timesteps, (decoupled(t, 0.98)[:5] * 1000).float())
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # from_config of a FlowMatchEuler config (no prediction_type field) is a flow scheduler with its shift
    sch = LD3Scheduler.from_config(cfg)
    assert isinstance(sch.schedule, ld3_ext.FlowMatching) and sch.schedule.shift == 2.0
    assert sch.config.prediction_type == "flow_prediction"


def test_baseline_grid_without_stored_timesteps():
    unet = tiny_unet()
    cfg = diffusers.DDPMScheduler().config
    model, sched = from_diffusers(unet, cfg)
    sch = LD3Scheduler.from_config(cfg, solver_config={"name": "unipc", "order": 2, "backend": "reference"},
                                   discretization="time_uniform")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = minimal_loop(unet, sch, x, n=6)
        ref = ld3_ext.UniPC(2, backend="reference").sample(
            model, x * sch.init_noise_sigma, ld3_ext.discretizations.time_uniform(sched, 6))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sch.set_timesteps()


def test_step_does_not_sync_with_the_host(monkeypatch):
    """step() must not read tensor values on the host (.item(), float(), bool(), .tolist(), .numpy()):
    on a GPU each of those is a device sync per step.  The Python-level patches miss reads made inside ATen
    (nonzero, is_nonzero, _local_scalar_dense from a C++ path, tensors lifted from Python lists): the ops
    dispatched by step() are recorded and must hold none of HOST_READS (as in test_no_host_reads, which covers
    set_timesteps grids; here the from_timesteps grids with a decoupled model grid, ipndm included)."""
    from conftest import OpRecorder
    from test_no_host_reads import HOST_READS
    unet = tiny_unet()
    cfg = diffusers.DDPMScheduler().config
    model, sched = from_diffusers(unet, cfg)
    x = torch.randn(1, 3, 8, 8)
    for solver in ("unipc", "dpmpp", "ipndm", "heun"):
        t = ld3_ext.discretizations.logsnr_uniform(sched, 4)
        sch = LD3Scheduler.from_timesteps(t, decoupled(t), {"name": solver, "backend": "reference"},
                                          scheduler_config=cfg)
        sch.set_timesteps()
        outs = [unet(x, tt).sample.detach() for tt in sch.timesteps]

        def boom(*a, **k):
            raise AssertionError("host sync in LD3Scheduler.step")

        with monkeypatch.context() as m:
            for attr in ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu"):
                m.setattr(torch.Tensor, attr, boom)
            y = x
            rec = OpRecorder()
            with rec:
                for tt, out in zip(sch.timesteps, outs):
                    y = sch.step(out, tt, y).prev_sample
        assert torch.isfinite(y).all()
        assert len(rec.ops) > 10, (solver, rec.ops)
        assert not HOST_READS & set(rec.ops), (solver, sorted(HOST_READS & set(rec.ops)))


def test_bad_scheduler_arguments():
    with pytest.raises(DiffusersConfigError, match="prediction_type"):
        LD3Scheduler(prediction_type="score")
    with pytest.raises(ValueError, match="solver_config"):
        LD3Scheduler(solver_config={"name": "lms"})
    with pytest.raises(DiffusersConfigError, match="schedule_config"):
        LD3Scheduler(schedule_config=ld3_ext.EDM().config())
    with pytest.raises(DiffusersConfigError, match="flow_prediction"):
        LD3Scheduler(schedule_config=ld3_ext.FlowMatching().config())  # an eps model on a flow schedule
    with pytest.raises(ValueError, match="strictly decreasing"):
        LD3Scheduler(ld3_timesteps=[0.5, 0.8, 0.001])
    sch = LD3Scheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        sch.step(torch.zeros(1), 0, torch.zeros(1))
    sch.set_timesteps(3)
    with pytest.raises(ValueError, match="eta"):
        sch.step(torch.zeros(1, 3), sch.timesteps[0], torch.zeros(1, 3), eta=1.0)


def _decoupled_scheduler(cfg, solver, n):
    """A tiny UNet, its model, a logSNR grid of n steps with decoupled model times, and an LD3Scheduler on them
    (reference backend) with set_timesteps() called."""
    unet = tiny_unet()
    model, sched = from_diffusers(unet, cfg)
    t = ld3_ext.discretizations.logsnr_uniform(sched, n)
    tm = decoupled(t)
    sch = LD3Scheduler.from_timesteps(t, tm, {**solver, "backend": "reference"}, scheduler_config=cfg)
    sch.set_timesteps()
    return unet, model, t, tm, sch


@pytest.mark.parametrize("begin", ["set_begin_index", "view", "float"])
@pytest.mark.parametrize("solver", [{"name": "unipc", "order": 3}, {"name": "heun"}])
def test_img2img_begin_index(solver, begin):
    """img2img-style use: slice timesteps, set_begin_index, add_noise at the first kept step; the solve then
    equals solver.sample on the remaining grid t[b:] (restarted warm-up) from alpha x0 + sigma noise at t[b].
    Pipelines that slice without set_begin_index (AnimateDiff/CogVideoX video2video) get the same solve: the
    first step finds its interval from its timestep (a view of scheduler.timesteps, or a plain number)."""
    cfg = diffusers.DDPMScheduler(**SD_CONFIG).config
    unet, model, t, tm, sch = _decoupled_scheduler(cfg, solver, 6)
    sched = model.schedule
    per = sch.order
    b = 2
    ts = sch.timesteps[b * per:]
    if begin == "set_begin_index":
        sch.set_begin_index(b * per)
    elif begin == "float":
        ts = [float(v) for v in ts]
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    x = sch.add_noise(x0, noise, torch.as_tensor(ts[:1]).repeat(2))
    x_b = sched.alpha(t[b]).float() * x0 + sched.sigma(t[b]).float() * noise
    torch.testing.assert_close(x, x_b)
    with torch.no_grad():
        for tt in ts:  # (the UNet itself would truncate a Python float time to an int)
            x = sch.step(unet(x, torch.as_tensor(tt)).sample, tt, x).prev_sample
        ref = ld3_ext.solvers.solver_from_config({**solver, "backend": "reference"}).sample(model, x_b, t[b:], tm[b:])
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    if per == 2:  # where SDXL's denoising_start lands with Heun: refused, saying what works instead
        with pytest.raises(ValueError, match="inside a Heun interval.*multistep solver.*denoising_start"):
            sch.set_begin_index(3)


@pytest.mark.parametrize("solver", [{"name": "dpmpp", "order": 3}, {"name": "heun"}])
def test_set_begin_index_keeps_timesteps_whole_as_diffusers_schedulers_do(solver):
    """diffusers' contract, checked against its own DPMSolverMultistepScheduler: set_begin_index(b) leaves
    ``timesteps`` (and num_inference_steps) as set_timesteps made them, step_index counts from b, and a loop over
    ``timesteps[begin_index:]`` runs the solve on t[b:].  (It once replaced timesteps with the tail: such a loop
    then ran 2 of 5 steps at the wrong times without an error.)"""
    cfg = diffusers.DDPMScheduler(**SD_CONFIG).config
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    theirs.set_timesteps(8)
    t_theirs = theirs.timesteps.clone()
    theirs.set_begin_index(3)
    assert torch.equal(theirs.timesteps, t_theirs) and theirs.begin_index == 3

    unet, model, t, tm, sch = _decoupled_scheduler(cfg, solver, 8)
    per = sch.order
    full = sch.timesteps.clone()
    sch.set_begin_index(3 * per)
    assert torch.equal(sch.timesteps, full) and sch.num_inference_steps == 8
    assert sch.begin_index == 3 * per and sch.step_index == 3 * per
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x_b = x.clone()
    calls = 0
    with torch.no_grad():
        for tt in sch.timesteps[sch.begin_index:]:
            x = sch.step(unet(x, tt).sample, tt, x).prev_sample
            calls += 1
            assert sch.step_index == 3 * per + calls
        ref = ld3_ext.solvers.solver_from_config({**solver, "backend": "reference"}).sample(model, x_b, t[3:], tm[3:])
    assert calls == 5 * per
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match=r"called %d times for the %d timesteps from timesteps\[%d\]"
                       % (5 * per + 1, 5 * per, 3 * per)):
        sch.step(torch.zeros_like(x), sch.timesteps[-1], x)


def test_learned_variance_model_in_scheduler_equals_solver(tmp_path):
    """A learned-variance UNet (2C output channels, variance_type="learned_range") runs in the scheduler on its
    first C channels, as from_diffusers reads it; 2C channels without that setting is a clear error."""
    unet = tiny_unet(out_channels=6)
    cfg = diffusers.DDPMScheduler(**SD_CONFIG, variance_type="learned_range").config
    model, sched = from_diffusers(unet, cfg)
    t = ld3_ext.discretizations.logsnr_uniform(sched, 4)
    solver = ld3_ext.DPMSolverPP(order=2, backend="reference")
    sch = LD3Scheduler.from_timesteps(t, decoupled(t), solver, scheduler_config=cfg)
    assert sch.config.variance_type == "learned_range"
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = minimal_loop(unet, sch, x)
        ref = solver.sample(model, x * sch.init_noise_sigma, t, decoupled(t))
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    sch.save_pretrained(tmp_path / "sched")  # variance_type is a config field: it survives the round trip
    with torch.no_grad():
        torch.testing.assert_close(minimal_loop(unet, LD3Scheduler.from_pretrained(tmp_path / "sched"), x), out,
                                   rtol=0, atol=0)
    plain = LD3Scheduler.from_timesteps(t, None, solver, scheduler_config=diffusers.DDPMScheduler(**SD_CONFIG).config)
    with pytest.raises(ValueError, match="variance_type"), torch.no_grad():
        minimal_loop(unet, plain, x)
    plain.set_timesteps()
    with pytest.raises(ValueError, match="does not match"):
        plain.step(torch.zeros(2, 4, 8, 8), plain.timesteps[0], x)


def test_guidance_scale_round_trips_through_save_pretrained(tmp_path):
    """The guidance scale a grid was learned at is a config field: save_pretrained/from_pretrained (and so
    `ld3 export-diffusers`) keep it, and the mismatch warning still fires on the reloaded scheduler."""
    import json
    import warnings

    from ld3_ext.cli import main as cli_main
    from ld3_ext.schedule_file import LearnedSchedule

    cfg = diffusers.DDPMScheduler(**SD_CONFIG)
    sched, _ = ld3_ext.integrations.diffusers.schedule_from_diffusers_config(cfg.config)
    t = ld3_ext.discretizations.logsnr_uniform(sched, 5)
    LearnedSchedule(t, solver_config={"name": "dpmpp", "order": 3}, nfe=5, schedule_config=sched.config(),
                    guidance_scale=7.5).save(str(tmp_path / "s.json"))
    sch = LD3Scheduler.from_schedule_file(tmp_path / "s.json", scheduler_config=cfg.config)
    sch.save_pretrained(tmp_path / "sched")
    cfg.save_config(tmp_path / "model_sched")
    assert cli_main(["export-diffusers", str(tmp_path / "s.json"), "--scheduler-config", str(tmp_path / "model_sched"),
                     "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "scheduler_config.json").read_text())["guidance_scale"] == 7.5
    for folder in ("sched", "cli"):
        sch2 = LD3Scheduler.from_pretrained(tmp_path / folder)
        assert sch2.config.guidance_scale == 7.5 and sch2.guidance_scale == 7.5
        with pytest.warns(UserWarning, match="guidance scale 7.5"):
            assert sch2.check_guidance(3.0) is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert sch2.check_guidance(7.5) is True
    assert LD3Scheduler.from_timesteps(t, scheduler_config=cfg.config).config.guidance_scale is None


def test_export_diffusers_never_overwrites_the_models_own_scheduler_config(tmp_path):
    """`ld3 export-diffusers s.json --scheduler-config MODEL/scheduler --out MODEL/scheduler` would replace the
    model's own config (the input it reads) with an LD3Scheduler one: refused, the input left as it was."""
    from ld3_ext.cli import main as cli_main
    from ld3_ext.schedule_file import LearnedSchedule

    cfg = diffusers.DDPMScheduler(**SD_CONFIG)
    sched, _ = ld3_ext.integrations.diffusers.schedule_from_diffusers_config(cfg.config)
    LearnedSchedule(ld3_ext.discretizations.logsnr_uniform(sched, 5), solver_config={"name": "dpmpp", "order": 3},
                    nfe=5, schedule_config=sched.config()).save(str(tmp_path / "s.json"))
    model_sched = tmp_path / "model" / "scheduler"
    cfg.save_config(model_sched)
    before = (model_sched / "scheduler_config.json").read_bytes()
    for given in (model_sched, model_sched / "scheduler_config.json"):
        with pytest.raises(SystemExit, match="is the --scheduler-config it is made from"):
            cli_main(["export-diffusers", str(tmp_path / "s.json"), "--scheduler-config", str(given),
                      "--out", str(model_sched)])
    assert (model_sched / "scheduler_config.json").read_bytes() == before
    assert cli_main(["export-diffusers", str(tmp_path / "s.json"), "--scheduler-config", str(model_sched),
                     "--out", str(tmp_path / "ld3_sched")]) == 0


def test_an_interrupted_export_diffusers_keeps_the_earlier_file_whole(tmp_path, monkeypatch):
    """The exported config is written atomically: an interrupt while it is written (here: while its JSON is
    made) leaves the file of an earlier export as it was, not truncated."""
    from ld3_ext.cli import main as cli_main
    from ld3_ext.schedule_file import LearnedSchedule

    cfg = diffusers.DDPMScheduler(**SD_CONFIG)
    sched, _ = ld3_ext.integrations.diffusers.schedule_from_diffusers_config(cfg.config)
    LearnedSchedule(ld3_ext.discretizations.logsnr_uniform(sched, 5), solver_config={"name": "dpmpp", "order": 3},
                    nfe=5, schedule_config=sched.config()).save(str(tmp_path / "s.json"))
    cfg.save_config(tmp_path / "model_sched")
    argv = ["export-diffusers", str(tmp_path / "s.json"), "--scheduler-config", str(tmp_path / "model_sched"),
            "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 0
    before = (tmp_path / "out" / "scheduler_config.json").read_bytes()

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(LD3Scheduler, "to_json_string", interrupted)
    assert cli_main(argv) == 130
    assert (tmp_path / "out" / "scheduler_config.json").read_bytes() == before
    assert LD3Scheduler.from_pretrained(tmp_path / "out").config.ld3_timesteps is not None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scheduler_config.json"]


def test_export_diffusers_names_a_scheduler_config_that_is_not_json(tmp_path):
    from ld3_ext.cli import main as cli_main
    from ld3_ext.schedule_file import LearnedSchedule

    sched = ld3_ext.VPDiscrete.linear(0.00085, 0.012)
    LearnedSchedule(ld3_ext.discretizations.logsnr_uniform(sched, 5), solver_config={"name": "dpmpp", "order": 3},
                    nfe=5, schedule_config=sched.config()).save(str(tmp_path / "s.json"))
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"--scheduler-config: .*cfg\.json is not valid JSON"):
        cli_main(["export-diffusers", str(tmp_path / "s.json"), "--scheduler-config", str(tmp_path / "cfg.json"),
                  "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_dynamic_shifting_and_unsupported_configs_are_refused_like_from_diffusers(tmp_path):
    """from_config/from_pretrained/from_timesteps refuse what from_diffusers refuses (fields LD3Scheduler does
    not register would otherwise be dropped silently): Flux-style dynamic shifting without an explicit shift,
    and live configs of EDM / consistency schedulers."""
    fx = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    with pytest.raises(DiffusersConfigError, match="use_dynamic_shifting"):
        from_diffusers(tiny_unet(), fx.config)
    with pytest.raises(DiffusersConfigError, match="use_dynamic_shifting"):
        LD3Scheduler.from_config(fx.config)
    fx.save_pretrained(tmp_path / "flux")
    with pytest.raises(DiffusersConfigError, match="use_dynamic_shifting"):
        LD3Scheduler.from_pretrained(tmp_path / "flux")
    fm = ld3_ext.FlowMatching(shift=2.5)
    t = ld3_ext.discretizations.time_uniform(fm, 4)
    with pytest.raises(DiffusersConfigError, match="use_dynamic_shifting"):
        LD3Scheduler.from_timesteps(t, scheduler_config=fx.config)
    # an explicit shift is accepted everywhere, as from_diffusers(..., shift=) accepts it
    _, ref = from_diffusers(tiny_unet(), fx.config, shift=2.5)
    assert LD3Scheduler.from_config(fx.config, shift=2.5).schedule.shift == ref.shift == 2.5
    assert LD3Scheduler.from_timesteps(t, scheduler_config=fx.config, schedule=fm).schedule.shift == 2.5
    assert LD3Scheduler.from_timesteps(t, scheduler_config=fx.config, shift=2.5).schedule.shift == 2.5
    # a multistep flow config: the explicit shift replaces its flow_shift too
    dpm = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                                                use_dynamic_shifting=True).config
    with pytest.raises(DiffusersConfigError, match="use_dynamic_shifting"):
        LD3Scheduler.from_config(dpm)
    assert LD3Scheduler.from_config(dpm, shift=2.5).schedule.shift == 2.5
    # a flow schedule file carries its own shift: a dynamic-shifting config is fine there
    from ld3_ext.schedule_file import LearnedSchedule
    LearnedSchedule(t, solver_config={"name": "euler"}, nfe=4, schedule_config=fm.config()).save(
        str(tmp_path / "f.json"))
    assert LD3Scheduler.from_schedule_file(tmp_path / "f.json", scheduler_config=fx.config).schedule.shift == 2.5
    for cls, field in (("EDMEulerScheduler", "sigma_data"), ("LCMScheduler", "original_inference_steps"),
                       ("ScoreSdeVeScheduler", "snr")):
        live = getattr(diffusers, cls)().config
        field = f"field {field}="
        with pytest.raises(DiffusersConfigError, match=field):
            LD3Scheduler.from_config(live)
        with pytest.raises(DiffusersConfigError, match=field):
            LD3Scheduler.from_timesteps(ld3_ext.discretizations.logsnr_uniform(ld3_ext.VPDiscrete.linear(), 4),
                                        scheduler_config=live)


def test_from_schedule_file_takes_the_recorded_prediction(tmp_path):
    """A schedule file trained by ld3_ext records what the network predicts: the exported scheduler uses it, a
    scheduler config that says otherwise is refused, and a file without it says what is assumed."""
    import warnings
    from ld3_ext.schedule_file import LearnedSchedule
    cfg = diffusers.DDPMScheduler(**SD_CONFIG).config
    _, sched = from_diffusers(tiny_unet(), cfg)
    t = ld3_ext.discretizations.logsnr_uniform(sched, 4)

    def write(name, model):
        LearnedSchedule(t, solver_config={"name": "dpmpp", "order": 2}, nfe=4, schedule_config=sched.config(),
                        model=model).save(str(tmp_path / name))
        return tmp_path / name
    v_file = write("v.json", {"name": "net", "prediction": "v"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LD3Scheduler.from_schedule_file(v_file).config.prediction_type == "v_prediction"
        assert LD3Scheduler.from_schedule_file(v_file, scheduler_config={**cfg, "prediction_type": "v_prediction"}) \
            .config.prediction_type == "v_prediction"
    with pytest.raises(DiffusersConfigError, match="predicts 'v'"):
        LD3Scheduler.from_schedule_file(v_file, scheduler_config={**cfg, "prediction_type": "epsilon"})
    # an explicit keyword is checked the same way, and says what it is without a warning
    with pytest.raises(DiffusersConfigError, match="predicts 'v'"):
        LD3Scheduler.from_schedule_file(v_file, prediction_type="epsilon")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none_file = write("none.json", {"name": "net"})
        assert LD3Scheduler.from_schedule_file(none_file, prediction_type="sample").config.prediction_type == "sample"
    with pytest.warns(UserWarning, match="assuming prediction_type='epsilon'"):
        assert LD3Scheduler.from_schedule_file(write("none.json", {"name": "net"})).config.prediction_type == "epsilon"



@pytest.mark.parametrize("solver", [{"name": "heun"}, {"name": "euler"}])
def test_step_continues_from_the_sample_the_pipeline_passes(solver):
    """An inpainting blend or a step callback edits the latents between steps: the solve continues from the
    edited sample (as diffusers' schedulers do), Heun included (it used to continue from its own stored state)."""
    unet = tiny_unet()
    cfg = diffusers.DDPMScheduler(**SD_CONFIG).config
    model, sched = from_diffusers(unet, cfg)
    t = ld3_ext.discretizations.logsnr_uniform(sched, 4)
    conf = {**solver, "backend": "reference"}
    sch = LD3Scheduler.from_timesteps(t, None, conf, scheduler_config=cfg)
    sch.set_timesteps()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    edit_after = 2 * sch.order  # two intervals done: the state is at t[2]
    with torch.no_grad():
        for k, tt in enumerate(sch.timesteps):
            x = sch.step(unet(x.float(), tt).sample.double(), tt, x).prev_sample
            if k + 1 == edit_after:
                x = 0.5 * x + 0.3
                edited = x.clone()
        ref = ld3_ext.solvers.solver_from_config(conf).sample(model, edited.float(), t[2:]).double()
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_config_describes_the_schedule_it_runs_without_a_model_config(tmp_path):
    """Without the model's scheduler config, the config still describes the schedule the scheduler runs, so that
    switching back (DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)) or from_diffusers(unet,
    pipe.scheduler.config) gets that schedule, not diffusers' default betas."""
    import warnings
    from ld3_ext.integrations.diffusers import schedule_from_diffusers_config
    from ld3_ext.schedule_file import LearnedSchedule
    sd = ld3_ext.VPDiscrete.linear(0.00085, 0.012)
    t = ld3_ext.discretizations.logsnr_uniform(sd, 6)
    path = LearnedSchedule(t, t.clone(), solver_config={"name": "dpmpp", "order": 3}, nfe=6,
                           schedule_config=sd.config()).save(str(tmp_path / "sd.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no recorded prediction: epsilon assumed, with a warning
        built = [LD3Scheduler.from_schedule_file(path), LD3Scheduler.from_timesteps(t, solver="dpmpp", schedule=sd)]
    for sch in built:
        back = diffusers.DPMSolverMultistepScheduler.from_config(sch.config)
        torch.testing.assert_close(back.alphas_cumprod.double(), sd.alphas_cumprod, rtol=2e-6, atol=0)
        again, _ = schedule_from_diffusers_config(sch.config)
        torch.testing.assert_close(again.alphas_cumprod, sd.alphas_cumprod, rtol=2e-6, atol=0)  # diffusers: float32
    flow = ld3_ext.FlowMatching(shift=3.0)
    sch = LD3Scheduler.from_timesteps(ld3_ext.discretizations.time_uniform(flow, 4), solver="euler", schedule=flow)
    back = diffusers.FlowMatchEulerDiscreteScheduler.from_config(sch.config)
    assert back.config.shift == 3.0 and sch.config.prediction_type == "flow_prediction"


def test_scheduler_arguments_are_checked_when_given():
    with pytest.raises(ValueError, match="discretization"):
        LD3Scheduler(discretization="karras")  # at construction, not at the first set_timesteps
    sch = LD3Scheduler()
    for bad, exc in ((2.7, TypeError), ("5", TypeError), (True, TypeError), (0, ValueError), (-3, ValueError)):
        with pytest.raises(exc, match="num_inference_steps"):
            sch.set_timesteps(bad)
    sch.set_timesteps(5)
    assert sch.num_inference_steps == 5


def test_heun_keeps_float32_precision_on_flow_matching():
    """Heun's step() runs solver.sample's chain of multistep updates on x, not EDM's loop in x/alpha, whose state
    starts 1/alpha(t_0) larger than the sample: in float32 on flow matching that loop was 3e-4 off the float64
    solve here (the chain: 8e-6)."""
    from ld3_ext import testbeds
    flow = ld3_ext.FlowMatching()
    mix = testbeds.ring2d()
    model = mix.model(flow)
    t = ld3_ext.discretizations.time_uniform(flow, 5)
    sch = LD3Scheduler.from_timesteps(t, solver={"name": "heun", "backend": "reference"}, schedule=flow)
    sch.set_timesteps()
    x_T = mix.prior_noise(flow, 64, generator=torch.Generator().manual_seed(0))
    truth = ld3_ext.Heun(backend="reference").sample(model, x_T, t)  # float64
    x = x_T.float()
    tm = sch._tables_cpu["tm"]
    with torch.no_grad():
        for k, tt in enumerate(sch.timesteps):
            s = tm[(k + 1) // 2]
            x0 = model.predict(x.double(), s.reshape(1), returns="x0")[0]
            v = (x.double() - x0) / s  # flow_prediction: eps - x0, with x = (1 - s) x0 + s eps
            x = sch.step(v.float(), tt, x).prev_sample
    err = float((x.double() - truth).abs().max() / truth.abs().max())
    assert err < 3e-5, err  # float32 round-off of 10 evaluations (measured 8e-6; the old loop 3e-4)


@pytest.mark.parametrize("solver,prediction", [("euler", "sample"), ("ipndm", "epsilon"), ("dpmpp", "sample"),
                                               ("unipc", "sample"), ("heun", "sample")])
def test_channels_last_unet_output_for_contiguous_latents(monkeypatch, solver, prediction):
    """A UNet put in channels_last (a common diffusers speed-up) returns channels_last outputs for contiguous
    latents: the fused updates get their history in the latents' layout (one copy per output, not one per update
    that reads it), and the solve equals the one with contiguous outputs."""
    from ld3_ext import _native, fused

    if not _native.native_available():
        pytest.fail("the fused path needs the native extension, which this suite builds")
    cfg = diffusers.DDPMScheduler(**SD_CONFIG, prediction_type=prediction).config
    _, sched = from_diffusers(tiny_unet(), cfg)
    t = ld3_ext.discretizations.logsnr_uniform(sched, 5)
    x_T = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    calls = {"all": 0, "mixed": 0}
    real = _native._C

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            if name != "multistep_update":
                return fn

            def run(x, coef, history, *rest):
                calls["all"] += 1
                calls["mixed"] += any(m.stride() != x.stride() for m in history)
                return fn(x, coef, history, *rest)
            return run

    def solve(out_layout):
        sch = LD3Scheduler.from_timesteps(t, None, {"name": solver, "backend": "fused"}, scheduler_config=cfg)
        sch.set_timesteps()
        x = x_T.clone()
        for tt in sch.timesteps:
            out = torch.tanh(0.3 * x) * (1 + 1e-3 * float(tt))  # a stand-in network, contiguous
            x = sch.step(out.contiguous(memory_format=out_layout), tt, x).prev_sample
        return x

    monkeypatch.setattr(fused, "_C", Spy())
    got = solve(torch.channels_last)
    assert calls["all"] >= 5 and calls["mixed"] == 0, calls
    assert got.is_contiguous()
    want = solve(torch.contiguous_format)
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()


def test_scale_noise_matches_flow_match_euler_for_sd3_and_flux_img2img():
    """SD3 / Flux img2img and inpainting call scheduler.scale_noise(sample, timestep, noise): diffusers'
    FlowMatchEulerDiscreteScheduler is the oracle, x = sigma noise + (1 - sigma) x_0 with sigma = timestep/1000."""
    fm = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(8)
    t = ld3_ext.discretizations.time_uniform(ld3_ext.FlowMatching(shift=3.0), 6)
    sch = LD3Scheduler.from_timesteps(t, decoupled(t, 0.97), "dpmpp", scheduler_config=fm.config)
    sch.set_timesteps(6)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for ts in (fm.timesteps[2:3], fm.timesteps[[1, 5]]):
        want = fm.scale_noise(x0, ts, noise)
        got = sch.scale_noise(x0, ts, noise)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got, x0, atol=1e-2)
    # one of this solve's own timesteps is its solver-grid time (the decoupled network time differs)
    own = sch.timesteps[1:2]
    torch.testing.assert_close(sch.scale_noise(x0, own, noise), sch.add_noise(x0, noise, own), rtol=0, atol=0)
    tt = float(t[1])
    torch.testing.assert_close(sch.scale_noise(x0, own, noise), (1 - tt) * x0 + tt * noise, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="scale_noise: noise is required"):
        sch.scale_noise(x0, own)
    with pytest.raises(ValueError, match="scale_noise: timestep must be finite"):
        sch.scale_noise(x0, torch.tensor([2000.0]), noise)
    with pytest.raises(ValueError, match="scale_noise: noise must have the shape of sample"):
        sch.scale_noise(x0, own, noise[:1])


def test_a_flow_scheduler_config_keeps_its_shift_for_every_diffusers_flow_scheduler():
    """Switching back with DPMSolverMultistep/UniPC.from_config(ld3.config) reads flow_shift (FlowMatchEuler reads
    shift): both are written, so neither loses the schedule's shift."""
    sched = ld3_ext.FlowMatching(shift=3.0)
    t = ld3_ext.discretizations.time_uniform(sched, 5)
    ld3 = LD3Scheduler.from_timesteps(t, None, "dpmpp", schedule=sched)
    assert ld3.config.shift == ld3.config.flow_shift == 3.0
    for cls in (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler):
        other = cls.from_config(ld3.config)
        assert other.config.flow_shift == 3.0 and other.config.use_flow_sigmas
        ref = cls(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
        unshifted = cls(use_flow_sigmas=True, prediction_type="flow_prediction")
        for s in (other, ref, unshifted):
            s.set_timesteps(6)
        torch.testing.assert_close(other.sigmas, ref.sigmas)
        assert (other.sigmas[1:-1] - unshifted.sigmas[1:-1]).abs().min() > 1e-2
    fm = diffusers.FlowMatchEulerDiscreteScheduler.from_config(ld3.config)
    assert fm.config.shift == 3.0
    # and back again: the shift survives the round trip
    assert LD3Scheduler.from_config(ld3.config).schedule.shift == 3.0


@pytest.mark.parametrize("solver", [{"name": "dpmpp", "order": 3}, {"name": "ipndm", "order": 3},
                                    {"name": "unipc", "order": 2}])
def test_a_step_that_raises_leaves_the_state_for_a_retry(solver):
    """step() put its model output into the history before the update ran: after an error (a batch of 2 where the
    solve had 1) the retry with the right batch failed too, on the stored wrong entry."""
    unet = tiny_unet()
    cfg = diffusers.DDPMScheduler(**SD_CONFIG).config
    t = ld3_ext.discretizations.logsnr_uniform(from_diffusers(unet, cfg)[1], 4)
    sch = LD3Scheduler.from_timesteps(t, None, {**solver, "backend": "reference"}, scheduler_config=cfg)
    ref = LD3Scheduler.from_timesteps(t, None, {**solver, "backend": "reference"}, scheduler_config=cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 8, 8, generator=g)
    outs = [torch.randn(1, 3, 8, 8, generator=g) for _ in range(4)]
    for s in (sch, ref):
        s.set_timesteps()
    xa, xb = x.clone(), x.clone()
    for k, ts in enumerate(sch.timesteps):
        if k == 2:
            with pytest.raises((ValueError, RuntimeError)):
                sch.step(outs[k].repeat(2, 1, 1, 1), ts, xa.repeat(2, 1, 1, 1))
        xa = sch.step(outs[k], ts, xa).prev_sample
        xb = ref.step(outs[k], ts, xb).prev_sample
    torch.testing.assert_close(xa, xb, rtol=0, atol=0)


def test_pipelines_see_eta_in_step_and_get_it_refused():
    """LDM and StableDiffusion pipelines pass eta only to a scheduler whose step() names it
    (inspect.signature): with **kwargs alone eta=0.8 ran as 0 without a word (pipelines audit)."""
    import inspect
    sch = LD3Scheduler()
    sch.set_timesteps(3)
    accepts = set(inspect.signature(sch.step).parameters)
    assert {"eta", "generator"} <= accepts  # what the pipelines' prepare_extra_step_kwargs look for
    with pytest.raises(ValueError, match=r"eta must be 0, got 0.8"):
        sch.step(torch.zeros(1, 3), sch.timesteps[0], torch.zeros(1, 3), eta=0.8, generator=None)
    out = sch.step(torch.zeros(1, 3), sch.timesteps[0], torch.zeros(1, 3), eta=0.0, generator=None,
                   use_clipped_model_output=False)
    assert out.prev_sample.shape == (1, 3)


@pytest.mark.parametrize("solver", [{"name": "dpmpp", "order": 3}, {"name": "heun"}])
def test_a_loop_that_does_not_start_at_the_begin_index_is_refused(solver):
    """set_begin_index(b) then a loop over timesteps[b + 1:] ran the intervals from b with the wrong times, a wrong
    sample without an error (pipelines audit)."""
    cfg = diffusers.DDPMScheduler(**SD_CONFIG).config
    unet, model, t, tm, sch = _decoupled_scheduler(cfg, solver, 6)
    per = sch.order
    x = torch.randn(1, 3, 8, 8)
    sch.set_begin_index(2 * per)
    with pytest.raises(ValueError, match=rf"set_begin_index\({2 * per}\) starts the solve at timesteps\[{2 * per}\], "
                                         rf"but the first timestep .* is timesteps\[{3 * per}\]"):
        sch.step(torch.zeros_like(x), sch.timesteps[3 * per], x)
    with pytest.raises(ValueError, match="is none of scheduler.timesteps"):
        sch.step(torch.zeros_like(x), torch.tensor(123456.0), x)
    sch.step(torch.zeros_like(x), sch.timesteps[2 * per], x)  # the begin index itself
    sch.step(torch.zeros_like(x), float(sch.timesteps[2 * per + 1]), x)  # later steps are not looked up


def _sd_scheduler_50():
    """(scheduler on SD's config with 50 steps set, a latent, 50, a copy of its timesteps)."""
    sch = LD3Scheduler.from_config(diffusers.DDPMScheduler(**SD_CONFIG).config)
    sch.set_timesteps(50)
    return sch, torch.randn(1, 4, 4, 4), 50, sch.timesteps.clone()


@pytest.mark.parametrize("rounding", ["half", "long", "bfloat16", "round"])
def test_a_rounded_copy_of_the_begin_index_timestep_starts_the_solve(rounding):
    """With set_begin_index(b), a pipeline's t = timesteps[b].half() (or an int) was refused where the grid's gaps
    are under the rounding (13 of 50 begin indices on SD's grid): the unique-entry look-up found no entry, and
    the error told the user to loop over timesteps[b:], which they did (review)."""
    sch, x, n, ts = _sd_scheduler_50()
    for b in range(n):
        sch.set_timesteps(n)
        sch.set_begin_index(b)
        t = getattr(ts[b], rounding)()
        a = sch.step(torch.zeros_like(x), t, x).prev_sample
        sch.set_timesteps(n)
        sch.set_begin_index(b)
        e = sch.step(torch.zeros_like(x), ts[b], x).prev_sample  # the same solve as from the exact value
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    sch.set_timesteps(n)
    sch.set_begin_index(10)
    with pytest.raises(ValueError, match=r"set_begin_index\(10\) starts the solve at timesteps\[10\]"):
        sch.step(torch.zeros_like(x), getattr(ts[20], rounding)(), x)  # another entry's rounded copy


@pytest.mark.parametrize("rounding", ["half", "bfloat16"])
def test_a_rounded_copy_of_the_next_timestep_after_set_begin_index_is_refused(rounding):
    """set_begin_index(b) and a loop one entry late (t = timesteps[b + 1].half()) ran the solve from b silently
    where the grid's gaps are under 1 (b = 44..48 of SD's 50 steps): the rounding tolerance was 1, not the
    half / bfloat16 rounding of timesteps[b] (review of _rounds_to_entry)."""
    sch, x, n, ts = _sd_scheduler_50()
    for b in range(n - 1):
        sch.set_timesteps(n)
        sch.set_begin_index(b)
        with pytest.raises(ValueError, match=rf"set_begin_index\({b}\) starts the solve at timesteps\[{b}\]"):
            sch.step(torch.zeros_like(x), getattr(ts[b + 1], rounding)(), x)


def test_from_config_refuses_from_timesteps_words_it_would_drop():
    """from_config(cfg, solver="unipc") built the default DPM-Solver++(3M): ConfigMixin drops unknown keywords with
    a log line (pipelines audit)."""
    cfg = diffusers.DDPMScheduler(**SD_CONFIG).config
    with pytest.raises(TypeError, match=r"solver is not a scheduler config field: give the solver as solver_config="):
        LD3Scheduler.from_config(cfg, solver="unipc")
    with pytest.raises(TypeError, match=r"num_inference_steps .* pass it to set_timesteps"):
        LD3Scheduler.from_config(cfg, num_inference_steps=8)
    sch, unused = LD3Scheduler.from_config(cfg, return_unused_kwargs=True, solver="unipc")  # asked for: returned
    assert unused.get("solver") == "unipc" and sch.solver.name == "dpmpp"
    sch = LD3Scheduler.from_config(cfg, solver_config=ld3_ext.UniPC(order=2).config())
    assert sch.solver.name == "unipc"


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps", "xpu", "vulkan", "nonsense"])
def test_set_timesteps_names_a_device_this_torch_cannot_use(device):
    """Only a missing CUDA was named: mps/xpu/vulkan, or cuda:7 on a one-GPU machine, failed with torch's bare
    error (a RuntimeError or AssertionError naming neither set_timesteps nor device; review)."""
    try:
        torch.empty(0, device=device)
        usable = torch.device(device).type != "cuda" or torch.device(device).index is None or \
            torch.device(device).index < torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - whatever this torch raises for it
        usable = False
    sch = LD3Scheduler()
    if usable:  # a machine that has it: the timesteps go there
        sch.set_timesteps(3, device=device)
        assert sch.timesteps.device.type == torch.device(device).type
        return
    with pytest.raises(ValueError, match=rf"set_timesteps: device='{device}' (cannot be used: |is not a usable torch device \()\S"):
        sch.set_timesteps(3, device=device)
    sch.set_timesteps(3)  # usable afterwards
    assert sch.timesteps.device.type == "cpu"


def test_from_config_says_it_drops_dynamic_thresholding():
    """A config with thresholding=True (DeepFloyd IF's) lost it silently: the samples were the plain ODE solve's.
    clip_sample is dropped quietly, as diffusers' own ODE schedulers drop it."""
    import warnings
    cfg = dict(diffusers.DDPMScheduler(**SD_CONFIG).config)
    with pytest.warns(UserWarning, match=r"from_config: .*thresholding=True.*does not do"):
        LD3Scheduler.from_config({**cfg, "thresholding": True})
    with pytest.warns(UserWarning, match=r"from_timesteps: .*thresholding=True.*does not do"):
        LD3Scheduler.from_timesteps(torch.linspace(1.0, 0.001, 5, dtype=torch.float64),
                                    scheduler_config={**cfg, "thresholding": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LD3Scheduler.from_config({**cfg, "thresholding": False, "clip_sample": True})
        LD3Scheduler.from_config(cfg)


def test_from_schedule_file_says_it_drops_dynamic_thresholding(tmp_path):
    """from_config and from_timesteps warned about a thresholding config; from_schedule_file (what ld3 export-diffusers
    runs) took DeepFloyd IF's thresholding=True without a word, and its saved config no longer shows it."""
    import warnings
    from ld3_ext.schedule_file import LearnedSchedule
    cfg = dict(diffusers.DDPMScheduler(**SD_CONFIG).config)
    sched, _ = ld3_ext.integrations.diffusers.schedule_from_diffusers_config(cfg)
    t = ld3_ext.discretizations.edm(sched, 4)
    LearnedSchedule(t, t.clone(), solver_config=ld3_ext.DPMSolverPP(order=2).config(), nfe=4,
                    schedule_config=sched.config()).save(str(tmp_path / "s.json"))
    with pytest.warns(UserWarning, match=r"from_schedule_file: .*thresholding=True.*does not do"):
        LD3Scheduler.from_schedule_file(tmp_path / "s.json", scheduler_config={**cfg, "thresholding": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LD3Scheduler.from_schedule_file(tmp_path / "s.json", scheduler_config={**cfg, "thresholding": False})


def test_thresholding_warning_reads_the_overrides_and_comes_with_a_schedule_too():
    """from_config(cfg, thresholding=...) is what the scheduler gets: a config's True turned off by the caller is no
    warning, a True given by the caller is one; from_timesteps warns with an explicit schedule as well."""
    import warnings
    cfg = dict(diffusers.DDPMScheduler(**SD_CONFIG).config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LD3Scheduler.from_config({**cfg, "thresholding": True}, thresholding=False)
    with pytest.warns(UserWarning, match=r"from_config: .*thresholding=True"):
        LD3Scheduler.from_config({**cfg, "thresholding": False}, thresholding=True)
    sd = ld3_ext.VPDiscrete.linear(0.00085, 0.012)
    with pytest.warns(UserWarning, match=r"from_timesteps: .*thresholding=True"):
        LD3Scheduler.from_timesteps(ld3_ext.discretizations.logsnr_uniform(sd, 4),
                                    scheduler_config={**cfg, "thresholding": True}, schedule=sd)


def test_sigmas_are_diffusers_noise_levels_and_wan_pipeline_runs():
    """Pipelines read ``scheduler.sigmas`` (WanPipeline: ``float(scheduler.sigmas[i])`` every step): it was missing, an
    AttributeError at the first step.  One entry per timestep plus the grid's end, in diffusers' units: sigma/alpha on
    VP (DPMSolverMultistep's own sigmas on its grid), the flow time on flow matching (timesteps / N)."""
    dpm = diffusers.DPMSolverMultistepScheduler(**SD_CONFIG, final_sigmas_type="sigma_min")
    dpm.set_timesteps(6)
    grid = (torch.cat([dpm.timesteps.double(), torch.zeros(1, dtype=torch.float64)]) + 1) / 1000
    sch = LD3Scheduler.from_timesteps(grid, solver="dpmpp", scheduler_config=dpm.config)
    sch.set_timesteps(6)
    torch.testing.assert_close(sch.sigmas, dpm.sigmas.float(), rtol=1e-6, atol=0)
    sch.set_begin_index(2)  # whole, as timesteps
    assert sch.sigmas.numel() == sch.timesteps.numel() + 1

    cfg = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).config
    torch.manual_seed(0)
    tr = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                         out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1,
                                         rope_max_seq_len=32).eval()
    sch = LD3Scheduler.from_config(cfg)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sch, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    pe, ne, lat = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g), torch.randn(1, 4, 2, 4, 4,
                                                                                                      generator=g)
    out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat, height=32, width=32, num_frames=5,
               num_inference_steps=4, guidance_scale=3.0, output_type="latent").frames
    assert out.shape == lat.shape and torch.isfinite(out).all()
    torch.testing.assert_close(sch.sigmas[:-1], sch.timesteps / 1000)
    assert sch.sigmas[-1].item() == pytest.approx(sch.schedule.t_min)
