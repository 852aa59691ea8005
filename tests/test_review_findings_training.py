"""Defects found by review (training keys, wrapper arguments, determinism), each reproduced before its fix."""
import os
import warnings

import numpy as np
import pytest
import torch

import ld3_ext
from ld3_ext.training import TimeParameterization


# ---------------------------------------------------------------------------------------------
# TimeParameterization: flags and numbers are checked, not coerced
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["no", "False", 1, None])
def test_time_parameterization_decoupled_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="decoupled"):
        TimeParameterization(ld3_ext.EDM(), 4, decoupled=bad)


@pytest.mark.parametrize("bad,exc", [("1e-9", TypeError), (float("nan"), ValueError), (-1e-3, ValueError),
                                     (0.2, ValueError), (True, TypeError)])
def test_time_parameterization_min_gap_fraction_is_checked(bad, exc):
    with pytest.raises(exc, match="min_gap_fraction"):
        TimeParameterization(ld3_ext.EDM(), 4, min_gap_fraction=bad)


def test_time_parameterization_good_values_are_kept():
    p = TimeParameterization(ld3_ext.EDM(), 4, decoupled=False, min_gap_fraction=0.0)
    assert p.decoupled is False and p.floor == 0.0


# ---------------------------------------------------------------------------------------------
# DiffusionModel: a cond_key that collides with the guidance keywords is refused at construction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["uncond", "uncond_kwargs"])
def test_cond_key_colliding_with_guidance_keywords_is_refused(key):
    with pytest.raises(ValueError, match="cond_key"):
        ld3_ext.wrap_model(lambda x, t, **k: x, ld3_ext.EDM(), guidance_scale=2.0, cond_key=key)


@pytest.mark.parametrize("key", [3, None, ""])
def test_cond_key_must_be_a_nonempty_str(key):
    with pytest.raises((TypeError, ValueError), match="cond_key"):
        ld3_ext.wrap_model(lambda x, t, **k: x, ld3_ext.EDM(), guidance_scale=2.0, cond_key=key)


def test_custom_cond_key_still_guides():
    m = ld3_ext.wrap_model(lambda x, t, *, ctx: x * ctx.reshape(-1, 1), ld3_ext.EDM(), prediction="x0",
                           guidance_scale=3.0, cond_key="ctx")
    x = torch.ones(2, 2, dtype=torch.float64)
    x0 = m.x0(x, 1.0, ctx=torch.full((2,), 2.0, dtype=torch.float64), uncond=torch.full((2,), 1.0, dtype=torch.float64))
    torch.testing.assert_close(x0, torch.full((2, 2), 1.0 + 3.0 * (2.0 - 1.0), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# teacher cache keys describe the whole model call: a changed call is a cache miss, never stale pairs
# ---------------------------------------------------------------------------------------------
from ld3_ext.training.teacher import TeacherCacheMismatch, generate_teacher_data, make_teacher  # noqa: E402


class _TimeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4).double()

    def forward(self, x, t, **kw):
        return self.lin(x) * t.reshape(-1, 1)


def _cached_equals_fresh(model, cache_dir, teacher="solver", **kw):
    """True where the cache gives the pairs a fresh generation gives; a refused cache raises TeacherCacheMismatch."""
    fn, st = make_teacher(model, teacher)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = generate_teacher_data(model, fn, st, 4, (4,), dtype=torch.float64, cache_dir=str(cache_dir),
                                       progress=False, **kw)
        fresh = generate_teacher_data(model, fn, st, 4, (4,), dtype=torch.float64, progress=False, **kw)
    return torch.equal(cached["target"], fresh["target"])


def _refused(model, cache_dir, **kw):
    with pytest.raises(TeacherCacheMismatch):
        _cached_equals_fresh(model, cache_dir, **kw)
    return True


def test_teacher_cache_tells_time_input_callables_apart(tmp_path):
    torch.manual_seed(0)
    net, s = _TimeNet(), ld3_ext.VPLinear()
    assert _cached_equals_fresh(ld3_ext.wrap_model(net, s, time_input=lambda t: t * 1000), tmp_path)
    # another lambda: same qualname "<lambda>", other network times -> the cache is refused, not reused
    assert _refused(ld3_ext.wrap_model(net, s, time_input=lambda t: t), tmp_path)
    assert _cached_equals_fresh(ld3_ext.wrap_model(net, s, time_input=lambda t: t), tmp_path / "other")


def test_teacher_cache_tells_teacher_networks_with_other_weights_apart(tmp_path):
    student = ld3_ext.wrap_model(torch.nn.Linear(4, 4).double(), ld3_ext.VPLinear(), prediction="eps")
    for seed in (0, 1):
        torch.manual_seed(seed)
        teacher = torch.nn.Linear(4, 4).double()
        fn, st = make_teacher(student, teacher)
        if seed == 1:  # the retrained teacher network: same type and shapes, other weights
            with pytest.raises(TeacherCacheMismatch):
                generate_teacher_data(student, fn, st, 4, (4,), dtype=torch.float64, cache_dir=str(tmp_path / "s0"),
                                      progress=False)
        d = generate_teacher_data(student, fn, st, 4, (4,), dtype=torch.float64,
                                  cache_dir=str(tmp_path / f"s{seed}"), progress=False)
        with torch.no_grad():
            want = teacher(ld3_ext.VPLinear().prior_std() * d["noise"])
        torch.testing.assert_close(d["target"], want, rtol=0, atol=0)
    # the same weights again: the cache is reused
    fn, st = make_teacher(student, teacher)
    again = generate_teacher_data(student, fn, st, 4, (4,), dtype=torch.float64, cache_dir=str(tmp_path / "s1"),
                                  progress=False)
    torch.testing.assert_close(again["target"], d["target"], rtol=0, atol=0)


def test_teacher_cache_hashes_large_numpy_model_kwargs_by_content(tmp_path):
    net, s = torch.nn.Linear(4, 4).double(), ld3_ext.VPLinear()

    def check(bias):
        model = ld3_ext.wrap_model(lambda x, t, bias: net(x) + float(bias.sum()), s, model_kwargs={"bias": bias})
        model.net = net
        return _cached_equals_fresh(model, tmp_path, identity={"name": "n"})

    b = np.zeros(5000)
    assert check(b)
    b = np.zeros(5000)
    b[100] = 10.0  # the repr of both arrays is "array([0., 0., 0., ..., 0., 0., 0.])"
    with pytest.raises(TeacherCacheMismatch):
        check(b)
    assert check(np.zeros(5000))  # equal content: reused


def test_teacher_cache_hashes_module_model_kwargs_by_weights(tmp_path):
    net, s = torch.nn.Linear(4, 4).double(), ld3_ext.VPLinear()

    def check(seed):
        torch.manual_seed(seed)
        adapter = torch.nn.Linear(4, 4).double()
        model = ld3_ext.wrap_model(lambda x, t, adapter: net(x) + adapter(x), s, model_kwargs={"adapter": adapter})
        model.net = net
        return _cached_equals_fresh(model, tmp_path, identity={"name": "n"})

    assert check(0)
    with pytest.raises(TeacherCacheMismatch):
        check(1)
    assert check(0)


def test_unhashable_model_kwarg_warns(tmp_path):
    class Opaque:  # no stable description: repr holds an address
        pass
    model = ld3_ext.wrap_model(lambda x, t, o: x, ld3_ext.VPLinear(), prediction="x0", model_kwargs={"o": Opaque()})
    fn, st = make_teacher(model, "solver")
    with pytest.warns(UserWarning, match="model_kwargs"):
        generate_teacher_data(model, fn, st, 2, (4,), dtype=torch.float64, cache_dir=str(tmp_path),
                              identity={"name": "n"}, progress=False)


# ---------------------------------------------------------------------------------------------
# a trainer checkpoint records how the wrapper calls the network: a changed call is not resumed
# ---------------------------------------------------------------------------------------------
from ld3_ext.training import CheckpointMismatchError, LD3Trainer  # noqa: E402


class _Stop(Exception):
    pass


def _ring_pairs():
    g = ld3_ext.testbeds.ring2d()
    s = ld3_ext.VPLinear()
    noise = s.prior_std() * torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return g.model(s).fn, s, noise, g.reference_solution(s, noise)


def _trainer(net, s, ckpt, callback=None, **wrap):
    m = ld3_ext.wrap_model(net, s, **wrap)
    return LD3Trainer(m, None, "unipc", 4, time_mode="lambda", init="logsnr", n_valid=4, rounds_v1=1, rounds_v2=1,
                      progress=False, model_name="net", checkpoint_dir=str(ckpt), callback=callback)


def _interrupted(net, s, noise, target, ckpt, **wrap):
    def stop(tr, info):
        if info["iteration"] == 6:
            raise _Stop
    with pytest.raises(_Stop):
        _trainer(net, s, ckpt, stop, **wrap).fit(noise, target)


@pytest.mark.parametrize("first,second", [
    ({"prediction": "x0", "time_input": "sigma"}, {"prediction": "x0", "time_input": "t"}),
    ({"prediction": "x0", "time_input": lambda t: 2 * t}, {"prediction": "x0", "time_input": lambda t: t}),
    ({"prediction": "x0", "model_kwargs": {"k": 1.0}}, {"prediction": "x0", "model_kwargs": {"k": 2.0}}),
])
def test_resume_refuses_a_checkpoint_of_another_model_call(tmp_path, first, second):
    base, s, noise, target = _ring_pairs()
    net = (lambda x, t, k=1.0: base(x, t)) if "model_kwargs" in first else base
    _interrupted(net, s, noise, target, tmp_path, **first)
    with pytest.raises(CheckpointMismatchError, match="model_call"):
        _trainer(net, s, tmp_path, **second).fit(noise, target)


def test_resume_of_the_same_model_call_continues(tmp_path):
    net, s, noise, target = _ring_pairs()
    _interrupted(net, s, noise, target, tmp_path, prediction="x0", time_input="t")
    resumed = _trainer(net, s, tmp_path, prediction="x0", time_input="t").fit(noise, target)
    fresh = _trainer(net, s, tmp_path / "fresh", prediction="x0", time_input="t").fit(noise, target)
    assert torch.equal(resumed.timesteps, fresh.timesteps)


def test_model_call_settings_tell_cond_keys_apart_and_keep_the_default_out():
    from ld3_ext.training.teacher import model_call_settings
    net, s = (lambda x, t, **k: x), ld3_ext.EDM()
    default = model_call_settings(ld3_ext.wrap_model(net, s, guidance_scale=2.0))
    ctx = model_call_settings(ld3_ext.wrap_model(net, s, guidance_scale=2.0, cond_key="ctx"))
    assert "cond_key" not in default and ctx["cond_key"] == "ctx"
    assert {k: v for k, v in ctx.items() if k != "cond_key"} == default
    assert model_call_settings(ld3_ext.wrap_model(net, s, guidance_scale=3.0)) != default
    assert model_call_settings(ld3_ext.wrap_model(net, s, prediction="x0", guidance_scale=2.0)) != default



@pytest.mark.parametrize("which", ["xi", "xi_c"])
def test_non_finite_schedule_parameters_are_rescued_like_a_non_finite_loss(tmp_path, which):
    """A NaN xi_c (or xi) raised a plain FloatingPointError out of fit(): no NonFiniteLossError, no last good
    schedule on disk, and `ld3 train` showed a traceback (review of the xi_c check)."""
    from ld3_ext.solvers import DPMSolverPP
    from ld3_ext.training import NonFiniteLossError
    from ld3_ext.training.parameterization import NonFiniteParameterError
    mix = ld3_ext.testbeds.ring2d()
    model = mix.model(ld3_ext.EDM())

    def trip(tr, info):
        if info["iteration"] == 3:
            with torch.no_grad():
                getattr(tr.param, which)[2] = float("nan")
    tr = LD3Trainer(model, None, DPMSolverPP(2, backend="reference"), 4, teacher="exact", reference=mix,
                    sample_shape=mix.event_shape, model_name="ring", n_train=8, n_valid=4, rounds_v1=1, rounds_v2=2,
                    batch_size=2, progress=False, checkpoint_dir=str(tmp_path), callback=trip, time_mode="lambda",
                    init="logsnr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteLossError, match=f"the {'logits xi' if which == 'xi' else 'model-time shifts xi_c'} "
                                                     "are not finite") as info:
            tr.fit()
    assert isinstance(info.value.__context__, NonFiniteParameterError)
    saved = info.value.saved_to
    assert saved is not None and os.path.isfile(saved)
    good = ld3_ext.load_schedule(saved)
    assert torch.isfinite(good.timesteps).all() and torch.isfinite(good.model_timesteps).all()
