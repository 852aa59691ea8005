"""DiffusionModel edge cases: classifier-free guidance with dict/list/tuple conditions and container kwargs,
non-tensor outputs under guidance, and the NaN/Inf check on the output as cast to the state's dtype."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch

import ld3_ext
from ld3_ext import ModelOutputError, wrap_model

B = 2


def _xt():
    return torch.randn(B, 3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)


# --- the guidance condition ------------------------------------------------------------------------------------
def test_dict_condition_is_batched_per_key():
    seen = {}

    def fn(x, t, cond):
        seen["cond"] = cond
        return x + cond["y"][:, None] + cond["z"]

    m = wrap_model(fn, ld3_ext.VPLinear(), prediction="x0", guidance_scale=2.0)
    x, t = _xt()
    c = {"y": torch.ones(B, dtype=torch.float64), "z": torch.full((B, 3), 2.0, dtype=torch.float64)}
    u = {"y": torch.zeros(B, dtype=torch.float64), "z": torch.zeros(B, 3, dtype=torch.float64)}
    x0, _ = m.predict(x, t, cond=c, uncond=u)
    assert isinstance(seen["cond"], dict) and set(seen["cond"]) == {"y", "z"}
    assert torch.equal(seen["cond"]["y"], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.equal(seen["cond"]["z"][:B], u["z"]) and torch.equal(seen["cond"]["z"][B:], c["z"])
    torch.testing.assert_close(x0, x + 2.0 * 3.0)  # u + 2 (c - u) with u = x, c = x + 3


def test_dict_condition_errors_name_the_argument():
    m = wrap_model(lambda x, t, cond: x, ld3_ext.VPLinear(), prediction="x0", guidance_scale=2.0)
    x, t = _xt()
    c = {"y": torch.ones(B)}
    with pytest.raises(ValueError, match=r"uncond must be a dict with the keys \['y'\]"):
        m.predict(x, t, cond=c, uncond={"w": torch.ones(B)})
    with pytest.raises(ValueError, match=r"uncond\['y'\] must be a tensor shaped like"):
        m.predict(x, t, cond=c, uncond={"y": torch.ones(B + 1)})
    with pytest.raises(ValueError, match=r"uncond must be a dict"):
        m.predict(x, t, cond=c, uncond=[torch.ones(B)])
    with pytest.raises(ValueError, match=r"uncond must be a tensor shaped like"):
        m.predict(x, t, cond=torch.ones(B), uncond=[0.0, 0.0])


@pytest.mark.parametrize("kind", [list, tuple])
def test_list_and_tuple_conditions_are_concatenated(kind):
    seen = {}

    def fn(x, t, prompt):
        seen["prompt"] = prompt
        return torch.stack([torch.full_like(x[0], float(len(p))) for p in prompt])

    m = wrap_model(fn, ld3_ext.VPLinear(), prediction="x0", guidance_scale=2.0, cond_key="prompt")
    x, t = _xt()
    x0, _ = m.predict(x, t, prompt=kind(["abc", "abcd"]), uncond=kind(["", ""]))
    assert type(seen["prompt"]) is kind and list(seen["prompt"]) == ["", "", "abc", "abcd"]
    torch.testing.assert_close(x0[:, 0], torch.tensor([6.0, 8.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="uncond must hold 2 entries like 'prompt', got 1"):
        m.predict(x, t, prompt=kind(["abc", "abcd"]), uncond=kind([""]))
    with pytest.raises(TypeError, match="uncond must be a list/tuple like 'prompt', got str"):
        m.predict(x, t, prompt=kind(["abc", "abcd"]), uncond="xy")


@pytest.mark.parametrize("cond", [3, 2.5, "a prompt", None])
def test_other_conditions_are_a_type_error_naming_the_argument(cond):
    m = wrap_model(lambda x, t, label: x, ld3_ext.VPLinear(), prediction="x0", guidance_scale=2.0, cond_key="label")
    x, t = _xt()
    with pytest.raises(TypeError, match=r"'label' \(the guidance condition\) must be a tensor, a dict"):
        m.predict(x, t, label=cond, uncond=cond)


# --- shared kwargs in containers -------------------------------------------------------------------------------
Residuals = namedtuple("Residuals", "a b")


@pytest.mark.parametrize("kind", [tuple, list, "namedtuple"])
def test_container_kwargs_are_repeated_for_both_halves(kind):
    """diffusers' ControlNet residuals: a tuple of [B, ...] tensors, the same for both halves."""
    seen = {}

    def fn(x, t, cond, residuals=()):
        seen["residuals"] = residuals
        out = x + cond[:, None]
        for r in residuals:
            out = out + (r if isinstance(r, torch.Tensor) else r[0])
        return out

    r1 = torch.ones(B, 3, dtype=torch.float64)
    r2 = torch.full((B, 3), 2.0, dtype=torch.float64)
    res = Residuals(r1, [r2]) if kind == "namedtuple" else kind([r1, [r2]])
    x, t = _xt()
    m = wrap_model(fn, ld3_ext.VPLinear(), prediction="x0", guidance_scale=2.0)
    x0, _ = m.predict(x, t, cond=torch.ones(B, dtype=torch.float64), uncond=torch.zeros(B, dtype=torch.float64),
                      residuals=res)
    got = seen["residuals"]
    assert type(got) is type(res) and len(got) == 2 and isinstance(got[1], list)
    assert torch.equal(got[0], torch.cat([r1, r1])) and torch.equal(got[1][0], torch.cat([r2, r2]))
    # u + 2 (c - u): u = x + 3, c = x + 4
    torch.testing.assert_close(x0, x + 3.0 + 2.0)
    plain = wrap_model(fn, ld3_ext.VPLinear(), prediction="x0")
    torch.testing.assert_close(plain.predict(x, t, cond=torch.ones(B, dtype=torch.float64), residuals=res)[0],
                               x + 4.0)


# --- the network's output under guidance -----------------------------------------------------------------------
class _Out:  # like diffusers' UNet2DConditionOutput (return_dict=True)
    def __init__(self, s):
        self.sample = s


def test_non_tensor_output_under_guidance_is_a_model_output_error():
    x, t = _xt()
    m = wrap_model(lambda x, t, cond: _Out(x), ld3_ext.VPLinear(), prediction="x0", guidance_scale=2.0)
    with pytest.raises(ModelOutputError, match="model returned _Out"):
        m.predict(x, t, cond=torch.ones(B), uncond=torch.zeros(B))
    plain = wrap_model(lambda x, t: _Out(x), ld3_ext.VPLinear(), prediction="x0")
    with pytest.raises(ModelOutputError, match="model returned _Out"):
        plain.predict(x, t)


def test_wrong_batch_under_guidance_is_a_model_output_error():
    x, t = _xt()
    m = wrap_model(lambda x, t, cond: x[:1], ld3_ext.VPLinear(), prediction="x0", guidance_scale=2.0)
    with pytest.raises(ModelOutputError, match=r"expected a batch of 4"):
        m.predict(x, t, cond=torch.ones(B), uncond=torch.zeros(B))


# --- NaN/Inf after the cast to the state's dtype ---------------------------------------------------------------
def _overflowing(x, t):
    return torch.full(x.shape, 1e5, dtype=torch.float32)  # finite in float32, Inf in float16


def test_output_overflowing_the_state_dtype_is_caught():
    m = wrap_model(_overflowing, ld3_ext.EDM(), prediction="eps", time_input="t")
    x = torch.randn(2, 3).half()
    with pytest.raises(ModelOutputError, match="NaN/Inf"):
        m.predict(x, torch.tensor(1.0))
    # deferred (as a solver's sample() queues them on CUDA): raised when the block ends
    with pytest.raises(ModelOutputError, match="NaN/Inf at step 3"):
        with m.deferred_output_checks():
            m.predict(x, torch.tensor(1.0), step=3)
    # check_output=False: the caller asked for no check
    off = wrap_model(_overflowing, ld3_ext.EDM(), prediction="eps", time_input="t", check_output=False)
    assert not torch.isfinite(off.predict(x, torch.tensor(1.0))[1]).all()
    # the same output for a float32 state is fine
    assert torch.isfinite(m.predict(x.float(), torch.tensor(1.0))[1]).all()


def test_functional_sample_on_float16_state_raises_on_overflow():
    sig = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    xh = (80 * torch.randn(2, 3, generator=torch.Generator().manual_seed(0))).half()

    def den(x, s):
        return torch.full(x.shape, 1e6, dtype=torch.float64)

    with pytest.raises(ModelOutputError, match="NaN/Inf at step 0"):
        ld3_ext.sample(den, xh, sig, solver="euler")


def test_uncond_without_guidance_is_refused_not_swallowed():
    """A network taking **kwargs swallowed uncond= when guidance_scale was not set: an unguided result with no
    sign.  Refused, as uncond_kwargs= is; guided, the same call runs."""
    def net(x, t, cond=None, **kw):
        return 0.1 * x + cond.reshape(-1, 1)
    x, t = _xt()
    cond, uncond = torch.ones(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    with pytest.raises(ValueError, match="uncond is the unconditional input of classifier-free guidance.*set "
                                         "guidance_scale"):
        wrap_model(net, ld3_ext.VPLinear(), prediction="eps")(x, t, cond=cond, uncond=uncond)
    with pytest.raises(ValueError, match="set guidance_scale"):
        wrap_model(net, ld3_ext.VPLinear(), prediction="eps", model_kwargs={"uncond": uncond})(x, t, cond=cond)
    guided = wrap_model(net, ld3_ext.VPLinear(), prediction="eps", guidance_scale=3.0)(x, t, cond=cond, uncond=uncond)
    # eps = u + 3 (c - u) with u = 0.1 x, c = 0.1 x + 1: 0.1 x + 3
    torch.testing.assert_close(guided, wrap_model(lambda x, t: 0.1 * x + 3.0, ld3_ext.VPLinear(), prediction="eps")(x, t))


@pytest.mark.parametrize("bad", [["cond"], [1], "ab", 3])
def test_model_kwargs_must_be_a_dict(bad):
    with pytest.raises(TypeError, match=f"model_kwargs must be a dict of keyword arguments for the network, got "
                                        f"{type(bad).__name__}"):
        wrap_model(lambda x, t: x, ld3_ext.EDM(), prediction="x0", model_kwargs=bad)


def test_an_output_on_another_device_is_named():
    """A network that returned its output on another device (the meta device stands in for a second one) failed in
    torch's item() ('cannot be called on meta tensors'), naming no model: now a ModelOutputError with both
    devices, from wrap_model's models, ld3_ext.sample's denoisers and under guidance."""
    edm = ld3_ext.EDM()
    grid = ld3_ext.discretizations.edm(edm, nfe=3)
    m = wrap_model(lambda x, t: x.to("meta"), edm, prediction="x0")
    with pytest.raises(ModelOutputError, match="model returned a tensor on meta at step 0, expected the input's "
                                               "device cpu"):
        ld3_ext.Euler().sample(m, torch.randn(2, 3), grid)
    with pytest.raises(ModelOutputError, match="tensor on meta"):
        ld3_ext.sample(lambda x, sigma: x.to("meta"), torch.randn(2, 3), torch.tensor([10.0, 1.0, 0.0]))
    guided = wrap_model(lambda x, t, cond: x.to("meta"), edm, prediction="x0", guidance_scale=2.0)
    with pytest.raises(ModelOutputError, match="tensor on meta"):
        guided(torch.randn(2, 3), torch.tensor(1.0), cond=torch.ones(2), uncond=torch.zeros(2))
