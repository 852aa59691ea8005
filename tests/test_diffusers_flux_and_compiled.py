"""Flux-family pipelines and torch.compile'd networks with the diffusers integration.

* Flux pipelines call ``set_timesteps(N, device, sigmas=None, mu=mu)`` (mu: diffusers' resolution-dependent
  shift of its own grid), and the Flux img2img/inpainting pipelines always pass that grid's unshifted sigmas
  ``linspace(1, 1/N, N)``.  LD3Scheduler refused both, so no Flux pipeline ran with it.  Its grid replaces
  diffusers' one: mu and those default sigmas are accepted and leave the grid as it is; other sigmas are a
  custom grid, refused with the way to build one.
* ``from_diffusers`` read the network's forward signature and class name, which a ``torch.compile`` wrapper
  hides (``OptimizedModule.forward(*args, **kwargs)``): SD3's time went positionally into
  encoder_hidden_states, and a class-conditional UNet2DModel was called unconditional.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import ld3_ext  # noqa: E402
from ld3_ext.integrations.diffusers import from_diffusers  # noqa: E402
from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler  # noqa: E402
from ld3_ext.schedule_file import LearnedSchedule  # noqa: E402

from _tiny_unets import tiny_sd3_transformer, tiny_unet  # noqa: E402


def _flux_schedule_file(tmp_path, n=4):
    fm = ld3_ext.FlowMatching(shift=2.5)
    t = ld3_ext.discretizations.time_uniform(fm, n)
    path = tmp_path / "flux.json"
    LearnedSchedule(t, solver_config={"name": "dpmpp", "order": 2}, nfe=n, schedule_config=fm.config()).save(path)
    return path, t


def _flux_config():
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15).config


def test_mu_and_the_default_sigmas_leave_a_stored_grid_alone(tmp_path):
    path, _ = _flux_schedule_file(tmp_path)
    sch = LD3Scheduler.from_schedule_file(path, scheduler_config=_flux_config())
    sch.set_timesteps(4)
    plain = sch.timesteps.clone()
    sch.set_timesteps(4, mu=0.9)
    assert torch.equal(sch.timesteps, plain)
    sch.set_timesteps(4, sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.9)
    assert torch.equal(sch.timesteps, plain)


def test_mu_leaves_a_discretized_grid_alone():
    sch = LD3Scheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config,
                                   discretization="time_uniform")
    sch.set_timesteps(5)
    plain = sch.timesteps.clone()
    sch.set_timesteps(5, mu=1.1)
    assert torch.equal(sch.timesteps, plain)


def test_default_sigmas_alone_carry_the_step_count(tmp_path):
    """diffusers' retrieve_timesteps passes the sigmas without num_inference_steps: their length is the N asked,
    checked against a stored grid (28 steps on a 4-step grid ran 4 silently) and used by a discretization."""
    path, _ = _flux_schedule_file(tmp_path)
    sch = LD3Scheduler.from_schedule_file(path, scheduler_config=_flux_config())
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.7)
    assert sch.num_inference_steps == 4
    with pytest.raises(ValueError, match="holds a grid with N=4 intervals.*num_inference_steps=28"):
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=0.7)
    base = LD3Scheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    base.set_timesteps(sigmas=torch.linspace(1.0, 1 / 6, 6, requires_grad=True), device="cpu", mu=0.7)
    assert base.num_inference_steps == 6


def test_sigmas_with_a_heun_schedule_are_refused():
    """Flux img2img counts len(timesteps) steps (2 per Heun step): strength 0.75 of 4 ran 2 intervals, not 3."""
    sch = LD3Scheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config,
                                   solver_config={"name": "heun"})
    with pytest.raises(TypeError, match="sigmas with a Heun schedule"):
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.7)
    sch.set_timesteps(4, mu=0.7)  # FluxPipeline (no sigmas) runs Heun
    assert sch.num_inference_steps == 4


@pytest.mark.parametrize("sigmas", [[1.0, 0.7, 0.4, 0.1], np.linspace(1.0, 1 / 3, 3), "abc",
                                    np.linspace(1.0, 1 / 4, 4).reshape(1, 4),  # the default's values, not its shape
                                    torch.empty(4, device="meta")])  # no values to compare
def test_other_sigmas_are_a_custom_grid_and_refused(tmp_path, sigmas):
    path, _ = _flux_schedule_file(tmp_path)
    sch = LD3Scheduler.from_schedule_file(path, scheduler_config=_flux_config())
    with pytest.raises(TypeError, match="custom sigmas are not supported.*from_timesteps"):
        sch.set_timesteps(4, sigmas=sigmas)


@pytest.mark.parametrize("mu", ["0.5", float("nan"), True, torch.tensor([0.5, 0.6])])
def test_a_bad_mu_is_named(mu):
    sch = LD3Scheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    with pytest.raises(TypeError, match="mu must be a finite number"):
        sch.set_timesteps(4, mu=mu)


def test_unknown_arguments_are_named_without_the_custom_grid_advice():
    sch = LD3Scheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    with pytest.raises(TypeError, match=r"unsupported arguments \['foo'\]$"):
        sch.set_timesteps(4, foo=1)
    with pytest.raises(TypeError, match=r"unsupported arguments \['timesteps'\]; .*from_timesteps"):
        sch.set_timesteps(4, timesteps=[999, 500])


def _tiny_flux(in_channels):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()


def _run_flux(pipe_cls, scheduler, in_channels, **kw):
    pipe = pipe_cls(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                    tokenizer_2=None, transformer=_tiny_flux(in_channels))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(float(k["timestep"].reshape(-1)[0])),
                                               with_kwargs=True)
    out = pipe(prompt_embeds=torch.randn(1, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 16, generator=g),
               height=32, width=32, num_inference_steps=4, output_type="latent",
               generator=torch.Generator().manual_seed(1), **kw).images
    return out, calls


def test_flux_pipelines_run_on_the_stored_grid(tmp_path):
    path, t = _flux_schedule_file(tmp_path)
    sch = LD3Scheduler.from_schedule_file(path, scheduler_config=_flux_config())
    out, calls = _run_flux(diffusers.FluxPipeline, sch, 16)
    assert torch.isfinite(out).all()
    # the transformer reads t / 1000 of the stored grid's network units, whatever mu the pipeline computed
    torch.testing.assert_close(torch.tensor(calls, dtype=torch.float64) * 1000, t[:-1].double() * 1000,
                               rtol=1e-5, atol=1e-3)
    img = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    out, calls = _run_flux(diffusers.FluxImg2ImgPipeline, sch, 64, image=img, strength=0.75)
    assert torch.isfinite(out).all() and len(calls) == 3  # int(4 * 0.75) steps of the stored grid's 4
    # without a stored grid: the discretization's, with the N the pipeline asked for
    base = LD3Scheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    out, calls = _run_flux(diffusers.FluxImg2ImgPipeline, base, 64, image=img, strength=0.75)
    assert torch.isfinite(out).all() and len(calls) == 3 and base.num_inference_steps == 4


def test_a_compiled_sd3_transformer_gets_its_time_by_keyword():
    net = tiny_sd3_transformer()
    cfg = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    kw = {"encoder_hidden_states": torch.randn(1, 3, 16, generator=g),
          "pooled_projections": torch.randn(1, 16, generator=g)}
    t = torch.tensor(0.6, dtype=torch.float64)
    outs = []
    for n in (net, torch.compile(net, backend="eager")):
        model, _ = from_diffusers(n, cfg)
        assert model.fn.time_keyword and model.fn.__name__ == "SD3Transformer2DModel"
        with torch.no_grad():
            outs.append(model.predict(x, t, **kw)[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_a_compiled_class_conditional_unet_is_conditional():
    net = torch.compile(tiny_unet(num_class_embeds=4), backend="eager")
    model, _ = from_diffusers(net, diffusers.DDPMScheduler(), guidance_scale=2.0)
    assert model.cond_key == "class_labels"
    assert model.name == "diffusers:UNet2DModel"
