"""diffusers UNets + scheduler configs -> (model, schedule) for every solver (ld3_ext.integrations.diffusers).

Tiny randomly initialised UNets built from configs (no weights, no network).  Oracles: diffusers' own
DDPMScheduler betas and DDIMScheduler (eta=0) sampling, which our Euler (= DDIM) must reproduce.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import ld3_ext  # noqa: E402
from ld3_ext.integrations.diffusers import (DiffusersConfigError, from_diffusers, load_diffusers_model,  # noqa: E402
                                           schedule_from_diffusers_config)


# tiny tensors on a shared 2-core box: extra threads only add contention
pytestmark = pytest.mark.usefixtures("single_thread")

from _tiny_unets import tiny_cond_unet, tiny_dit, tiny_sd3_transformer, tiny_sdxl_unet, tiny_unet  # noqa: E402


# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta_schedule,kw", [("linear", {}), ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
                                              ("squaredcos_cap_v2", {})])
def test_schedule_matches_diffusers_alphas_cumprod(beta_schedule, kw):
    ref = diffusers.DDPMScheduler(beta_schedule=beta_schedule, **kw)
    sched, pred = schedule_from_diffusers_config(ref.config)
    assert isinstance(sched, ld3_ext.VPDiscrete) and pred == "eps"
    assert sched.num_train_timesteps == 1000
    idx = torch.arange(0, 1000, 37, dtype=torch.float64)
    a2 = sched.alpha(sched.t_from_index(idx)) ** 2
    torch.testing.assert_close(a2, ref.alphas_cumprod.double()[idx.long()], rtol=1e-12, atol=0)
    if beta_schedule == "squaredcos_cap_v2":
        # the lambda < -5.1 tail is cut (DPM-Solver's numerical_clip_alpha): sampling starts below t = 1
        assert sched.t_max < 1.0 and sched.lambda_min >= -5.1 - 1e-9
    else:
        assert sched.t_max == 1.0 and sched.t_min == pytest.approx(1e-3)


@pytest.mark.parametrize("ptype,expected", [("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")])
def test_prediction_types(ptype, expected):
    cfg = diffusers.DDIMScheduler(prediction_type=ptype).config
    model, sched = from_diffusers(tiny_unet(), cfg)
    assert model.prediction == expected and model.time_input == "index"
    assert model.sample_shape == (3, 8, 8)
    assert not any(p.requires_grad for p in model.net.parameters())  # frozen: LD3 trains only the grid


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_euler_equals_diffusers_ddim(ptype):
    """Our Euler (= DDIM) on the adapter model reproduces diffusers' DDIMScheduler(eta=0): this checks the
    beta mapping, the index time units the UNet receives and the prediction conversion together."""
    unet = tiny_unet()
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type=ptype, timestep_spacing="trailing", set_alpha_to_one=False,
                                   clip_sample=False)
    ddim.set_timesteps(5)
    idx = ddim.timesteps.tolist() + [0]  # [999, 799, 599, 399, 199] then alphas_cumprod[0] (set_alpha_to_one=False)
    model, sched = from_diffusers(unet, ddim.config)
    t = sched.t_from_index(torch.tensor(idx, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        ours = ld3_ext.Euler(backend="reference").sample(model, x_T, t)
        x = x_T.clone()
        for tt in ddim.timesteps:
            x = ddim.step(unet(x, tt).sample, tt, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=2e-5)


def test_all_solvers_run_on_a_unet():
    """Every solver on a UNet: the fused path equals the reference path (float32 rounding).  (The solvers do not
    agree with each other at 4 steps: a random UNet's eps turned into x0 near alpha = 0 is far from smooth; DDIM is
    checked against diffusers' own scheduler above.)"""
    model, sched = from_diffusers(tiny_unet(), diffusers.DDPMScheduler().config)
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = ld3_ext.discretizations.logsnr_uniform(sched, 4)
    outs = {}
    with torch.no_grad():
        for make in (lambda b: ld3_ext.DPMSolverPP(3, backend=b), lambda b: ld3_ext.UniPC(3, backend=b),
                     lambda b: ld3_ext.IPNDM(3, backend=b), lambda b: ld3_ext.Euler(backend=b),
                     lambda b: ld3_ext.Heun(backend=b)):
            ref, fused = make("reference"), make("fused")
            out = ref.sample(model, x_T, t)
            assert out.shape == x_T.shape and torch.isfinite(out).all()
            if ld3_ext.native_available():
                torch.testing.assert_close(fused.sample(model, x_T, t), out, rtol=1e-5, atol=1e-5)
            outs[type(ref).__name__] = out
    assert len({o.sum().item() for o in outs.values()}) == len(outs)  # five solvers, five different samples


def test_cfg_one_batched_call_and_broadcast():
    """Classifier-free guidance: [uncond; cond] in ONE network call, combined as u + s (c - u)."""
    unet = tiny_cond_unet()
    calls = []
    unet.register_forward_hook(lambda m, a, kw_out=None: calls.append(a[0].shape[0]))
    model, sched = from_diffusers(unet, diffusers.DDPMScheduler().config, guidance_scale=4.0)
    assert model.cond_key == "encoder_hidden_states"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=g)
    cond, unc = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    t = torch.tensor(0.5, dtype=torch.float64)
    with torch.no_grad():
        x0, eps = model.predict(x, t, encoder_hidden_states=cond, uncond=unc)
        assert calls == [6]
        ti = torch.full((3,), 0.5 * 1000 - 1.0)
        e_c = unet(x, ti, encoder_hidden_states=cond).sample
        e_u = unet(x, ti, encoder_hidden_states=unc).sample
    torch.testing.assert_close(eps, e_u + 4.0 * (e_c - e_u), rtol=1e-5, atol=1e-5)
    # one stored embedding (batch 1) serves any batch
    model2, _ = from_diffusers(unet, diffusers.DDPMScheduler().config, guidance_scale=4.0,
                               model_kwargs={"encoder_hidden_states": cond[:1], "uncond": unc[:1]})
    with torch.no_grad():
        _, eps2 = model2.predict(x, t)
        _, eps_ref = model.predict(x, t, encoder_hidden_states=cond[:1].expand(3, -1, -1),
                                   uncond=unc[:1].expand(3, -1, -1))
    torch.testing.assert_close(eps2, eps_ref)


def test_sdxl_added_cond_kwargs_under_guidance():
    """SDXL-style added conditioning: both halves batched in one call, the negative pooled embedding
    from uncond_kwargs, batch-1 values broadcast; equals two separate calls combined as u + s (c - u)."""
    unet = tiny_sdxl_unet()
    calls = []
    unet.register_forward_hook(lambda m, a, kw_out=None: calls.append(a[0].shape[0]))
    g = torch.Generator().manual_seed(5)
    b = 3
    x = torch.randn(b, 4, 8, 8, generator=g)
    cond, unc = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    pooled, neg_pooled = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    time_ids = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]])
    model, _ = from_diffusers(unet, diffusers.DDPMScheduler().config, guidance_scale=3.0, model_kwargs={
        "encoder_hidden_states": cond, "uncond": unc,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        "uncond_kwargs": {"added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": time_ids}}})
    t = torch.tensor(0.4, dtype=torch.float64)
    with torch.no_grad():
        _, eps = model.predict(x, t)
        assert calls == [2 * b]
        ti = torch.full((b,), 0.4 * 1000 - 1.0)
        ex = lambda v: v.expand(b, *v.shape[1:])  # noqa: E731
        e_c = unet(x, ti, encoder_hidden_states=ex(cond),
                   added_cond_kwargs={"text_embeds": ex(pooled), "time_ids": ex(time_ids)}).sample
        e_u = unet(x, ti, encoder_hidden_states=ex(unc),
                   added_cond_kwargs={"text_embeds": ex(neg_pooled), "time_ids": ex(time_ids)}).sample
    torch.testing.assert_close(eps, e_u + 3.0 * (e_c - e_u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(e_u, e_c, atol=1e-4)  # the halves really differ
    # without uncond_kwargs both halves share the conditional added embeddings
    kw = dict(model.model_kwargs)
    del kw["uncond_kwargs"]
    model2, _ = from_diffusers(unet, diffusers.DDPMScheduler().config, guidance_scale=3.0, model_kwargs=kw)
    with torch.no_grad():
        _, eps2 = model2.predict(x, t)
        e_u2 = unet(x, ti, encoder_hidden_states=ex(unc),
                    added_cond_kwargs={"text_embeds": ex(pooled), "time_ids": ex(time_ids)}).sample
    torch.testing.assert_close(eps2, e_u2 + 3.0 * (e_c - e_u2), rtol=1e-5, atol=1e-5)


def test_uncond_kwargs_errors_name_the_kwarg():
    unet = tiny_sdxl_unet()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor(0.4, dtype=torch.float64)
    base = {"encoder_hidden_states": torch.randn(2, 5, 8), "uncond": torch.randn(2, 5, 8),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 6), "time_ids": torch.ones(2, 6)}}
    model, _ = from_diffusers(unet, diffusers.DDPMScheduler().config, guidance_scale=2.0)
    with pytest.raises(ValueError, match="not among the model kwargs"):
        model.predict(x, t, uncond_kwargs={"cross_attention_kwargs": {}}, **base)
    with pytest.raises(ValueError, match="added_cond_kwargs.text_embeds"):
        model.predict(x, t, uncond_kwargs={"added_cond_kwargs": {"text_embeds": torch.randn(2, 7),
                                                                 "time_ids": torch.ones(2, 6)}}, **base)
    with pytest.raises(ValueError, match="keys"):
        model.predict(x, t, uncond_kwargs={"added_cond_kwargs": {"text_embeds": torch.randn(2, 6)}}, **base)
    with pytest.raises(TypeError, match="uncond_kwargs must be a dict"):
        model.predict(x, t, uncond_kwargs=[1], **base)
    plain, _ = from_diffusers(unet, diffusers.DDPMScheduler().config)
    with pytest.raises(ValueError, match="set guidance_scale"):
        plain.predict(x, t, uncond_kwargs={}, encoder_hidden_states=base["encoder_hidden_states"])


def test_class_conditional_unet2d_guidance():
    unet = tiny_unet(num_class_embeds=10)
    model, _ = from_diffusers(unet, diffusers.DDPMScheduler().config, guidance_scale=2.0)
    assert model.cond_key == "class_labels"
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    labels, null = torch.tensor([1, 2]), torch.tensor([0, 0])
    t = torch.tensor(0.3, dtype=torch.float64)
    with torch.no_grad():
        eps = model.predict(x, t, class_labels=labels, uncond=null)[1]
        index = torch.full((2,), float(model.schedule.model_index(t)))  # the VP training index the UNet reads
        c = unet(x, index, class_labels=labels).sample
        u = unet(x, index, class_labels=null).sample
    torch.testing.assert_close(eps, u + 2.0 * (c - u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(c, u, atol=1e-4)  # the labels matter, so the check could fail


def test_an_sd3_transformer_gets_its_time_by_keyword_and_solves_as_a_flow_euler_loop():
    """SD3 / PixArt / Flux transformers take encoder_hidden_states second: a positional time landed there
    (a TypeError with the conditioning passed as a kwarg).  Oracle: the flow Euler loop written with the network
    itself, x <- x + (t' - t) v(x, 1000 t), which ld3_ext's Euler (DDIM in x0 form) equals on FlowMatching."""
    net = tiny_sd3_transformer()
    g = torch.Generator().manual_seed(4)
    ehs, pooled = torch.randn(2, 3, 16, generator=g), torch.randn(2, 16, generator=g)
    model, sched = from_diffusers(net, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config,
                                  model_kwargs={"encoder_hidden_states": ehs, "pooled_projections": pooled})
    assert isinstance(sched, ld3_ext.FlowMatching)
    t = ld3_ext.discretizations.time_uniform(sched, 4)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        got = ld3_ext.Euler(backend="reference").sample(model, x_T, t)
        x = x_T.clone()
        for a, b in zip(t[:-1].tolist(), t[1:].tolist()):
            v = net(x, encoder_hidden_states=ehs, pooled_projections=pooled,
                    timestep=torch.full((2,), 1000 * a), return_dict=False)[0]
            x = x + (b - a) * v
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


def test_dit_class_labels_guidance_with_an_explicit_cond_key():
    """DiT's config has no cross-attention, so its condition was not recognised and guidance_scale was refused
    even with cond_key='class_labels'.  CFG: u + s (c - u) of the network's own outputs."""
    net = tiny_dit()
    cfg = diffusers.DDPMScheduler().config
    with pytest.raises(DiffusersConfigError, match="cond_key"):
        from_diffusers(net, cfg, guidance_scale=4.0)
    model, _ = from_diffusers(net, cfg, guidance_scale=4.0, cond_key="class_labels")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    labels, null = torch.tensor([1, 7]), torch.tensor([0, 0])
    with torch.no_grad():
        eps = model.predict(x, torch.tensor(0.5, dtype=torch.float64), class_labels=labels, uncond=null)[1]
        time = torch.full((2,), 499.0)
        c = net(x, timestep=time, class_labels=labels, return_dict=False)[0]
        u = net(x, timestep=time, class_labels=null, return_dict=False)[0]
    torch.testing.assert_close(eps, u + 4.0 * (c - u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(c, u, atol=1e-3)  # the labels matter, so the check could fail


def test_learned_variance_output_is_split():
    unet = tiny_unet(out_channels=6)
    model, _ = from_diffusers(unet, diffusers.DDPMScheduler(variance_type="learned_range").config)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        x0, eps = model.predict(x, torch.tensor(0.5, dtype=torch.float64))
        full = unet(x, torch.tensor([499.0])).sample
    torch.testing.assert_close(eps, full[:, :3])


# --- errors -----------------------------------------------------------------------------------------------------
def test_guidance_on_unconditional_unet_is_an_error():
    with pytest.raises(DiffusersConfigError, match="unconditional"):
        from_diffusers(tiny_unet(), diffusers.DDPMScheduler().config, guidance_scale=7.5)


@pytest.mark.parametrize("cfg,field", [
    ({"beta_schedule": "nonsense"}, "beta_schedule"),
    ({"prediction_type": "score"}, "prediction_type"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"timestep_type": "continuous"}, "timestep_type"),
    ({"_class_name": "EDMEulerScheduler"}, "_class_name"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "prediction_type": None}, "use_dynamic_shifting"),
    ({"prediction_type": "flow_prediction"}, "flow_prediction"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
])
def test_unmappable_config_names_the_field(cfg, field):
    base = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "prediction_type": "epsilon"}
    with pytest.raises(DiffusersConfigError, match=field):
        schedule_from_diffusers_config({**base, **cfg})


# a live ``scheduler.config`` (what the README passes) has no _class_name: these families are known by their fields
UNSUPPORTED_LIVE = [
    ("EDMEulerScheduler", "sigma_data"),
    ("EDMDPMSolverMultistepScheduler", "sigma_data"),
    ("CosineDPMSolverMultistepScheduler", "sigma_data"),
    ("CMStochasticIterativeScheduler", "sigma_data"),
    ("ScoreSdeVeScheduler", "snr"),
    ("KarrasVeScheduler", "s_churn"),
    ("LCMScheduler", "original_inference_steps"),
    ("TCDScheduler", "original_inference_steps"),
    ("IPNDMScheduler", "neither a beta schedule"),  # its own sin/cos schedule, no betas in the config
]


@pytest.mark.parametrize("cls,field", UNSUPPORTED_LIVE, ids=[c for c, _ in UNSUPPORTED_LIVE])
def test_unsupported_live_scheduler_config_is_refused(cls, field):
    sch = getattr(diffusers, cls)()
    assert "_class_name" not in sch.config  # the case the _class_name check cannot see
    field = field if " " in field else f"field {field}="  # the family's own field, not just a listing of fields
    with pytest.raises(DiffusersConfigError, match=field):
        schedule_from_diffusers_config(sch.config)
    with pytest.raises(DiffusersConfigError, match=field):
        from_diffusers(tiny_unet(), sch.config)
    with pytest.raises(DiffusersConfigError, match=field):
        schedule_from_diffusers_config(dict(sch.config))  # a plain dict as well


SUPPORTED_LIVE = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
                  "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                  "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
                  "UniPCMultistepScheduler", "SASolverScheduler"]


@pytest.mark.parametrize("cls", SUPPORTED_LIVE)
def test_supported_live_scheduler_configs_keep_their_betas(cls):
    """The field signatures must not catch ordinary beta-schedule schedulers (sigma_min/sigma_max=None,
    variance_type, use_dynamic_shifting=False, ... are sampling-only fields there)."""
    sch = getattr(diffusers, cls)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched, pred = schedule_from_diffusers_config(sch.config)
    assert isinstance(sched, ld3_ext.VPDiscrete) and pred == "eps"
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(sched.alphas_cumprod, ref.double(), rtol=1e-12, atol=0)


def test_two_channel_output_without_learned_variance_is_an_error():
    """A 2C-channel network with a fixed-variance config: a clear error naming variance_type, not a broadcast."""
    model, _ = from_diffusers(tiny_unet(out_channels=6), diffusers.DDPMScheduler().config)
    with pytest.raises(DiffusersConfigError, match="variance_type"), torch.no_grad():
        model.predict(torch.randn(1, 3, 8, 8), torch.tensor(0.5, dtype=torch.float64))


def test_flow_config_maps_to_flow_matching():
    cfg = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    sched, pred = schedule_from_diffusers_config(cfg)
    assert isinstance(sched, ld3_ext.FlowMatching) and sched.shift == 3.0 and pred == "velocity"
    model, _ = from_diffusers(tiny_unet(), cfg)
    assert model.network_time(torch.tensor(0.25, dtype=torch.float64)).item() == pytest.approx(250.0)


def test_velocity_needs_flow_schedule():
    """The wrappers reject a flow model on a VP schedule (and VP v-prediction on a flow schedule)."""
    vp = ld3_ext.VPDiscrete.linear()
    with pytest.raises(ValueError, match="FlowMatching"):
        ld3_ext.wrap_model(lambda x, t: x, vp, prediction="velocity")
    with pytest.raises(ValueError, match="velocity"):
        ld3_ext.wrap_model(lambda x, t: x, ld3_ext.FlowMatching(), prediction="v")


# --- local folders ----------------------------------------------------------------------------------------------
def test_load_diffusers_model_from_local_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet = tiny_unet()
    sched = diffusers.DDPMScheduler(prediction_type="v_prediction")
    # pipeline layout: unet/ + scheduler/ (+ model_index.json)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    # model layout: config.json + scheduler_config.json side by side (as google/ddpm-* repos)
    unet.save_pretrained(tmp_path / "model")
    sched.save_config(tmp_path / "model")
    ref, _ = from_diffusers(unet, sched.config)
    x = torch.randn(1, 3, 8, 8)
    t = torch.tensor(0.4, dtype=torch.float64)
    for sub in ("pipe", "model"):
        model, schedule = load_diffusers_model(str(tmp_path / sub))
        assert model.prediction == "v" and isinstance(schedule, ld3_ext.VPDiscrete)
        with torch.no_grad():
            torch.testing.assert_close(model.predict(x, t)[0], ref.predict(x, t)[0])
    with pytest.raises(DiffusersConfigError, match="guidance_scale"):
        load_diffusers_model(str(tmp_path / "pipe"), guidance_scale=3.0)
    with pytest.raises(FileNotFoundError):
        load_diffusers_model(str(tmp_path / "missing"))
    os.remove(tmp_path / "model" / "scheduler_config.json")
    with pytest.raises(FileNotFoundError, match="scheduler_config"):
        load_diffusers_model(str(tmp_path / "model"))
    cfg_path = tmp_path / "pipe" / "unet" / "config.json"
    bad = json.loads(cfg_path.read_text())
    bad["_class_name"] = "NotAModel"
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(DiffusersConfigError, match="_class_name"):
        load_diffusers_model(str(tmp_path / "pipe"))


def test_cli_registry_resolves_diffusers_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    from ld3_ext.models import load_model
    model, schedule = load_model(f"diffusers:{tmp_path}")
    assert isinstance(schedule, ld3_ext.VPDiscrete) and model.sample_shape == (3, 8, 8)


# --- the LD3 trainer on diffusers models -------------------------------------------------------------------------
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cfg"])
def test_ld3_trainer_fits_a_diffusers_unet(conditional):
    """A minimal LD3Trainer.fit on a tiny UNet (the trainer sees a plain DiffusionModel): the learned grid
    is valid and reproduces through solver.sample; with CFG the conditions/uncond go through cond_key."""
    from ld3_ext import training
    if conditional:
        unet = tiny_cond_unet()
        model, sched = from_diffusers(unet, diffusers.DDPMScheduler(**dict(beta_schedule="scaled_linear",
                                      beta_start=0.00085, beta_end=0.012)).config, guidance_scale=2.0)
        g = torch.Generator().manual_seed(0)
        extra = dict(conditions=torch.randn(4, 5, 8, generator=g), uncond=torch.randn(1, 5, 8, generator=g))
    else:
        model, sched = from_diffusers(tiny_unet(), diffusers.DDPMScheduler().config)
        extra = {}
    trainer = training.LD3Trainer(model, solver=ld3_ext.DPMSolverPP(2), nfe=3, teacher_nfe=6, n_train=2, n_valid=2,
                                  batch_size=2, valid_batch_size=2, rounds_v1=1, rounds_v2=1, progress=False,
                                  model_name="tiny-unet", time_mode="time", **extra)
    learned = trainer.fit()
    t, tm = learned.timesteps, learned.model_timesteps
    assert t.numel() == 4 and torch.all(t[1:] < t[:-1]) and tm.shape == t.shape
    assert t[0] == pytest.approx(sched.t_max) and t[-1] == pytest.approx(sched.t_min)
    m = learned.metrics
    # training moved the schedule: a later validation beat the starting grid (best starts at the init with
    # best_iteration 0, so without parameter steps neither of these can happen) and the grid kept is not the start
    assert m["best_iteration"] > 0 and m["valid_loss_best"] < m["valid_loss_init"], m
    start = trainer._init_grid.to(t.dtype)
    assert start.shape == t.shape and float((t - start)[1:-1].abs().max()) > 1e-3, (t.tolist(), start.tolist())
    x = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    kw = {"encoder_hidden_states": extra["conditions"][:1], "uncond": extra["uncond"]} if conditional else {}
    batches = []
    hook = model.net.register_forward_pre_hook(
        lambda mod, args, kwargs: batches.append((args[0].shape[0], "encoder_hidden_states" in kwargs)),
        with_kwargs=True)
    try:
        with torch.no_grad():
            out = learned.sample(model, x, **kw)
            want = ld3_ext.DPMSolverPP(2).sample(model, x, t, model_timesteps=tm, **kw)
    finally:
        hook.remove()
    assert torch.equal(out, want)  # the file's grid and model times, through the solver it names
    # with CFG each evaluation is one call on [uncond; cond] (batch 2B) with the condition passed by keyword
    assert batches and all(b == ((2, True) if conditional else (1, False)) for b in batches), batches


def test_integrations_submodules_are_reachable_after_import_ld3_ext():
    """The README writes ld3_ext.integrations.diffusers.from_diffusers(...) after `import ld3_ext`."""
    import subprocess
    import sys
    code = ("import ld3_ext; f = ld3_ext.integrations.diffusers.from_diffusers; "
            "s = ld3_ext.integrations.diffusers_scheduler.LD3Scheduler; print(f.__name__, s.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["from_diffusers", "LD3Scheduler"]


def test_a_scheduler_config_file_that_is_not_json_is_named(tmp_path):
    (tmp_path / "scheduler_config.json").write_text("{\"beta_start\": 0.0001,")  # cut short
    with pytest.raises(DiffusersConfigError, match=r"scheduler_config: .*scheduler_config\.json is not valid JSON"):
        from_diffusers(tiny_unet(), str(tmp_path))
