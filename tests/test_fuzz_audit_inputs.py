"""Inputs a robustness fuzz of the public API found unnamed or late (each failed inside torch or after a model call
before; each now names the argument)."""
import pytest
import torch

import ld3_ext
from ld3_ext.wrappers import ModelOutputError


def _model():
    return ld3_ext.wrap_model(lambda x, t: 0.1 * x, ld3_ext.VPLinear(), prediction="eps")


@pytest.mark.parametrize("t", ["0.5", None, b"1", object()])
def test_predict_names_a_time_that_is_not_a_number(t):
    with pytest.raises(TypeError, match="predict: t must be a number or a tensor"):
        _model().predict(torch.randn(2, 8), t)


def test_predict_names_a_time_on_another_device():
    """A meta time failed later as 'multistep_update: coef is on meta', naming an argument nobody passed."""
    with pytest.raises(ValueError, match="predict: t is on meta but x is on cpu"):
        _model().predict(torch.randn(2, 8), torch.tensor(0.5, device="meta"))
    out = _model().predict(torch.randn(2, 8), 0.5)  # a Python number and a CPU tensor stay accepted
    assert out[0].shape == (2, 8)


def test_a_sparse_model_output_is_a_model_output_error():
    """It failed inside the finite check with NotImplementedError naming aten::ne.Scalar on SparseCPU."""
    m = ld3_ext.wrap_model(lambda x, t: (0.1 * x).to_sparse(), ld3_ext.VPLinear(), prediction="eps")
    with pytest.raises(ModelOutputError, match="model returned a torch.sparse_coo tensor, expected a dense"):
        m.predict(torch.randn(2, 8), torch.tensor(0.5))


@pytest.mark.parametrize("callback", [5, "print"])
def test_sample_names_a_callback_that_cannot_be_called_before_any_model_call(callback):
    calls = []

    def denoiser(x, sigma):
        calls.append(1)
        return 0.5 * x
    with pytest.raises(TypeError, match="callback must be callable"):
        ld3_ext.sample(denoiser, torch.randn(2, 8), [10.0, 1.0, 0.0], callback=callback)
    assert not calls
