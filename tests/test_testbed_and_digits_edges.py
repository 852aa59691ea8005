"""Edges of the analytic test beds and the built-in digits network found by review, each reproduced first."""
import pytest
import torch

import ld3_ext
from ld3_ext import testbeds
from ld3_ext.models.digits import load_digits_net


@pytest.mark.parametrize("make", [testbeds.ring2d, testbeds.digits64, testbeds.random3072],
                         ids=["ring2d", "digits64", "random3072"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gmm_denoiser_is_finite_and_accurate_for_half_states_at_high_noise(make, dtype):
    """|x - alpha mu| > 256 overflowed the squared distance in float16: NaN for most rows at EDM's sigma = 80."""
    mix, s = make(), ld3_ext.EDM()
    x = mix.prior_noise(s, 64, generator=torch.Generator().manual_seed(0))
    for sigma in (80.0, 1.0, 0.05):
        alpha, sig = torch.tensor(1.0, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
        xh = x.to(dtype)
        # the reference reads the same rounded state (in 3072 dimensions bfloat16's rounding of x alone moves the
        # component weights): what is compared is the denoiser's own arithmetic
        ref = mix.denoise(xh.double(), alpha.to(dtype).double(), sig.to(dtype).double())
        got = mix.denoise(xh, alpha.to(dtype), sig.to(dtype))
        assert got.dtype == dtype and bool(torch.isfinite(got).all())
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]  # float32 arithmetic, then the output's rounding
        assert float((got.double() - ref).abs().max()) <= tol * (1.0 + float(ref.abs().max()))


def test_gmm_half_precision_sample_runs():
    mix, s = testbeds.digits64(), ld3_ext.EDM()
    x = mix.prior_noise(s, 64, generator=torch.Generator().manual_seed(0)).half()
    t = ld3_ext.discretizations.get_discretization("edm", s, 6)
    out = ld3_ext.DPMSolverPP(order=3).sample(mix.model(s), x, t)
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())


def test_digits_net_refuses_an_integer_state():
    with pytest.raises(TypeError, match="floating"):
        load_digits_net()(torch.zeros(3, 64, dtype=torch.long), 1.0)


def test_digits_net_at_sigma_zero_returns_its_input():
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = load_digits_net()(x, 0.0)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_digits_net_takes_an_empty_batch():
    out = load_digits_net()(torch.randn(0, 1, 8, 8), 1.0)
    assert out.shape == (0, 1, 8, 8)
