"""The CLI on a conditional model: a factory's ``model.draw_conditions(n, generator)`` gives every command its
per-sample conditions (teacher pairs, training, eval's held-out samples and GITS' batch, sample).

The model: class-conditional Gaussian data N(mu_y, S^2 I) on the EDM schedule, whose denoiser and probability-flow
ODE solution are known exactly, x(sigma) = mu_y + sqrt(S^2 + sigma^2) / sqrt(S^2 + sigma_T^2) (x_T - mu_y): a
teacher made with the wrong (or no) class is far from it."""
import json
import math
import sys
import types

import pytest
import torch

import ld3_ext
from ld3_ext import cli

from _cli_run import one_line_errors, run_cli  # noqa: F401 - an autouse fixture

S = 0.5          # the data's standard deviation in every class
DIM = 4
MEANS = torch.tensor([[2.0, -1.0, 0.5, 0.0], [-2.0, 1.0, 0.0, 1.5], [0.0, 2.5, -2.0, -1.0]], dtype=torch.float64)




def _denoiser(means, calls):
    def net(x, sigma, y=None):
        if y is None or y.shape != (x.shape[0],):
            raise ValueError(f"the network needs one class label per sample, got {None if y is None else y.shape}")
        calls.append(y.clone())
        mu = means.to(x.dtype)[y]
        s2, sig2 = S * S, sigma.to(x.dtype).reshape(-1, 1) ** 2
        return (s2 * x + sig2 * mu) / (s2 + sig2)
    return net


def _factory(monkeypatch, name, draw="labels", means=MEANS):
    """Registers module ``name`` whose ``make`` returns the conditional model; ``draw`` picks draw_conditions."""
    mod = types.ModuleType(name)
    calls = []
    draws = {
        "labels": lambda n, g: torch.randint(0, means.shape[0], (n,), generator=g),
        "short": lambda n, g: torch.randint(0, means.shape[0], (n - 1,), generator=g),
        "raises": lambda n, g: (_ for _ in ()).throw(KeyError("no label file")),
        "list": lambda n, g: [0] * n,
        "nan": lambda n, g: torch.full((n,), float("nan")),
        "not callable": 3,
    }

    def make():
        schedule = ld3_ext.EDM()
        model = ld3_ext.wrap_model(_denoiser(means, calls), schedule, prediction="x0", time_input="sigma",
                                   cond_key="y", name=name)
        model.sample_shape = (DIM,)
        model.draw_conditions = draws[draw]
        return model, schedule
    mod.make = make
    monkeypatch.setitem(sys.modules, name, mod)
    return f"{name}:make", calls


def _exact(x_T, y, schedule):
    mu = MEANS[y]
    ratio = math.sqrt(S ** 2 + schedule.sigma_min ** 2) / math.sqrt(S ** 2 + schedule.sigma_max ** 2)
    return mu + ratio * (x_T.double() - mu)


SMALL = ["--nfe", "4", "--no-progress", "--n-train", "6", "--n-valid", "6", "--rounds-v1", "1", "--rounds-v2", "1",
         "--time-mode", "lambda"]


def test_teacher_train_eval_sample_give_the_network_its_conditions(tmp_path, capsys, monkeypatch):
    spec, calls = _factory(monkeypatch, "ld3_cond_factory_mod")
    out = tmp_path / "run"
    rc, _, err = run_cli(["teacher", "--model", spec, "--n-train", "6", "--n-valid", "6", "--no-progress",
                       "--out", str(out)], capsys)
    assert rc == 0, err
    assert calls and all(c.dtype == torch.int64 for c in calls)
    cache = sorted(p.name for p in (out / "teacher").rglob("*") if p.is_file())

    # the cached pairs are the exact solution of each pair's own class (20-NFE UniPC teacher: close, not equal)
    from ld3_ext.training.teacher import TeacherConfig, load_or_generate_teacher
    model, schedule = sys.modules["ld3_cond_factory_mod"].make()
    cond = cli._conditions(model, 12, 0, "teacher")
    data = load_or_generate_teacher(model, schedule, TeacherConfig(n_train=6, n_valid=6), cache_dir=str(out / "teacher"),
                                    dtype=torch.float32, progress=False, conditions=cond, model_name=spec)
    assert torch.equal(data.train_cond, cond[:6]) and torch.equal(data.valid_cond, cond[6:])
    assert len(set(cond.tolist())) > 1  # more than one class among the pairs
    for noise, target, c in ((data.train_noise, data.train_target, data.train_cond),
                             (data.valid_noise, data.valid_target, data.valid_cond)):
        err_own = (target.double() - _exact(noise, c, schedule)).abs().max().item()
        err_other = (target.double() - _exact(noise, (c + 1) % 3, schedule)).abs().max().item()
        assert err_own < 2e-3 < 0.5 < err_other, (err_own, err_other)

    calls.clear()
    rc, stdout, err = run_cli(["train", "--model", spec, *SMALL, "--out", str(out)], capsys)
    assert rc == 0, err
    assert calls and all(c.numel() >= 1 for c in calls)
    # `ld3 train` drew the same conditions as `ld3 teacher`: it reused that cache, made no other
    assert sorted(p.name for p in (out / "teacher").rglob("*") if p.is_file()) == cache

    calls.clear()
    rc, stdout, err = run_cli(["eval", "--model", spec, "--n", "16", "--nfe-curve", "5", "--out", str(out)], capsys)
    assert rc == 0, err
    record = json.loads((out / "eval.json").read_text())
    # eval.json says which conditions its numbers are of (a factory drawing other classes scored other samples)
    assert record["conditions"]["key"] == "y" and record["conditions"]["n"] == 16
    assert len(record["conditions"]["sha256"]) == 64
    rows = {r["schedule"]: r for r in record["rows"]}
    assert {"gits", "dmn", "ld3", "edm"} <= set(rows)
    assert 64 in {c.shape[0] for c in calls}  # GITS' own teacher batch, with conditions of its own
    from ld3_ext.atomic_io import tensors_sha256
    model, _ = sys.modules["ld3_cond_factory_mod"].make()
    held_out = cli._conditions(model, 16, 0, "eval")
    # the record names the conditions eval drew from its own stream, not the teacher pairs' (nor anything else's)
    assert record["conditions"]["sha256"] == tensors_sha256({"conditions": held_out})
    assert any(torch.equal(c, held_out) for c in calls)
    assert not any(torch.equal(c, cli._conditions(model, 16, 0, "teacher")) for c in calls)
    assert any(torch.equal(c, cli._conditions(model, 64, 0, "gits")) for c in calls if c.shape[0] == 64)
    # LD3's samples are close to the exact class-conditional solution (the teacher's row is the reference)
    assert rows["ld3"]["median RMSE"] < rows["time_uniform"]["median RMSE"]

    calls.clear()
    rc, stdout, err = run_cli(["sample", "--model", spec, "--n", "8", "--nfe", "4", "--schedule", str(out / "schedule.json"),
                            "--out", str(tmp_path / "s")], capsys)
    assert rc == 0, err
    assert calls and all(c.shape == (8,) for c in calls)
    assert all(torch.equal(c, cli._conditions(model, 8, 0, "sample")) for c in calls)  # sample's own stream


def test_each_command_draws_its_own_conditions_from_the_seed(monkeypatch):
    spec, _ = _factory(monkeypatch, "ld3_cond_draw_mod")
    model, _ = sys.modules["ld3_cond_draw_mod"].make()
    a = cli._conditions(model, 200, 0, "teacher")
    assert torch.equal(a, cli._conditions(model, 200, 0, "teacher"))  # repeatable
    assert not torch.equal(a, cli._conditions(model, 200, 1, "teacher"))  # --seed moves it
    assert not torch.equal(a, cli._conditions(model, 200, 0, "eval"))  # eval is not scored on the teacher's
    plain = ld3_ext.wrap_model(lambda x, t: x, ld3_ext.EDM(), prediction="x0")
    assert cli._conditions(plain, 5, 0, "eval") is None and cli._condition_kwargs(plain, None, "cpu") == {}


@pytest.mark.parametrize("draw,words", [
    ("short", "must return a tensor [12, ...] (one condition per sample), got shape (11,)"),
    ("raises", "draw_conditions(12, generator) raised KeyError"),
    ("list", "must return a tensor [12, ...] (one condition per sample), got list"),
    ("not callable", "draw_conditions must be a callable (n, generator) -> tensor [n, ...], got int"),
    ("nan", "draw_conditions(12, generator) returned NaN or Inf"),
])
def test_a_bad_draw_conditions_is_a_usage_error_naming_it(tmp_path, capsys, monkeypatch, draw, words):
    spec, calls = _factory(monkeypatch, f"ld3_cond_bad_{draw.replace(' ', '_')}_mod", draw=draw)
    rc, _, err = run_cli(["train", "--model", spec, *SMALL, "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not calls  # refused before any network call


def test_gits_takes_model_kwargs_for_a_conditional_model():
    """With every class at one mean, the conditional model is the unconditional one: GITS must find the same grid
    (bitwise); without its conditions the network refuses to run."""
    same = MEANS[:1].expand(3, DIM).clone()
    calls = []
    cond_model = ld3_ext.wrap_model(_denoiser(same, calls), ld3_ext.EDM(), prediction="x0", time_input="sigma",
                                    cond_key="y")
    mu = same[0]
    plain = ld3_ext.wrap_model(lambda x, sigma: (S * S * x + sigma.to(x.dtype).reshape(-1, 1) ** 2 * mu.to(x.dtype))
                               / (S * S + sigma.to(x.dtype).reshape(-1, 1) ** 2), ld3_ext.EDM(), prediction="x0",
                               time_input="sigma")
    from ld3_ext.baselines import gits
    kw = dict(nfe=4, n_samples=8, fine_steps=12, sample_shape=(DIM,), seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    got = gits(cond_model, model_kwargs={"y": labels}, return_info=True, **kw)
    want = gits(plain, return_info=True, **kw)
    assert torch.equal(got.timesteps, want.timesteps) and got.path == want.path
    assert all(torch.equal(c, labels) for c in calls)
    with pytest.raises(ValueError, match="one class label per sample"):
        gits(cond_model, **kw)
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        gits(cond_model, model_kwargs=[("y", labels)], **kw)


def test_conditions_that_require_grad_train(tmp_path):
    """Conditions made by a network (an embedding's output, requires_grad) reached the trainer with their graph:
    fit() failed with "Trying to backward through the graph a second time" (and wrote gradients into the
    embedding); TeacherData.train_cond carried the graph too (review)."""
    from ld3_ext.training.teacher import TeacherConfig, load_or_generate_teacher
    emb = torch.nn.Embedding(3, DIM).double()

    def net(x, sigma, y=None):
        s2, sig2 = S * S, sigma.to(x.dtype).reshape(-1, 1) ** 2
        return (s2 * x + sig2 * y.to(x.dtype)) / (s2 + sig2)
    model = ld3_ext.wrap_model(net, ld3_ext.EDM(), prediction="x0", time_input="sigma", cond_key="y")
    cond = emb(torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(0)))
    assert cond.requires_grad
    data = load_or_generate_teacher(model, model.schedule, TeacherConfig(n_train=4, n_valid=4), sample_shape=(DIM,),
                                    dtype=torch.float64, progress=False, conditions=cond, model_name="emb-cond")
    assert not data.train_cond.requires_grad and not data.valid_cond.requires_grad
    tr = ld3_ext.LD3Trainer(model, model.schedule, "dpmpp", 4, n_train=4, n_valid=4, rounds_v1=1, rounds_v2=1,
                            time_mode="lambda", progress=False, model_name="emb-cond", dtype=torch.float64)
    learned = tr.fit(data.train_noise, data.train_target, data.valid_noise, data.valid_target,
                     cond=cond[:4], valid_cond=cond[4:])  # the caller's own conditions, graph and all
    assert learned.timesteps.numel() == 5 and emb.weight.grad is None


def test_gits_names_conditions_that_do_not_match_its_batch():
    """gits(model_kwargs={"y": 16 labels}) with its default 64 teacher samples: the network's size mismatch was
    reported as "sample_shape: the model fails on samples of shape (4,) ... is that the shape of the model's
    samples?" (review)."""
    emb = torch.nn.Embedding(3, DIM)

    def net(x, sigma, y=None):
        return x / (1 + sigma.reshape(-1, 1) ** 2) + emb(y).to(x.dtype)
    model = ld3_ext.wrap_model(net, ld3_ext.EDM(), prediction="x0", time_input="sigma", cond_key="y")
    from ld3_ext.baselines import gits
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] holds 16 conditions for the 64 teacher samples"):
        gits(model, nfe=4, sample_shape=(DIM,), fine_steps=12, model_kwargs={"y": torch.zeros(16, dtype=torch.long)})
    x_T = torch.randn(8, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"holds 5 conditions for the 8 teacher samples \(the rows of x_T\)"):
        gits(model, nfe=4, x_T=x_T, fine_steps=12, model_kwargs={"y": torch.zeros(5, dtype=torch.long)})
    t = gits(model, nfe=4, x_T=x_T, fine_steps=12, model_kwargs={"y": torch.zeros(8, dtype=torch.long)})
    assert t.numel() == 5


def test_load_or_generate_teacher_names_a_bad_uncond():
    """load_or_generate_teacher(uncond=) is documented "as in LD3Trainer(conditions=..., uncond=...)", which names
    a bad uncond; it failed with a bare "The expanded size of the tensor (8) must match ..." (review)."""
    from ld3_ext.training.teacher import TeacherConfig, load_or_generate_teacher
    model = ld3_ext.wrap_model(_denoiser(MEANS, []), ld3_ext.EDM(), prediction="x0", time_input="sigma",
                               cond_key="y", guidance_scale=2.0)
    cfg = TeacherConfig(n_train=4, n_valid=4)
    kw = dict(sample_shape=(DIM,), progress=False, model_name="guided")
    with pytest.raises(ValueError, match=r"uncond must hold one entry \[1, \.\.\.\]"):
        load_or_generate_teacher(model, model.schedule, cfg, conditions=torch.zeros(8, dtype=torch.long),
                                 uncond=torch.tensor([2, 2]), **kw)
    with pytest.raises(ValueError, match="pass it with conditions"):
        load_or_generate_teacher(model, model.schedule, cfg, uncond=torch.tensor([2]), **kw)


def test_ld3_teacher_regenerates_a_conditional_models_set(tmp_path, capsys, monkeypatch):
    """`ld3 teacher --regenerate-teacher` re-reads the set it staged with the same conditions: without them the
    check found "another run's teacher set" and the command failed."""
    spec, calls = _factory(monkeypatch, "ld3_cond_regen_mod")
    args = ["teacher", "--model", spec, "--n-train", "4", "--n-valid", "4", "--no-progress", "--out", str(tmp_path / "t")]
    for extra in ([], ["--regenerate-teacher"]):
        rc, _, err = run_cli(args + extra, capsys)
        assert rc == 0, err
    assert calls


def test_drawn_conditions_are_detached_and_moved_to_the_device():
    """_conditions hands back the drawn tensor without its graph (an embedding's output); _condition_kwargs puts
    it on the run's --device (the network's), under the model's cond_key."""
    emb = torch.nn.Embedding(3, 2)
    model = ld3_ext.wrap_model(lambda x, t, y=None: x, ld3_ext.EDM(), prediction="x0", cond_key="y")
    model.draw_conditions = lambda n, g: emb(torch.randint(0, 3, (n,), generator=g))
    cond = cli._conditions(model, 5, 0, "eval")
    assert cond.shape == (5, 2) and not cond.requires_grad
    kw = cli._condition_kwargs(model, cond, "meta")
    assert list(kw) == ["y"] and kw["y"].device.type == "meta" and kw["y"].shape == (5, 2)
