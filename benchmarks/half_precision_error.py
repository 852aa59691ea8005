"""How far float32/float16/bfloat16 states land from the float64 solve, per solver and noise schedule.

The model is the exact denoiser of data ~ N(mu, s^2) (so only the solver's arithmetic differs between
dtypes); the grid is 8 log-SNR-uniform steps.  Prints ||x_dtype - x_float64|| / ||x_float64|| per cell.

    python benchmarks/half_precision_error.py [--steps 8] [--batch 256]
"""
from __future__ import annotations

import argparse

import torch

import ld3_ext
from ld3_ext.discretizations import get_discretization
from ld3_ext.solvers import make_solver
from ld3_ext.testbeds import GaussianMixture

SCHEDULES = {"flow_matching": ld3_ext.FlowMatching, "vp_linear": ld3_ext.VPLinear, "edm": ld3_ext.EDM}
SOLVERS = ["dpmpp", "unipc", "ipndm", "euler"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gaussian_model(schedule, mu: float = 0.3, s: float = 0.5):
    """The exact denoiser of data ~ N(mu, s^2) per pixel, computed in float64 and rounded to x's dtype."""
    d = 3 * 8 * 8
    return GaussianMixture([[mu] * d], [[s] * d], event_shape=(3, 8, 8)).model(schedule, float64=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args()
    print(f"relative error against float64, {a.steps} log-SNR steps, batch {a.batch}x3x8x8")
    print(f"{'schedule':<14} {'solver':<7} " + " ".join(f"{str(d).split('.')[1]:>9}" for d in DTYPES))
    for sname, cls in SCHEDULES.items():
        sched = cls()
        model = gaussian_model(sched)
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn(a.batch, 3, 8, 8, dtype=torch.float64, generator=g) * sched.prior_std()
        t = get_discretization("logsnr", sched, a.steps).double()
        for name in SOLVERS:
            solver = make_solver(name)
            ref = solver.sample(model, x_T, t)
            errs = [float((solver.sample(model, x_T.to(d), t).double() - ref).norm() / ref.norm()) for d in DTYPES]
            print(f"{sname:<14} {name:<7} " + " ".join(f"{e:9.2e}" for e in errs))


if __name__ == "__main__":
    main()
