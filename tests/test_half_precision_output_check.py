"""A network whose float32 output is finite but beyond a float16 state's range is told so, not only that it
returned NaN/Inf (which its output, checked on its own, does not hold)."""
from __future__ import annotations

import pytest
import torch

import ld3_ext
from ld3_ext.wrappers import ModelOutputError


def test_float32_output_beyond_float16_range_is_named():
    model = ld3_ext.wrap_model(lambda x, t: x.float() * 1e5, ld3_ext.VPLinear(), prediction="eps")
    with pytest.raises(ModelOutputError,
                       match=r"float32 output is finite but exceeds the torch.float16 state's range \(largest 65504\)"):
        model.predict(torch.ones(2, 3, dtype=torch.float16), torch.tensor(0.5))


def test_nan_output_is_still_reported_as_nan():
    model = ld3_ext.wrap_model(lambda x, t: x.float() * float("nan"), ld3_ext.VPLinear(), prediction="eps")
    with pytest.raises(ModelOutputError, match="model returned NaN/Inf") as err:
        model.predict(torch.ones(2, 3, dtype=torch.float16), torch.tensor(0.5))
    assert "exceeds" not in str(err.value)


@pytest.mark.parametrize("scale, says", [(1e5, "float32 output is finite but exceeds the torch.float16 state's range"),
                                         (float("nan"), None)])
def test_deferred_checks_name_the_overflow_too(scale, says):
    """The deferred checks (a solver's sample() on CUDA) tell an overflow into the state's dtype from a NaN
    output, as the immediate check does."""
    model = ld3_ext.wrap_model(lambda x, t: x.float() * scale, ld3_ext.VPLinear(), prediction="eps")
    with pytest.raises(ModelOutputError, match="model returned NaN/Inf at step 3") as err:
        with model.deferred_output_checks():
            model.predict(torch.ones(2, 3, dtype=torch.float16), torch.tensor(0.5), step=3)
    assert (says in str(err.value)) if says else ("exceeds" not in str(err.value))
