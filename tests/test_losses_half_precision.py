"""The built-in teacher-matching losses on float16/bfloat16 samples (a half-precision model, or a decoder
in half precision) are computed in float32: no overflow, and float32's digits."""
from __future__ import annotations

import pytest
import torch

from ld3_ext.training.losses import get_loss


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
