"""A torch.compile'd network is the same model as the network itself: same weights hash and name in teacher caches,
checkpoints and schedule files.  The compiled wrapper (OptimizedModule) holds the weights under "_orig_mod.", so its
hash differed and a teacher cache made before compiling was refused as made with other weights."""
import torch

from ld3_ext import EDM, wrap_model
from ld3_ext.training.teacher import model_identity


def test_compiled_module_has_the_identity_of_the_module():
    net = torch.nn.Linear(3, 3)
    plain = model_identity(wrap_model(net, EDM(), prediction="x0"))
    compiled = model_identity(wrap_model(torch.compile(net, backend="eager"), EDM(), prediction="x0"))
    assert compiled == plain
    assert plain["name"] == "Linear" and plain["hash_source"] == "state_dict"


def test_other_weights_still_differ_when_compiled():
    net, other = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    with torch.no_grad():
        other.weight.add_(1.0)
    a = model_identity(wrap_model(torch.compile(net, backend="eager"), EDM()))
    b = model_identity(wrap_model(torch.compile(other, backend="eager"), EDM()))
    assert a["weights_hash"] != b["weights_hash"]


def test_a_compiled_network_holding_a_diffusion_model_has_the_uncompiled_identity():
    """A DiffusionModel inside the compiled network is at "net._orig_mod.inner." in named_modules but at "net.inner."
    in the stripped keys: its legacy fn. copies were left out and the hash differed from the uncompiled network's."""
    import torch

    from ld3_ext import EDM, wrap_model
    from ld3_ext.training.teacher import state_dict_hash

    class Outer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t):
            return self.inner.fn(x, t)

    torch.manual_seed(0)
    outer = Outer(wrap_model(torch.nn.Linear(2, 2), EDM()))
    assert state_dict_hash(wrap_model(torch.compile(outer, backend="eager"), EDM())) == state_dict_hash(wrap_model(outer, EDM()))
