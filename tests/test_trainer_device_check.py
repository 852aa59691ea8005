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
