"""Edge cases of the diffusers adapter (ld3_ext.integrations.diffusers): schedules diffusers builds differently
from DDPMScheduler (CogVideoX's SNR shift, Heun's "exp" betas), distilled flow samplers, SD3/Flux-style
conditioning and malformed configs.  Oracles: the user's own diffusers scheduler (alphas_cumprod, DDIM steps)
and the raw network's outputs."""
from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import ld3_ext  # noqa: E402
from ld3_ext.integrations.diffusers import (DiffusersConfigError, from_diffusers,  # noqa: E402
                                           schedule_from_diffusers_config)

pytestmark = pytest.mark.usefixtures("single_thread")

from _tiny_unets import tiny_sd3_transformer, tiny_unet  # noqa: E402


def _alpha2_at_every_index(sched):
    idx = torch.arange(sched.num_train_timesteps, dtype=torch.float64)
    return sched.alpha(sched.t_from_index(idx)) ** 2


# --- 1. CogVideoX SNR shift ---------------------------------------------------------------------------------------
COGVIDEOX = ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]


@pytest.mark.parametrize("cls", COGVIDEOX)
@pytest.mark.parametrize("kw", [{}, dict(snr_shift_scale=1.5, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
                                dict(beta_schedule="squaredcos_cap_v2")])
@pytest.mark.parametrize("form", ["scheduler", "live_config", "dict"])
def test_cogvideox_snr_shift_is_applied(cls, kw, form):
    """diffusers divides alphas_cumprod by (s + (1 - s) alphas_cumprod); the plain betas were off by up to 0.27.
    Exact: CogVideoX keeps scaled_linear betas in float64 (its other schedules in float32), and so do we."""
    ref = getattr(diffusers, cls)(**kw)
    arg = {"scheduler": ref, "live_config": ref.config, "dict": dict(ref.config)}[form]
    sched, pred = schedule_from_diffusers_config(arg)
    assert isinstance(sched, ld3_ext.VPDiscrete) and pred == "eps"
    want = ref.alphas_cumprod.double()
    torch.testing.assert_close(_alpha2_at_every_index(sched), want, rtol=1e-12, atol=0)
    plain = diffusers.DDPMScheduler(**{k: v for k, v in kw.items() if k != "snr_shift_scale"},
                                    **({} if kw else dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012))).alphas_cumprod.double()
    assert (plain - want).abs().max() > 0.05  # the shift matters, so the check could fail


def test_a_saved_cogvideox_config_without_snr_shift_scale_gets_the_class_default():
    """diffusers' from_config fills a missing snr_shift_scale with the class default (3.0), not 1."""
    cfg = {**dict(diffusers.CogVideoXDDIMScheduler().config), "_class_name": "CogVideoXDDIMScheduler"}
    del cfg["snr_shift_scale"]
    ref = diffusers.CogVideoXDDIMScheduler.from_config(cfg)
    assert ref.config.snr_shift_scale == 3.0
    sched, _ = schedule_from_diffusers_config(cfg)
    torch.testing.assert_close(_alpha2_at_every_index(sched), ref.alphas_cumprod.double(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [0.0, -1.0, None, "3", True, float("nan"), float("inf")])
def test_a_bad_snr_shift_scale_names_the_field(bad):
    cfg = {**dict(diffusers.CogVideoXDDIMScheduler().config), "snr_shift_scale": bad}
    with pytest.raises(DiffusersConfigError, match="snr_shift_scale"):
        schedule_from_diffusers_config(cfg)


def test_euler_equals_cogvideox_ddim():
    """The whole chain (shifted alphas, index time, v-prediction): our Euler (= DDIM) reproduces diffusers'
    CogVideoXDDIMScheduler, whose step is DDIM with eta=0."""
    unet = tiny_unet()
    ddim = diffusers.CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                            set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(5)
    idx = ddim.timesteps.tolist() + [0]
    model, sched = from_diffusers(unet, ddim.config)
    t = sched.t_from_index(torch.tensor(idx, dtype=torch.float64))
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = ld3_ext.Euler(backend="reference").sample(model, x_T, t)
        x = x_T.clone()
        for tt in ddim.timesteps:
            x = ddim.step(unet(x, tt).sample, tt, x).prev_sample
        plain, psched = from_diffusers(unet, {**dict(ddim.config), "snr_shift_scale": 1.0})
        unshifted = ld3_ext.Euler(backend="reference").sample(
            plain, x_T, psched.t_from_index(torch.tensor(idx, dtype=torch.float64)))
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=2e-5)
    assert (unshifted - x).abs().max() > 1e-2  # the unshifted schedule really gives another result


# --- 1b. distilled flow samplers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,field", [("FlowMatchLCMScheduler", "upscale_mode"),
                                       ("HeliosDMDScheduler", "stage_range")])
def test_distilled_flow_schedulers_are_refused(cls, field):
    sch = getattr(diffusers, cls)()
    with pytest.raises(DiffusersConfigError, match=f"_class_name='{cls}'"):
        schedule_from_diffusers_config(sch)
    with pytest.raises(DiffusersConfigError, match=f"_class_name='{cls}'"):
        schedule_from_diffusers_config({**dict(sch.config), "_class_name": cls})
    assert "_class_name" not in sch.config
    for live in (sch.config, dict(sch.config)):  # no _class_name: known by the family's own field
        with pytest.raises(DiffusersConfigError, match=f"field {field}="):
            schedule_from_diffusers_config(live)
    with pytest.raises(DiffusersConfigError, match=f"field {field}="):
        from_diffusers(tiny_sd3_transformer(), sch.config)


def test_the_helios_multistage_signature_does_not_catch_ordinary_flow_schedulers():
    for cls in ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
        sched, pred = schedule_from_diffusers_config(getattr(diffusers, cls)(shift=2.0).config)
        assert isinstance(sched, ld3_ext.FlowMatching) and sched.shift == 2.0 and pred == "velocity"


# --- 2. SD3/Flux-style joint-attention transformers --------------------------------------------------------------
def test_sd3_transformer_guidance_on_encoder_hidden_states():
    """SD3's config has joint_attention_dim, not cross_attention_dim: it was called unconditional.  Guided output
    = u + s (c - u) of the raw transformer's velocities, the negative pooled embedding from uncond_kwargs."""
    net = tiny_sd3_transformer()
    calls = []
    net.register_forward_hook(lambda m, a, kw_out=None: calls.append(a[0].shape[0]))
    model, sched = from_diffusers(net, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), guidance_scale=5.0)
    assert model.cond_key == "encoder_hidden_states" and isinstance(sched, ld3_ext.FlowMatching)
    g = torch.Generator().manual_seed(7)
    b = 2
    x = torch.randn(b, 4, 8, 8, generator=g)
    ehs, neg = torch.randn(b, 3, 16, generator=g), torch.randn(b, 3, 16, generator=g)
    pooled, neg_pooled = torch.randn(b, 16, generator=g), torch.randn(b, 16, generator=g)
    t = torch.tensor(0.6, dtype=torch.float64)
    with torch.no_grad():
        x0, eps = model.predict(x, t, encoder_hidden_states=ehs, uncond=neg, pooled_projections=pooled,
                                uncond_kwargs={"pooled_projections": neg_pooled})
        assert calls == [2 * b]  # one batched call
        time = torch.full((b,), 600.0)
        c = net(x, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=time, return_dict=False)[0]
        u = net(x, encoder_hidden_states=neg, pooled_projections=neg_pooled, timestep=time, return_dict=False)[0]
        # one stored (batch-1) prompt, negative prompt and pooled embeddings serve a batch of 2
        model1, _ = from_diffusers(net, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), guidance_scale=5.0,
                                   model_kwargs={"encoder_hidden_states": ehs[:1], "uncond": neg[:1],
                                                 "pooled_projections": pooled[:1],
                                                 "uncond_kwargs": {"pooled_projections": neg_pooled[:1]}})
        x0_1, eps_1 = model1.predict(x, t)
        c1 = net(x, encoder_hidden_states=ehs[:1].expand(b, -1, -1), pooled_projections=pooled[:1].expand(b, -1),
                 timestep=time, return_dict=False)[0]
        u1 = net(x, encoder_hidden_states=neg[:1].expand(b, -1, -1),
                 pooled_projections=neg_pooled[:1].expand(b, -1), timestep=time, return_dict=False)[0]
    assert not torch.allclose(c, u, atol=1e-3)  # the condition matters, so the check could fail
    torch.testing.assert_close(eps - x0, u + 5.0 * (c - u), rtol=1e-4, atol=1e-4)  # flow: v = eps - x0
    torch.testing.assert_close(eps_1 - x0_1, u1 + 5.0 * (c1 - u1), rtol=1e-4, atol=1e-4)


def test_a_flux_style_transformer_is_conditional_on_encoder_hidden_states():
    from ld3_ext.integrations.diffusers import _conditioning
    net = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    assert "cross_attention_dim" not in net.config
    assert _conditioning(net) == (True, "encoder_hidden_states")
    assert _conditioning(tiny_sd3_transformer()) == (True, "encoder_hidden_states")


# --- 3. malformed configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["[]", "null", "3", '"scheduler"'])
def test_a_json_file_that_is_not_an_object_is_named(tmp_path, text):
    p = tmp_path / "scheduler_config.json"
    p.write_text(text)
    with pytest.raises(DiffusersConfigError, match="scheduler_config.json.*JSON object"):
        schedule_from_diffusers_config(str(p))
    with pytest.raises(DiffusersConfigError, match="scheduler_config.json"):
        schedule_from_diffusers_config(tmp_path)  # the folder form too
    with pytest.raises(DiffusersConfigError, match="scheduler_config.json"):
        from_diffusers(tiny_unet(), str(p))


@pytest.mark.parametrize("bad", [None, 1000.0, "1000", True, 0])
@pytest.mark.parametrize("base", ["flow", "vp"])
def test_a_bad_num_train_timesteps_names_the_field(bad, base):
    """diffusers itself fails on a null num_train_timesteps (no default); int() of it was a raw TypeError, and
    1000.0 / "1000" were silently read as 1000."""
    sch = diffusers.FlowMatchEulerDiscreteScheduler() if base == "flow" else diffusers.DDPMScheduler()
    cfg = {**dict(sch.config), "num_train_timesteps": bad}
    with pytest.raises(DiffusersConfigError, match="num_train_timesteps"):
        from_diffusers(tiny_unet(), cfg)
    with pytest.raises(DiffusersConfigError, match="num_train_timesteps"):
        schedule_from_diffusers_config(cfg)


def test_a_flow_config_with_its_own_num_train_timesteps_is_read():
    model, _ = from_diffusers(tiny_unet(), {**dict(diffusers.FlowMatchEulerDiscreteScheduler().config),
                                            "num_train_timesteps": 500})
    assert model.num_train_timesteps == 500
    assert model.network_time(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(250.0)


# --- 4. beta schedules DDPMScheduler lacks -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1000, 500])
@pytest.mark.parametrize("form", ["scheduler", "live_config"])
def test_heun_exp_beta_schedule_matches_its_alphas_cumprod(n, form):
    ref = diffusers.HeunDiscreteScheduler(beta_schedule="exp", num_train_timesteps=n)
    sched, pred = schedule_from_diffusers_config(ref if form == "scheduler" else ref.config)
    assert isinstance(sched, ld3_ext.VPDiscrete) and pred == "eps" and sched.num_train_timesteps == n
    torch.testing.assert_close(_alpha2_at_every_index(sched), ref.alphas_cumprod.double(), rtol=1e-12, atol=0)
    # exp(-12 t): not the linear default read under another name
    assert sched.alphas_cumprod[-1].item() == pytest.approx(math.exp(-12.0), rel=0.05)


def test_an_unknown_beta_schedule_lists_the_supported_ones():
    cfg = {"beta_schedule": "cosine", "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    with pytest.raises(DiffusersConfigError, match="beta_schedule='cosine'") as ei:
        schedule_from_diffusers_config(cfg)
    msg = str(ei.value)
    for name in ("linear", "scaled_linear", "squaredcos_cap_v2", "exp"):
        assert repr(name) in msg
    assert "DDPMScheduler" not in msg  # not the class we happen to build betas with


def test_from_diffusers_refuses_what_it_would_drop_or_misread():
    """shift= on a VP config was dropped (the unshifted schedule came back); freeze='no' froze the network; a
    guidance_scale string was parsed though LD3Scheduler refuses one; a config field that is no number failed in
    float() or torch naming no field (an API review)."""
    unet = tiny_unet()
    vp = diffusers.DDPMScheduler(beta_schedule="scaled_linear").config
    with pytest.raises(DiffusersConfigError, match=r"shift=3.0 applies to flow-matching configs only"):
        from_diffusers(unet, vp, shift=3.0)
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="freeze must be True or False"):
            from_diffusers(unet, vp, freeze=bad)
    cond = tiny_unet(num_class_embeds=10)
    with pytest.raises(TypeError, match="guidance_scale must be a number or None"):
        from_diffusers(cond, vp, guidance_scale="7.5")
    model, _ = from_diffusers(unet, vp, freeze=False)
    assert all(p.requires_grad for p in unet.parameters())
    flow = diffusers.FlowMatchEulerDiscreteScheduler().config
    assert from_diffusers(unet, flow, shift=3.0)[1].shift == 3.0
    for cfg, match in (({"beta_schedule": "linear", "beta_start": "x"}, r"beta_start='x' in the scheduler config is "
                                                                         r"not a number"),
                       ({"beta_schedule": "linear", "beta_end": [0.02]}, r"beta_end=\[0.02\] .* is not a number"),
                       ({"beta_schedule": "linear", "trained_betas": "abc"}, r"trained_betas='abc' cannot be mapped")):
        with pytest.raises(DiffusersConfigError, match=match):
            schedule_from_diffusers_config(cfg)
