"""How far a float32 whole-sampler solve and its gradients are from the float64 solve of the same problem, on
the fused path and on the per-step reference path (tests/test_adjoint_sampler.py's float32 case, printed).

    python benchmarks/float32_gradient_error.py [--solvers ipndm3,dpmpp3] [--schedules vp_cosine,flow]

For each solver and schedule: the largest error of the output and of the gradients w.r.t. x_T, the timesteps and
the model timesteps, relative to that quantity's largest float64 entry.  The network is the test's tanh layer in
float32 with a float64 twin (same weights), the grid 8 random steps with decoupled model times.  Run against an
older build to see what a kernel change did to float32 accuracy (e.g. the CPU dot products' float block sums).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import BASE_SCHEDULES, random_decreasing_grid  # noqa: E402
from test_adjoint_sampler import SOLVERS, _grads, _model  # noqa: E402

WHAT = ("output", "x_T", "timesteps", "model_timesteps")


def errors(solver_name: str, schedule_name: str):
    """{path: [relative error per WHAT]} for the fused and reference float32 solves against float64."""
    schedule = BASE_SCHEDULES[schedule_name]()
    model = _model(schedule, dim=16, dtype=torch.float32)
    twin = _model(schedule, dim=16, dtype=torch.float64, weights_dtype=torch.float32)
    t = random_decreasing_grid(schedule.t_max, schedule.t_min, 8, seed=5, log=schedule_name == "edm").float().double()
    t[0], t[-1] = schedule.t_max, schedule.t_min
    tm = t.clone()
    tm[1:-1] = tm[1:-1] * 0.97
    x = schedule.prior_std() * torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    truth, _ = _grads(SOLVERS[solver_name]("reference"), twin, x.double(), t, tm)
    out = {}
    for path in ("fused", "reference"):
        got, _ = _grads(SOLVERS[solver_name](path), model, x, t, tm)
        out[path] = [float((a.double() - c).abs().max() / c.abs().max().clamp_min(1e-300)) for a, c in zip(got, truth)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solvers", default=",".join(sorted(SOLVERS)), help="names from test_adjoint_sampler.SOLVERS")
    ap.add_argument("--schedules", default="edm,vp_linear,vp_cosine,flow", help="names from conftest.BASE_SCHEDULES")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'schedule':<10} {'solver':<18} {'path':<10} " + " ".join(f"{w:>16}" for w in WHAT))
    worst = {}
    for schedule_name in args.schedules.split(","):
        for solver_name in args.solvers.split(","):
            for path, errs in errors(solver_name, schedule_name).items():
                print(f"{schedule_name:<10} {solver_name:<18} {path:<10} " + " ".join(f"{e:16.2e}" for e in errs))
                for w, e in zip(WHAT, errs):
                    worst[(path, w)] = max(worst.get((path, w), 0.0), e)
    for path in ("fused", "reference"):
        print(f"worst {path:<10}" + " ".join(f"{w}={worst[(path, w)]:.2e}" for w in WHAT))


if __name__ == "__main__":
    main()
