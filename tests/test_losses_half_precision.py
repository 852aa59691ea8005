"""The teacher-matching losses on float16/bfloat16 samples (a half-precision model, or a decoder
in half precision) are computed in float32: no overflow, and float32's digits."""
from __future__ import annotations

import pytest
import torch

from ld3_ext.training.losses import LPIPSLoss, get_loss


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["l2", "l1", "pseudo_huber"])
def test_half_precision_losses_match_float32(name, dtype):
    g = torch.Generator().manual_seed(0)
    # a decoded 3x256x256 image at an RMS error of 0.6: ||pred - target||^2 ~ 7e4 > float16's largest 65504
    pred = (0.6 * torch.randn(2, 3, 256, 256, generator=g)).to(dtype)
    target = torch.zeros(2, 3, 256, 256, dtype=dtype)
    loss = get_loss(name)
    want = loss(pred.double(), target.double())
    got = loss(pred, target)
    assert got.shape == (2,) and bool(torch.isfinite(got).all())
    # measured: <= 1.4e-7 (float32 sums of the exact half differences); rounding to float16 alone is 5e-4
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_half_precision_loss_gradient_reaches_a_half_sample():
    pred = (0.6 * torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))).half().requires_grad_()
    get_loss("pseudo_huber")(pred, torch.zeros_like(pred)).sum().backward()
    want = pred.detach().double() / pred.detach().double().flatten(1).norm(dim=1).reshape(2, 1, 1, 1)
    assert pred.grad.dtype == torch.float16
    torch.testing.assert_close(pred.grad.double(), want, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lpips_on_half_samples_keeps_its_network_precision(dtype):
    class Float32Distance(torch.nn.Module):  # a stand-in for lpips.LPIPS: float32 weights, [B, 1, 1, 1] out
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((1,), 1.0 / 3.0))

        def forward(self, a, b):
            return (self.w * (a - b).square()).mean((1, 2, 3), keepdim=True)

    loss = LPIPSLoss(net=Float32Distance())
    pred = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    target = torch.zeros_like(pred)
    want = loss(pred.float(), target.float())
    got = loss(pred, target)
    # the network's float32 value as it is (before: rounded to the sample's dtype, 5e-4 / 4e-3 off)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_lpips_network_follows_the_samples_device():
    """The LPIPS network is built on the CPU; a trainer on a GPU hands it GPU samples (it failed on the device
    mismatch).  The meta device stands in for the GPU here."""
    class Distance(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((1,), 0.5))

        def forward(self, a, b):
            return (self.w * (a - b).square()).mean((1, 2, 3), keepdim=True)

    loss = LPIPSLoss(net=Distance())
    pred = torch.randn(2, 3, 4, 4, device="meta")
    out = loss(pred, torch.zeros_like(pred))
    assert out.shape == (2,) and out.device.type == "meta" and loss.net.w.device.type == "meta"
    assert not loss.net.w.requires_grad  # still frozen
