"""The built-in digits models refuse bad input by name (they used to fail deep inside torch, or not at all)."""
import pytest
import torch

from ld3_ext.models.digits import load_digits_model, load_digits_net
from ld3_ext.models.digits_classifier import digits_split, load_digits_classifier


@pytest.mark.parametrize("load", [load_digits_net, load_digits_model, load_digits_classifier])
@pytest.mark.parametrize("bad", [torch.int64, torch.bool, "float32", None])
def test_loaders_name_a_dtype_that_is_not_a_float_dtype(load, bad):
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        load(dtype=bad)


@pytest.mark.parametrize("load", [load_digits_net, load_digits_model, load_digits_classifier])
@pytest.mark.parametrize("bad,error,match", [("nope", ValueError, "device 'nope' cannot be used"),
                                             ("cuda:x", ValueError, "device 'cuda:x' cannot be used"),
                                             (None, TypeError, "device must be a device name"),
                                             (1.5, TypeError, "device must be a device name")])
def test_loaders_name_a_device_that_is_not_one(load, bad, error, match):
    with pytest.raises(error, match=match):
        load(device=bad)


def test_loaders_take_a_device_object():
    assert load_digits_net(device=torch.device("cpu")).out.weight.device.type == "cpu"


def test_loaders_still_take_float64():
    net = load_digits_net(dtype=torch.float64)
    assert net.out.weight.dtype == torch.float64
    assert load_digits_classifier(dtype=torch.float64).head.weight.dtype == torch.float64


@pytest.mark.parametrize("shape", [(2, 1, 7, 7), (2, 49), (64,), (2, 3, 8, 8)])
def test_denoiser_names_x_of_the_wrong_size(shape):
    net = load_digits_net()
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 8, 8\] or \[B, 64\]"):
        net(torch.zeros(shape), torch.ones(shape[0] if len(shape) > 1 else 1))


def test_denoiser_flat_and_image_inputs_agree():
    net = load_digits_net()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.1, 1.0, 10.0])
    torch.testing.assert_close(net(x, s).reshape(3, 64), net(x.reshape(3, 64), s), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 1, 7, 7), (2, 49), (2, 64, 1, 1), (2, 8, 8)])
def test_classifier_names_x_of_the_wrong_shape(shape):
    c = load_digits_classifier()
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 8, 8\] or \[B, 64\]"):
        c(torch.zeros(shape))


def test_classifier_flat_and_image_inputs_agree():
    c = load_digits_classifier()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(c(x), c(x.reshape(3, 64)), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.25, float("nan")])
def test_digits_split_names_a_test_fraction_outside_0_1(bad):
    # 1.5 used to return an empty training set
    with pytest.raises(ValueError, match="test_fraction"):
        digits_split(test_fraction=bad)


@pytest.mark.parametrize("bad", [1.5, -1, "0"])
def test_digits_split_names_a_bad_seed(bad):
    with pytest.raises(ValueError, match="seed"):
        digits_split(seed=bad)


def test_digits_split_default_sizes():
    xtr, ytr, xte, yte = digits_split()
    assert xte.shape[0] == round(0.25 * 1797) and xtr.shape[0] + xte.shape[0] == 1797
    assert xtr.shape[1:] == (1, 8, 8) and ytr.shape == (xtr.shape[0],)
