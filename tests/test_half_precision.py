"""Accuracy of half-precision states against the float64 solve, with a perfect network (the exact Gaussian
denoiser computed in float64, rounded to the state dtype): what is left is the solvers' arithmetic.
The bounds are those README's "Half-precision states" reports, with margin; iPNDM's larger error on
flow matching is bounded too, so a regression there shows."""
from __future__ import annotations

import pytest
import torch

import ld3_ext
from ld3_ext.discretizations import get_discretization
from ld3_ext.solvers import make_solver
from ld3_ext.testbeds import GaussianMixture

D = 3 * 8 * 8
SCHEDULES = {"flow_matching": ld3_ext.FlowMatching, "vp_linear": ld3_ext.VPLinear, "edm": ld3_ext.EDM}
# (float32, float16, bfloat16) bounds on the relative error
DATA_PREDICTION = (1e-6, 2e-3, 1.5e-2)
IPNDM = {"flow_matching": (3e-5, 0.1, 0.3), "vp_linear": (2e-6, 4e-3, 3e-2), "edm": (2e-6, 4e-3, 3e-2)}


def _relative_errors(schedule_name, solver_name, backend):
    sched = SCHEDULES[schedule_name]()
    model = GaussianMixture([[0.3] * D], [[0.5] * D], event_shape=(3, 8, 8)).model(sched, float64=True)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(64, 3, 8, 8, dtype=torch.float64, generator=g) * sched.prior_std()
    t = get_discretization("logsnr", sched, 8).double()
    solver = make_solver(solver_name, backend=backend)
    ref = solver.sample(model, x_T, t)
    return [float((solver.sample(model, x_T.to(d), t).double() - ref).norm() / ref.norm())
            for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("solver_name", ["dpmpp", "unipc", "euler", "ipndm"])
def test_half_precision_states_stay_close_to_float64(solver_name, schedule_name, backend):
    errs = _relative_errors(schedule_name, solver_name, backend)
    bounds = IPNDM[schedule_name] if solver_name == "ipndm" else DATA_PREDICTION
    for e, b, name in zip(errs, bounds, ("float32", "float16", "bfloat16")):
        assert e < b, f"{solver_name} on {schedule_name} in {name}: relative error {e:.3g} >= {b:g}"
    # the lower precisions lose more: a check that the dtype really reached the solve
    assert errs[0] < errs[1] < errs[2]
