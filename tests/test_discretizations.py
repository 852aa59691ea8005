"""Baseline time grids (LD3.md section 4)."""
from __future__ import annotations


import pytest
import torch

import ld3_ext
from ld3_ext import discretizations as D
from _oracles import load_kdiffusion_sampling
from conftest import BASE_SCHEDULES

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULES = {
    **BASE_SCHEDULES,
    "flow_shift3": lambda: ld3_ext.FlowMatching(shift=3.0),
    "flow_shift0.3": lambda: ld3_ext.FlowMatching(shift=0.3),
}


@pytest.mark.parametrize("sname", sorted(SCHEDULES))
@pytest.mark.parametrize("disc", sorted(D.DISCRETIZATIONS))
@pytest.mark.parametrize("nfe", [1, 2, 3, 7, 10, 50, 1000])
def test_grid_invariants(sname, disc, nfe):
    s = SCHEDULES[sname]()
    t = D.get_discretization(disc, s, nfe)
    assert t.dtype == torch.float64 and t.shape == (nfe + 1,)
    assert float(t[0]) == s.t_max and float(t[-1]) == s.t_min  # exact end points
    assert torch.all(t[1:] < t[:-1]), t
    assert float(t.min()) >= s.t_min and float(t.max()) <= s.t_max
    # the grid is accepted by every solver's validation
    ld3_ext.solvers.validate_timesteps(s, t)


@pytest.mark.parametrize("disc", sorted(D.DISCRETIZATIONS))
@pytest.mark.parametrize("schedule", [ld3_ext.EDM(1.0, 1.0 + 1e-13), ld3_ext.VPLinear(t_min=0.5, t_max=0.5 + 1e-13)],
                         ids=["edm", "vp_linear"])
def test_a_range_too_narrow_for_nfe_is_refused(disc, schedule):
    """1000 steps over a range of a few hundred float64 times: time_uniform, time_quadratic and logsnr returned a grid
    with hundreds of repeated times (the docstring promises t_0 > ... > t_N), edm refused it."""
    with pytest.raises(ValueError, match="not finite and strictly decreasing"):
        D.get_discretization(disc, schedule, 1000)


def test_time_uniform_and_quadratic_formulas():
    s = ld3_ext.VPLinear()
    n = 8
    i = torch.arange(n + 1, dtype=torch.float64)
    assert torch.allclose(D.time_uniform(s, n), s.t_max + i / n * (s.t_min - s.t_max), rtol=1e-15)
    # LD3's "time_quadratic" is quadratic in the index (not DPM-Solver's linspace in sqrt t)
    assert torch.allclose(D.time_quadratic(s, n), s.t_min + (s.t_max - s.t_min) * ((n - i) / n) ** 2, rtol=1e-14)


@pytest.mark.parametrize("sname", ["edm", "vp_linear", "vp_discrete"])
def test_logsnr_is_uniform_in_lambda(sname):
    s = SCHEDULES[sname]()
    t = D.logsnr_uniform(s, 9)
    lam = s.lambda_(t)
    assert torch.allclose(lam[1:] - lam[:-1], torch.full((9,), (s.lambda_max - s.lambda_min) / 9, dtype=torch.float64),
                          rtol=1e-10)


@pytest.mark.parametrize("sname", ["vp_linear", "vp_discrete"])
def test_edm_rho_spacing_in_edm_sigma(sname):
    """For VP schedules the rho = 7 polynomial is in sigma/alpha (not in t as LD3's code does)."""
    s = SCHEDULES[sname]()
    n, rho = 6, 7.0
    sig = s.edm_sigma(D.edm(s, n))
    u = sig ** (1 / rho)
    assert torch.allclose(u[1:] - u[:-1], torch.full((n,), float(u[1] - u[0]), dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize("nfe", [1, 4, 10, 25])
@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_edm_matches_kdiffusion_karras_sigmas(nfe, rho):
    K = load_kdiffusion_sampling()
    s = ld3_ext.EDM(0.002, 80.0)
    ref = K.get_sigmas_karras(nfe + 1, 0.002, 80.0, rho=rho, device="cpu").double()[:-1]  # drop the appended 0
    ours = D.edm(s, nfe, rho=rho)
    # k-diffusion builds the ramp in float32: an error of ~eps32 * sigma_max^(1/rho) in sigma^(1/rho) is a
    # relative error of rho * eps32 * (sigma_max/sigma)^(1/rho) in sigma
    bound = 4 * rho * torch.finfo(torch.float32).eps * (80.0 / ours) ** (1 / rho)
    assert torch.all(((ours - ref) / ref).abs() <= bound)
    ref_exp = K.get_sigmas_exponential(nfe + 1, 0.002, 80.0, device="cpu").double()[:-1]
    assert torch.allclose(D.logsnr_uniform(s, nfe), ref_exp, rtol=1e-6)


def test_edm_float64_values():
    s = ld3_ext.EDM()
    t = D.edm(s, 10)
    i = torch.arange(11, dtype=torch.float64)
    ref = (80.0 ** (1 / 7) + i / 10 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert torch.allclose(t, ref, rtol=1e-14)


def test_flow_shift():
    s = ld3_ext.FlowMatching(shift=3.0)
    t = D.time_uniform(s, 4)
    base = D.time_uniform(ld3_ext.FlowMatching(), 4)
    f = lambda u: 3.0 * u / (1.0 + 2.0 * u)  # noqa: E731
    # the SD3 shift, mapped back onto [t_min, t_max]
    ref = s.t_min + (f(base) - f(s.t_min)) * (s.t_max - s.t_min) / (f(s.t_max) - f(s.t_min))
    assert torch.allclose(t, ref, rtol=1e-14)
    assert torch.all(t[1:-1] > base[1:-1])  # shift > 1 spends more steps at high noise


def test_bad_arguments():
    s = ld3_ext.EDM()
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="nfe must be an int >= 1"):
            D.time_uniform(s, bad)
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        D.logsnr_uniform("edm", 4)
    with pytest.raises(ValueError, match="rho must be > 0"):
        D.edm(s, 4, rho=0.0)
    with pytest.raises(ValueError, match="discretization must be one of"):
        D.get_discretization("gits", s, 4)


def test_unhashable_discretization_name_is_named():
    # a list/dict name failed the dict lookup as "unhashable type: 'list'", naming nothing
    for bad in (["edm"], {"name": "edm"}):
        with pytest.raises(ValueError, match=r"discretization must be one of"):
            D.get_discretization(bad, ld3_ext.EDM(), 5)
