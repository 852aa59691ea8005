"""Defects found by review (training keys, wrapper arguments, determinism), each reproduced before its fix."""
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
