"""ld3_ext.sample with a half-precision k-diffusion model (k-diffusion audit): k-diffusion hands the denoiser sigma in
x's dtype (``sigma * x.new_ones(B)``), and its model wrappers (CompVisDenoiser, VDenoiser, layers.Denoiser) scale x
by c_in(sigma) before the network.  sample() handed a float32 sigma to a half state: the network's input became
float32 and a half network failed with torch's "mat1 and mat2 must have the same dtype"."""
import pytest
import torch

import ld3_ext

pytestmark = pytest.mark.usefixtures("single_thread")


class _KDiffusionStyleDenoiser(torch.nn.Module):
    """c_skip x + c_out F(c_in x, sigma), as k-diffusion's wrappers compute it, around a network in its own dtype."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(3, 3).to(dtype)

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1)
        c_in = 1.0 / (s ** 2 + 1.0).sqrt()
        return x / (s ** 2 + 1.0) + s * c_in * self.net(x * c_in)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "dpmpp_3m", "heun"])
def test_a_half_network_gets_sigma_in_the_state_dtype(dtype, solver):
    den = _KDiffusionStyleDenoiser(dtype)
    seen = []
    den.register_forward_pre_hook(lambda m, args: seen.append(args[1].dtype))
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0])  # float32, as k-diffusion's get_sigmas_*
    x = (80.0 * torch.randn(2, 3, generator=torch.Generator().manual_seed(1))).to(dtype)
    with torch.no_grad():
        out = ld3_ext.sample(den, x, sigmas, solver=solver)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert set(seen) == {dtype}
