"""LD3Trainer(device=...) names a device this torch cannot use when it is constructed: device="cuda" on a CPU-only
torch (or a GPU index that does not exist) failed in fit(), inside the teacher generation, with torch's own
"Torch not compiled with CUDA enabled" AssertionError, which names no argument."""
import pytest
import torch

import ld3_ext
from ld3_ext import testbeds


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
def test_unusable_cuda_device_is_named_at_construction():
    s = ld3_ext.EDM()
    model = testbeds.ring2d().model(s)
    with pytest.raises(ValueError, match=r"device='cuda' cannot be used"):
        ld3_ext.LD3Trainer(model, s, "dpmpp", nfe=4, device="cuda", progress=False)


def test_cpu_device_still_accepted():
    s = ld3_ext.EDM()
    model = testbeds.ring2d().model(s)
    tr = ld3_ext.LD3Trainer(model, s, "dpmpp", nfe=4, device="cpu", progress=False)
    assert tr.device == torch.device("cpu")


@pytest.mark.parametrize("device", [3, -1, "gpu0"])
def test_a_device_torch_cannot_parse_is_named(device):
    """torch.device(3) -- an accelerator index -- raised a bare RuntimeError ("Cannot access accelerator device when
    none is available") before the device check, naming no argument."""
    s = ld3_ext.EDM()
    model = testbeds.ring2d().model(s)
    with pytest.raises(ValueError, match=r"device=.* (names no torch device|cannot be used)"):
        ld3_ext.LD3Trainer(model, s, "dpmpp", nfe=4, device=device, progress=False)


@pytest.mark.parametrize("init", [None, {"t": 1.0}, object()])
def test_an_init_that_is_no_grid_is_named(init):
    """init=None (or another non-number) failed inside torch.as_tensor with "must be real number, not NoneType",
    naming no argument."""
    s = ld3_ext.EDM()
    model = testbeds.ring2d().model(s)
    with pytest.raises(TypeError, match=r"init must be a discretization name or a grid of timesteps"):
        ld3_ext.LD3Trainer(model, s, "dpmpp", nfe=4, init=init, progress=False)
