"""wrap_model(fn, ..., name="...") identifies a network without weights (DiffusionModel's docstring: "how a network
without weights is identified in teacher caches and checkpoints"); the trainer still warned that the model was
identified by that name and asked for model_name=...  Without a name (the function's own) the warning stays."""
import warnings

import pytest

from ld3_ext import EDM, wrap_model
from ld3_ext.training.teacher import model_identity


def _net(x, t):
    return 0.9 * x


def test_explicit_wrap_model_name_identifies_without_a_warning():
    m = wrap_model(_net, EDM(), prediction="x0", name="toy-net@v1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ident = model_identity(m)
    assert ident["name"] == "toy-net@v1" and ident["hash_source"] == "name"


def test_default_function_name_still_warns():
    m = wrap_model(_net, EDM(), prediction="x0")
    with pytest.warns(UserWarning, match="no weights to hash"):
        ident = model_identity(m)
    assert ident["name"] == "_net"


def test_compiled_weightless_module_without_a_name_still_warns():
    """A torch.compile'd module is named by its network's class (Analytic), which differs from OptimizedModule: the
    check for a name given to wrap_model read that as one, and a weightless compiled network got no warning."""
    import torch

    class Analytic(torch.nn.Module):
        def forward(self, x, t):
            return 0.9 * x

    m = wrap_model(torch.compile(Analytic()), EDM(), prediction="x0")
    with pytest.warns(UserWarning, match="no weights to hash"):
        ident = model_identity(m)
    assert ident["name"] == "Analytic"
