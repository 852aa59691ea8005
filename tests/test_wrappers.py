"""Model wrappers: every parameterisation of the same exact model gives the same (x0, eps)."""
from __future__ import annotations

import math

import pytest
import torch

import ld3_ext
from ld3_ext import ModelOutputError
from ld3_ext import discretizations as D
from conftest import BASE_SCHEDULES, OpRecorder, smooth_mixture

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULES = BASE_SCHEDULES


def times_of(sched):
    return [sched.t_max, 0.5 * (sched.t_max + sched.t_min) + 0.0123 * (sched.t_max - sched.t_min),
            sched.t_min * 1.7 + 1e-4]


def exact(gm, sched, x, t):
    a, s = sched.alpha(t), sched.sigma(t)
    x0 = gm.denoise(x, a, s)
    return x0, (x - a * x0) / s, a, s


def network_for(gm, sched, prediction, decode_t):
    """A network predicting ``prediction`` that reads its time through ``decode_t(time) -> t``."""
    def fn(x, time):
        assert time.shape == (x.shape[0],) and time.dtype == x.dtype
        t = decode_t(time[0])
        if prediction == "edm":  # fn sees x/alpha and must return x0
            x = x * sched.alpha(t)
        x0, eps, a, s = exact(gm, sched, x, t)
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s,
                "velocity": eps - x0, "edm": x0}[prediction]
    return fn


def _cases():
    out = []
    for sname in SCHEDULES:
        for pred in ("eps", "x0", "v", "score", "velocity", "edm"):
            if (pred == "velocity") != (sname == "flow") and pred in ("velocity",):
                continue
            if pred == "v" and sname == "flow":
                continue
            out.append((sname, pred))
    return out


@pytest.mark.parametrize("sname,prediction", _cases())
def test_every_prediction_type_gives_the_same_x0_and_eps(sname, prediction):
    sched = SCHEDULES[sname]()
    gm = smooth_mixture(dim=3)
    time_input = {"edm": "sigma"}.get(prediction, "index" if sname == "vp_discrete" else "t")
    decode = {"t": lambda v: v, "sigma": sched.t_from_edm_sigma,
              "index": lambda v: sched.t_from_index(v) if sname == "vp_discrete" else None}[time_input]
    model = ld3_ext.wrap_model(network_for(gm, sched, prediction, decode), sched, prediction=prediction)
    assert model.time_input == time_input  # the documented defaults
    g = torch.Generator().manual_seed(0)
    for t in times_of(sched):
        t = torch.tensor(t, dtype=torch.float64)
        x = sched.alpha(t) * gm.sample(4, generator=g) + sched.sigma(t) * torch.randn(4, 3, generator=g, dtype=torch.float64)
        x0, eps = model.predict(x, t)
        x0_ref, eps_ref, _, _ = exact(gm, sched, x, t)
        assert torch.allclose(x0, x0_ref, rtol=1e-9, atol=1e-11), (prediction, float(t))
        assert torch.allclose(eps, eps_ref, rtol=1e-9, atol=1e-11), (prediction, float(t))
        assert torch.equal(model.x0(x, t), x0) and torch.equal(model.eps(x, t), eps) and torch.equal(model(x, t), x0)


@pytest.mark.parametrize("time_input", ["t", "sigma", "edm_noise", "callable", "index"])
def test_time_input_variants(time_input):
    sched = ld3_ext.VPDiscrete.linear() if time_input == "index" else ld3_ext.VPLinear()
    gm = smooth_mixture(dim=2)
    decode = {
        "t": lambda v: v,
        "sigma": sched.t_from_edm_sigma,
        "edm_noise": lambda c: sched.t_from_edm_sigma(torch.exp(4.0 * c)),
        "callable": lambda v: v / 1000.0,
        "index": lambda v: (v + 1.0) / 1000.0,
    }[time_input]
    ti = (lambda t: 1000.0 * t) if time_input == "callable" else time_input
    model = ld3_ext.wrap_model(network_for(gm, sched, "eps", decode), sched, prediction="eps", time_input=ti)
    t = torch.tensor(0.4137, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(model.predict(x, t)[0], exact(gm, sched, x, t)[0], rtol=1e-10, atol=1e-12)
    expected_time = {"t": t, "sigma": sched.edm_sigma(t), "edm_noise": 0.25 * torch.log(sched.edm_sigma(t)),
                     "callable": 1000.0 * t, "index": 1000.0 * t - 1.0}[time_input]
    assert torch.allclose(model.network_time(t), expected_time, rtol=1e-14)


def test_time_input_validation():
    sched = ld3_ext.EDM()
    with pytest.raises(ValueError, match=r"time_input must be one of"):
        ld3_ext.wrap_model(lambda x, t: x, sched, time_input="seconds")
    with pytest.raises(ValueError, match=r"time_input='index' needs a VPDiscrete schedule"):
        ld3_ext.wrap_model(lambda x, t: x, sched, time_input="index")
    with pytest.raises(ValueError, match=r"prediction must be one of"):
        ld3_ext.wrap_model(lambda x, t: x, sched, prediction="noise")
    with pytest.raises(ValueError, match=r"prediction='velocity' .* needs a FlowMatching schedule"):
        ld3_ext.wrap_model(lambda x, t: x, sched, prediction="velocity")
    with pytest.raises(ValueError, match=r"prediction='v' is the VP v-parameterisation"):
        ld3_ext.wrap_model(lambda x, t: x, ld3_ext.FlowMatching(), prediction="v")
    with pytest.raises(TypeError, match=r"fn must be callable"):
        ld3_ext.wrap_model(3, sched)
    with pytest.raises(TypeError, match=r"schedule must be an ld3_ext.schedules.NoiseSchedule"):
        ld3_ext.wrap_model(lambda x, t: x, "edm")


def test_wrap_model_is_idempotent_and_registers_modules():
    sched = ld3_ext.EDM()
    net = torch.nn.Linear(2, 2)
    m = ld3_ext.wrap_model(net, sched, prediction="edm")
    assert ld3_ext.wrap_model(m, sched) is m
    assert ld3_ext.wrap_model(m, ld3_ext.EDM(), prediction="edm") is m  # the same settings: fine
    assert any(p is net.weight for p in m.parameters())


@pytest.mark.parametrize("kw, match", [
    (dict(schedule=ld3_ext.VPLinear()), r"schedule=VPLinear.* \(it has EDM"),
    (dict(prediction="x0"), r"prediction='x0' \(it has 'edm'\)"),
    (dict(guidance_scale=7.5), r"guidance_scale=\.\.\."),
])
def test_wrap_model_refuses_to_drop_new_settings_of_a_wrapped_model(kw, match):
    """Re-wrapping a DiffusionModel returns it unchanged: a setting that asks for another model is refused,
    not silently dropped."""
    m = ld3_ext.wrap_model(torch.nn.Linear(2, 2), ld3_ext.EDM(), prediction="edm")
    sched = kw.pop("schedule", ld3_ext.EDM())
    with pytest.raises(ValueError, match="already a DiffusionModel.*" + match):
        ld3_ext.wrap_model(m, sched, **kw)


def test_predict_refuses_a_time_per_sample():
    """One time for the batch: a [B] time would broadcast over x's last dimension, not over the batch."""
    m = ld3_ext.wrap_model(lambda x, t: 0.5 * x, ld3_ext.EDM(), prediction="x0")
    x = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"t must hold one time for the whole batch, got shape \(3,\)"):
        m.predict(x, torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64))
    assert torch.equal(m.predict(x, torch.tensor([0.5], dtype=torch.float64))[0], 0.5 * x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_state_gets_a_float32_network_time(dtype):
    """SD's discrete schedule at t_max is index 999: a bfloat16 time would read 1000 (outside 0..999)."""
    sched = ld3_ext.VPDiscrete.linear(0.00085, 0.012)
    seen = []
    m = ld3_ext.wrap_model(lambda x, t: seen.append(t) or torch.zeros_like(x), sched, prediction="eps")
    m.predict(torch.randn(2, 4, dtype=dtype), torch.tensor(sched.t_max, dtype=torch.float64))
    assert seen[0].dtype == torch.float32
    assert seen[0].tolist() == [999.0, 999.0]


# ------------------------------------------------------------------------------------------------
# classifier-free guidance and kwargs
# ------------------------------------------------------------------------------------------------
def test_classifier_free_guidance_batches_uncond_then_cond():
    sched = ld3_ext.EDM()
    gm = smooth_mixture(dim=2)
    seen = []

    def net(x, sigma, cond, extra=None):
        seen.append((x.shape[0], sigma.shape, cond.clone(), extra))
        base = gm.denoise(x, torch.ones((), dtype=x.dtype), sigma[0])
        return base + cond  # the condition shifts the prediction

    scale = 3.5
    model = ld3_ext.wrap_model(net, sched, prediction="edm", guidance_scale=scale, model_kwargs={"extra": "k"})
    x = torch.randn(4, 2, dtype=torch.float64)
    c = torch.randn(4, 2, dtype=torch.float64)
    u = torch.zeros(4, 2, dtype=torch.float64)
    t = torch.tensor(1.3, dtype=torch.float64)
    x0, _ = model.predict(x, t, cond=c, uncond=u)
    assert len(seen) == 1  # one batched call
    b, sig_shape, both, extra = seen[0]
    assert b == 8 and sig_shape == (8,) and extra == "k"
    assert torch.equal(both[:4], u) and torch.equal(both[4:], c)  # [uncond; cond]
    base = gm.denoise(x, torch.ones((), dtype=x.dtype), t)
    out_u, out_c = base + u, base + c
    assert torch.allclose(x0, out_u + scale * (out_c - out_u), rtol=1e-13, atol=1e-13)


def test_classifier_free_guidance_with_list_conditions_and_custom_key():
    sched = ld3_ext.EDM()
    seen = {}

    def net(x, sigma, prompt):
        seen["prompt"] = list(prompt)
        return torch.stack([torch.full_like(x[0], float(len(p))) for p in prompt])

    model = ld3_ext.wrap_model(net, sched, prediction="edm", guidance_scale=2.0, cond_key="prompt")
    x = torch.zeros(2, 3, dtype=torch.float64)
    x0, _ = model.predict(x, torch.tensor(1.0, dtype=torch.float64), prompt=["abc", "abcd"], uncond=["", ""])
    assert seen["prompt"] == ["", "", "abc", "abcd"]
    assert torch.allclose(x0[0], torch.full((3,), 6.0, dtype=torch.float64))  # 0 + 2 (3 - 0)
    assert torch.allclose(x0[1], torch.full((3,), 8.0, dtype=torch.float64))


def test_model_kwargs_pass_through_solvers():
    sched = ld3_ext.EDM()
    gm = smooth_mixture(dim=2)
    got = []

    def net(x, sigma, a=None, b=None):
        got.append((a, b))
        return gm.denoise(x, torch.ones((), dtype=x.dtype), sigma[0])

    model = ld3_ext.wrap_model(net, sched, prediction="edm", model_kwargs={"a": 1, "b": 2})
    x = gm.prior_noise(sched, 2)
    for solver in (ld3_ext.UniPC(backend="reference"), ld3_ext.Heun(backend="reference"),
                   ld3_ext.DPMSolverPP(backend="reference")):
        got.clear()
        solver.sample(model, x, D.edm(sched, 3), b=5)  # per-call kwargs override the stored ones
        assert got and all(g == (1, 5) for g in got)


def test_predict_checks_output():
    sched = ld3_ext.EDM()
    x = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor(2.0, dtype=torch.float64)
    with pytest.raises(ModelOutputError, match=r"shape \(2, 2\) at step 7"):
        ld3_ext.wrap_model(lambda xx, tt: xx[:, :2], sched).predict(x, t, step=7)
    with pytest.raises(ModelOutputError, match=r"NaN/Inf \(t=2\)"):
        ld3_ext.wrap_model(lambda xx, tt: xx * math.inf, sched).predict(x, t)
    # check_output=False lets NaN through (for callers that handle it themselves)
    out = ld3_ext.wrap_model(lambda xx, tt: xx * math.nan, sched, check_output=False).predict(x, t)[0]
    assert torch.isnan(out).all()


def test_float32_network_in_float64_solve():
    """A float32 network output is promoted to the state's dtype; times are not rounded to float32."""
    sched = ld3_ext.EDM()
    seen = []

    def net(x, sigma):
        seen.append(sigma.dtype)
        return (0.5 * x).float()

    m = ld3_ext.wrap_model(net, sched, prediction="edm")
    x = torch.randn(2, 3, dtype=torch.float64)
    x0, eps = m.predict(x, torch.tensor(1.5, dtype=torch.float32))
    assert x0.dtype == eps.dtype == torch.float64 and seen == [torch.float64]
    # float32 time 1.5 is exact; eps = (x - x0)/sigma computed in float64
    assert torch.allclose(eps, (x - (0.5 * x).float().double()) / 1.5, rtol=1e-15, atol=0)


def _nan_at(bad_call):
    calls = []

    def net(x, t):
        calls.append(len(calls))
        out = 0.5 * x
        return out * float("nan") if len(calls) - 1 == bad_call else out
    net.calls = calls
    return net


def test_deferred_output_checks_read_back_once_and_name_the_first_bad_step():
    """Inside deferred_output_checks() no output check reads a value back to the host (on a GPU each
    would be a sync); leaving the block raises for the first bad step, with its time."""
    sched = ld3_ext.EDM()
    model = ld3_ext.wrap_model(_nan_at(bad_call=2), sched, prediction="x0")
    x = torch.randn(3, 2, dtype=torch.float64)
    times = [torch.tensor(v, dtype=torch.float64) for v in (10.0, 5.0, 2.5, 1.25)]
    rec = OpRecorder()
    with pytest.raises(ModelOutputError, match=r"NaN/Inf at step 2 \(t=2\.5\)"):
        with model.deferred_output_checks():
            with rec:
                for i, t in enumerate(times):
                    model.predict(x, t, step=i, returns="x0")
    assert len(rec.ops) > 8
    assert not {"_local_scalar_dense", "is_nonzero", "item", "nonzero"} & set(rec.ops), sorted(set(rec.ops))
    assert model._deferred is None
    # clean calls: nothing raised; nested blocks check once, in the outer one
    good = ld3_ext.wrap_model(_nan_at(bad_call=-1), sched, prediction="x0")
    with good.deferred_output_checks():
        with good.deferred_output_checks():
            good.predict(x, times[0], step=0)
        assert good._deferred is not None and len(good._deferred) == 1
    bad = ld3_ext.wrap_model(_nan_at(bad_call=0), sched, prediction="x0")
    with pytest.raises(ModelOutputError, match="at step 0"):
        with bad.deferred_output_checks():
            with bad.deferred_output_checks():
                bad.predict(x, times[0], step=0)
            assert bad._deferred is not None  # the inner block left the check to the outer one
    # an error inside the block propagates as is and clears the queue
    with pytest.raises(KeyError):
        with model.deferred_output_checks():
            raise KeyError("inside")
    assert model._deferred is None
    # check_output=False: nothing queued, nothing raised
    off = ld3_ext.wrap_model(_nan_at(bad_call=0), sched, prediction="x0", check_output=False)
    with off.deferred_output_checks():
        assert torch.isnan(off.predict(x, times[0], step=0)[0]).all()


def test_cpu_sampling_still_checks_every_step_at_once():
    """On the CPU a check costs no sync: sample() raises at the bad step, before running the rest."""
    net = _nan_at(bad_call=1)
    model = ld3_ext.wrap_model(net, ld3_ext.EDM(), prediction="x0")
    t = ld3_ext.discretizations.edm(ld3_ext.EDM(), 6)
    with pytest.raises(ModelOutputError, match="at step 1"):
        ld3_ext.DPMSolverPP(order=2).sample(model, torch.randn(2, 3, dtype=torch.float64), t)
    assert len(net.calls) == 2  # stopped at the second call


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("schedule_name", ["edm", "vp_linear", "vp_cosine", "vp_discrete", "flow"])
def test_a_step_reads_no_value_back_on_any_schedule(schedule_name, prediction):
    """A sampler step's conversions read the schedule at a scalar time: VPDiscrete indexed its knots with a 0-dim
    index tensor, an item() each (eight a step; on a GPU a stream sync each, and a capture error)."""
    sched = BASE_SCHEDULES[schedule_name]()
    if schedule_name == "flow":
        prediction = {"eps": "velocity", "v": "velocity"}.get(prediction, prediction)
    model = ld3_ext.wrap_model(lambda xx, tt: 0.5 * torch.tanh(xx), sched, prediction=prediction)
    x = torch.randn(3, 2, dtype=torch.float64)
    times = ld3_ext.discretizations.logsnr_uniform(sched, 4).unbind(0)
    rec = OpRecorder()
    with model.deferred_output_checks():
        with rec:
            for i, t in enumerate(times):
                model.predict(x, t, step=i, returns="x0")
                model.predict(x, t, step=i, returns="eps")
            for fn in (sched.alpha, sched.sigma, sched.lambda_, sched.edm_sigma):
                fn(times[1])
                fn(torch.stack(times))
            sched.inverse_lambda(sched.lambda_(times[2]))
    assert len(rec.ops) > 20
    assert not {"_local_scalar_dense", "is_nonzero", "item", "nonzero"} & set(rec.ops), sorted(set(rec.ops))


def test_to_moves_the_stored_model_kwargs():
    """A prompt's embeddings given as model_kwargs stayed where they were made when the model was moved: every
    call on the GPU failed on a device mismatch (the meta device stands in for it here)."""
    net = torch.nn.Linear(3, 3)
    emb = torch.ones(2, 3)
    model = ld3_ext.wrap_model(lambda x, t, emb, ids, extra: x, ld3_ext.EDM(), prediction="x0",
                               model_kwargs={"emb": emb, "ids": [torch.arange(2), "text"], "extra": 7})
    model.net = net
    model.to(torch.float64)
    assert model.model_kwargs["emb"].dtype == torch.float64 and emb.dtype == torch.float32  # the caller's kept
    assert model.model_kwargs["ids"][0].dtype == torch.int64 and model.model_kwargs["ids"][1] == "text"
    model.to("meta")
    assert model.model_kwargs["emb"].device.type == "meta" and model.model_kwargs["ids"][0].device.type == "meta"
    assert net.weight.device.type == "meta" and model.model_kwargs["extra"] == 7


def test_repr_shows_schedule_prediction_and_time_input():
    """repr(model) was 'DiffusionModel()' for a function network: it now says how the network is read."""
    def net(x, t, cond=None):
        return x
    m = ld3_ext.wrap_model(net, ld3_ext.EDM(), prediction="edm", guidance_scale=7.5, model_kwargs={"a": 1})
    assert repr(m) == ("DiffusionModel(fn=net, schedule=EDM(sigma_min=0.002, sigma_max=80.0), prediction='edm', "
                       "time_input='sigma', guidance_scale=7.5, cond_key='cond', model_kwargs=['a'])")
    conv = torch.nn.Conv2d(1, 1, 1)
    r = repr(ld3_ext.wrap_model(conv, ld3_ext.VPLinear(), prediction="v", time_input=lambda t: t))
    assert "prediction='v', time_input=<lambda>" in r and "VPLinear(" in r and "Conv2d(1, 1" in r and "fn=" not in r


@pytest.mark.parametrize("pred", ["x0", "eps"])
def test_a_cpu_time_for_a_state_on_another_device_reaches_the_network_on_that_device(pred):
    """A CPU time is accepted for a GPU state (documented), but the network got a CPU [B] time and the fused
    conversion CPU coefficients, which it refused (desk check of the CUDA-only paths; meta stands in for CUDA)."""
    seen = []

    def net(x, t):
        seen.append(t.device.type)
        return x * 0.5
    sched = ld3_ext.EDM() if pred == "x0" else ld3_ext.VPDiscrete.linear()
    model = ld3_ext.wrap_model(net, sched, prediction=pred, check_output=False)
    x = torch.empty(4, 3, device="meta")
    x0, eps = model.predict(x, torch.tensor(0.5, dtype=torch.float64))
    assert seen == ["meta"] and x0.device.type == "meta" and eps.device.type == "meta"
