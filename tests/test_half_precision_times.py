"""Half-precision times (half-precision audit): a float16/bfloat16 time or grid is converted in float64 and an end
rounded past the schedule's range by the half round-off is that end.  Before, the network's time and alpha/sigma
were computed in half (SD's index 999 read as 1000), FlowMatching's bfloat16 t_max (0.999 -> 1.0, alpha = 0) gave
x0 = inf from model(x, t), solvers refused half grids on VPCosine and FlowMatching, ld3_ext.sample refused a half
grid through to_denoiser, and a callable time_input could not hand a half network a half time."""
import pytest
import torch

import ld3_ext
from ld3_ext import discretizations

HALF = [torch.float16, torch.bfloat16]


def _recording(prediction_out=None):
    seen = []

    def net(x, tt):
        seen.append(tt.detach().clone())
        return torch.tanh(x) * 0.1 if prediction_out is None else prediction_out(x)
    return net, seen


@pytest.mark.parametrize("dtype", HALF)
def test_a_half_time_is_converted_in_float64(dtype):
    sched = ld3_ext.VPDiscrete.linear(0.00085, 0.012)  # Stable Diffusion's: the network reads the 0..999 index
    net, seen = _recording()
    model = ld3_ext.wrap_model(net, sched, prediction="eps")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for v in (0.5, 0.75, 0.999):
        th = torch.tensor(v, dtype=dtype)
        x0_half, eps_half = model.predict(x, th)
        x0_64, eps_64 = model.predict(x, th.double())
        torch.testing.assert_close(x0_half, x0_64, rtol=0, atol=0)  # alpha/sigma of the same value, in float64
        torch.testing.assert_close(eps_half, eps_64, rtol=0, atol=0)
        want = sched.model_index(th.double()).float()
        assert seen[-2].dtype == torch.float32 and torch.equal(seen[-2], want.expand(2)), (v, seen[-2], want)
    # the half computation read model_index(bf16 0.5) as 500 (float64 of the same time: 499)
    assert abs(float(seen[0][0]) - float(sched.model_index(torch.tensor(0.5, dtype=dtype).double()))) < 1e-3


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sched", [ld3_ext.FlowMatching(), ld3_ext.VPCosine()], ids=["flow", "vp_cosine"])
def test_a_half_time_rounded_past_t_max_is_t_max(sched, dtype):
    model = ld3_ext.wrap_model(lambda x, tt: torch.tanh(x) * 0.1, sched, prediction="eps")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    th = torch.tensor(sched.t_max, dtype=dtype)
    want = model.predict(x, torch.tensor(sched.t_max, dtype=torch.float64))[0]
    for got in (model(x, th), model.predict(x, th)[0]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside the schedule's times"):  # far past the end: still refused
        model(x, torch.tensor(sched.t_max + 0.05, dtype=dtype))


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sched", [ld3_ext.FlowMatching(), ld3_ext.VPCosine(), ld3_ext.EDM()],
                         ids=["flow", "vp_cosine", "edm"])
def test_solvers_take_a_half_grid_as_its_float64_snapped_image(sched, dtype, backend):
    model = ld3_ext.wrap_model(lambda x, tt: torch.tanh(x) * 0.1, sched, prediction="eps")
    grid = discretizations.logsnr_uniform(sched, 4).to(dtype)
    snapped = grid.double().clamp(sched.t_min, sched.t_max)
    x = (sched.prior_std() * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))).to(dtype)
    solver = ld3_ext.DPMSolverPP(2, backend=backend)
    t = grid.clone().requires_grad_()
    y = solver.sample(model, x, t)
    torch.testing.assert_close(y, solver.sample(model, x, snapped), rtol=0, atol=0)
    y.float().sum().backward()
    assert t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all()
    with pytest.raises(ValueError, match="must lie in the schedule's range"):  # beyond the round-off: refused
        solver.sample(model, x, torch.cat([grid[:1] + 0.1 * sched.t_max, grid[1:]]))


@pytest.mark.parametrize("dtype", HALF)
def test_sample_through_to_denoiser_takes_a_half_grid(dtype):
    sched = ld3_ext.VPDiscrete.linear(0.00085, 0.012)
    model = ld3_ext.wrap_model(lambda x, tt: torch.tanh(x) * 0.1, sched, prediction="eps")
    sig = sched.edm_sigma(discretizations.logsnr_uniform(sched, 5)).to(dtype)  # sigma_max 14.6146 rounds up
    assert float(sig[0]) > float(sched.edm_sigma(torch.tensor(sched.t_max, dtype=torch.float64)))
    x = (torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * float(sig[0])).to(dtype)
    via_denoiser = ld3_ext.sample(ld3_ext.to_denoiser(model), x, sig, solver="euler")
    direct = ld3_ext.sample(model, x, sig, solver="euler")
    assert via_denoiser.dtype == dtype and torch.isfinite(via_denoiser.float()).all()
    if dtype == torch.float16:
        # the same arithmetic in float16: bit for bit (a 0.2 % change of the denoiser's input is ~16 ulps here)
        torch.testing.assert_close(via_denoiser, direct, rtol=0, atol=0)
    else:
        # bfloat16: within one bf16 ulp of each value (one entry differs by one ulp; 0.2 % off is 2 ulps)
        ulp = (torch.nextafter(direct.abs(), torch.full_like(direct, float("inf"))) - direct.abs()).float()
        diff = (via_denoiser.float() - direct.float()).abs()
        assert bool((diff <= ulp).all()), (float(diff.max()), float((diff / ulp).max()))


class _HalfNet(torch.nn.Module):
    """A float16 network with a learned time embedding: it needs its time in float16."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.temb = torch.nn.Linear(8, 8), torch.nn.Linear(1, 8)

    def forward(self, x, tt):
        return torch.tanh(self.body(x) + self.temb(tt[:, None])) * 0.1


def test_a_callable_time_input_returning_half_is_passed_as_it_is():
    sched = ld3_ext.VPLinear()
    net = _HalfNet().half()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(4)).half()
    grid = discretizations.logsnr_uniform(sched, 4)
    with pytest.raises(RuntimeError, match="dtype"):  # a named time input stays float32 (never below it)
        ld3_ext.DPMSolverPP(2).sample(ld3_ext.wrap_model(net, sched, prediction="eps", time_input="t"), x, grid)
    model = ld3_ext.wrap_model(net, sched, prediction="eps", time_input=lambda t: t.half())
    y = ld3_ext.DPMSolverPP(2).sample(model, x, grid)
    want = ld3_ext.DPMSolverPP(2).sample(
        ld3_ext.wrap_model(lambda xx, tt: net.float()(xx.float(), tt.float()).half(), sched, prediction="eps"),
        x, grid)
    net.half()
    assert y.dtype == torch.float16 and torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
