"""ld3_ext.sample with k-diffusion's own classifier-free guidance wrapper (k-diffusion audit): its denoisers take
``extra_args={"cond": c, "uncond": u, "cond_scale": s}`` themselves (k-diffusion's CFGDenoiser, A1111, older ComfyUI).
``uncond`` was refused as "guidance is off: set guidance_scale", an option sample() does not have."""
import pytest
import torch

import ld3_ext

pytestmark = pytest.mark.usefixtures("single_thread")


class CFGDenoiser(torch.nn.Module):
    """k-diffusion's CFG wrapper: one batched call of the inner denoiser on [uncond; cond]."""

    def forward(self, x, sigma, uncond, cond, cond_scale, **comfy_kw):  # ComfyUI adds model_options, seed
        x_in, sigma_in, cond_in = torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([uncond, cond])
        d = x_in / (1.0 + sigma_in.reshape(-1, 1) ** 2) + 0.1 * cond_in  # a denoiser D(x, sigma, cond) -> x0
        u, c = d.chunk(2)
        return u + (c - u) * cond_scale


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"])
def test_a_k_diffusion_cfg_denoiser_gets_its_extra_args(solver):
    den = CFGDenoiser()
    sig = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    x = 80.0 * torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ea = {"cond": torch.ones(2, 3, dtype=torch.float64), "uncond": torch.zeros(2, 3, dtype=torch.float64),
          "cond_scale": 5.0, "model_options": {}, "seed": 0}
    out = ld3_ext.sample(den, x, sig, solver=solver, extra_args=ea)
    ref = ld3_ext.sample(lambda xx, s: den(xx, s, ea["uncond"], ea["cond"], ea["cond_scale"]), x, sig, solver=solver)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_a_diffusion_model_still_refuses_uncond_unguided():
    """The DiffusionModel's own rule stands (a network taking **kwargs would swallow uncond), also through sample."""
    model = ld3_ext.wrap_model(lambda x, s, **kw: x / (1.0 + s.reshape(-1, 1) ** 2), ld3_ext.EDM(), prediction="edm")
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="uncond is the unconditional input of classifier-free guidance"):
        ld3_ext.sample(model, x, [80.0, 1.0, 0.0], extra_args={"uncond": torch.zeros(2, 3, dtype=torch.float64)})


@pytest.mark.parametrize("solver", ["euler", "dpmpp_3m", "unipc"])
def test_a_denoiser_may_write_its_sigma_in_place(solver):
    """k-diffusion hands each call a sigma tensor of its own (sigma * s_in); an expanded view of the grid value
    raised "more than one element of the written-to tensor refers to a single memory location" on an in-place op."""
    def den(x, sigma):
        sigma.clamp_(min=1e-3)  # some wrappers guard their log(sigma) in place
        return x / (1.0 + sigma.reshape(-1, 1) ** 2)

    sig = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    x = 80.0 * torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = ld3_ext.sample(den, x, sig, solver=solver)
    ref = ld3_ext.sample(lambda xx, s: xx / (1.0 + s.reshape(-1, 1) ** 2), x, sig, solver=solver)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(sig, torch.tensor([80.0, 10.0, 2.0, 0.5, 0.0], dtype=torch.float64))  # the caller's grid
