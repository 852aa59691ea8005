"""Conditional networks (conditional-path audit): the keyword a condition is passed under is part of the teacher
cache / checkpoint key with or without guidance, a resume with another ``uncond`` is refused, and under guidance a
condition of batch 1 is expanded while any other batch than x's is refused by name."""
import pytest
import torch

import ld3_ext
from ld3_ext.training.teacher import model_call_settings
from ld3_ext.training.trainer import CheckpointMismatchError


class _ClassNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(6, 3)
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x, t, y=None, **kw):  # **kw: an unknown keyword (labels=) is silently ignored
        e = 0.0 if y is None else self.emb(y)[:, :, None, None]
        return torch.tanh(self.lin((x + e).transpose(1, -1)).transpose(1, -1)) * 0.3


def test_cond_key_is_part_of_the_call_settings_without_guidance_too():
    """A cache made with cond_key='y' was reused after switching to 'labels' without guidance: the network ignored
    labels=, so the student trained unconditionally against conditional targets."""
    s = ld3_ext.VPLinear()
    a = model_call_settings(ld3_ext.wrap_model(_ClassNet(), s, cond_key="y"))
    b = model_call_settings(ld3_ext.wrap_model(_ClassNet(), s, cond_key="labels"))
    assert a["cond_key"] == "y" and b["cond_key"] == "labels" and a != b
    assert "cond_key" not in model_call_settings(ld3_ext.wrap_model(_ClassNet(), s))  # the default: old caches hold


class _Stop(Exception):
    pass


def _stop_after_round_1(trainer, info):
    if info.get("round", 0) >= 2:  # after round 1's checkpoint
        raise _Stop


def _guided_run(tmp_path):
    """A guided model, its data and the trainer settings the resume tests share."""
    s = ld3_ext.VPLinear()
    model = ld3_ext.wrap_model(_ClassNet(), s, cond_key="y", guidance_scale=3.0)
    g = torch.Generator().manual_seed(0)
    noise, target = torch.randn(10, 3, 4, 4, generator=g), torch.randn(10, 3, 4, 4, generator=g) * 0.5
    cond = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    common = dict(solver=ld3_ext.DPMSolverPP(order=2), nfe=3, sample_shape=(3, 4, 4), n_train=6, n_valid=4,
                  time_mode="time", init="time_uniform", rounds_v1=1, rounds_v2=1, progress=False,
                  checkpoint_dir=str(tmp_path))
    return model, noise, target, cond, common


def test_a_resume_with_another_uncond_is_refused(tmp_path):
    model, noise, target, cond, common = _guided_run(tmp_path)
    stop, Stop = _stop_after_round_1, _Stop
    with pytest.raises(Stop):
        ld3_ext.LD3Trainer(model, uncond=torch.tensor([5]), callback=stop, **common).fit(noise, target, cond=cond)
    with pytest.raises(CheckpointMismatchError, match="differs in: uncond_sha256"):
        ld3_ext.LD3Trainer(model, uncond=torch.tensor([4]), **common).fit(noise, target, cond=cond)
    # the same uncond resumes
    ld3_ext.LD3Trainer(model, uncond=torch.tensor([5]), **common).fit(noise, target, cond=cond)


def test_a_guided_checkpoint_from_before_the_uncond_digest_resumes_with_a_warning(tmp_path, monkeypatch):
    """Checkpoints written before uncond_sha256 was recorded were refused as another run ("differs in:
    uncond_sha256") even with the same uncond (diff review): they resume, with a warning that it is unchecked."""
    model, noise, target, cond, common = _guided_run(tmp_path)
    stop, Stop = _stop_after_round_1, _Stop
    new_settings = ld3_ext.LD3Trainer.settings
    with monkeypatch.context() as m:  # the older writer: no digest in its settings
        m.setattr(ld3_ext.LD3Trainer, "settings",
                  lambda self, *a, **k: {k2: v for k2, v in new_settings(self, *a, **k).items() if k2 != "uncond_sha256"})
        with pytest.raises(Stop):
            ld3_ext.LD3Trainer(model, uncond=torch.tensor([5]), callback=stop, **common).fit(noise, target, cond=cond)
    rounds = []
    with pytest.warns(UserWarning, match="records no digest of uncond"):
        ld3_ext.LD3Trainer(model, uncond=torch.tensor([5]), callback=lambda tr, info: rounds.append(info.get("round")),
                           **common).fit(noise, target, cond=cond)
    assert rounds and min(r for r in rounds if r is not None) >= 2  # resumed after round 1, not started over


def test_guided_condition_batches():
    s = ld3_ext.VPLinear()
    model = ld3_ext.wrap_model(_ClassNet(), s, cond_key="y", guidance_scale=2.0)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.5)
    y4, u4 = torch.tensor([2, 2, 2, 2]), torch.tensor([5, 5, 5, 5])
    want = model.predict(x, t, y=y4, uncond=u4)[1]
    for y, u in ((torch.tensor([2]), torch.tensor([5])), (y4, torch.tensor([5])), (torch.tensor([2]), u4)):
        torch.testing.assert_close(model.predict(x, t, y=y, uncond=u)[1], want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"'y' holds a batch of 3 .* but x a batch of 4"):
        model.predict(x, t, y=torch.tensor([1, 2, 3]), uncond=u4)
    with pytest.raises(ValueError, match=r"uncond holds a batch of 2 .* but x a batch of 4"):
        model.predict(x, t, y=y4, uncond=torch.tensor([5, 5]))


def test_a_diffusers_networks_own_condition_keyword_is_not_a_new_cache_key():
    """from_diffusers sets cond_key to the network's own keyword (class_labels, encoder_hidden_states): unguided it
    is the default for that network, so teacher caches made before cond_key entered the key stay valid (a first
    version refused every diffusers cache, even of unconditional UNets; diff review).  Guided, it is keyed as before."""
    diffusers = pytest.importorskip("diffusers")
    from _tiny_unets import tiny_cond_unet, tiny_unet
    from ld3_ext.integrations.diffusers import from_diffusers
    cfg = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    for unet in (tiny_unet(), tiny_cond_unet()):
        model, _ = from_diffusers(unet, cfg)
        assert "cond_key" not in model_call_settings(model), model_call_settings(model)
    guided, _ = from_diffusers(tiny_cond_unet(), cfg, guidance_scale=3.0)
    assert model_call_settings(guided)["cond_key"] == "encoder_hidden_states"
