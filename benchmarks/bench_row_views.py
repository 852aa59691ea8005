"""Per-step solver loop: coefficient rows as t[i, 0, :p] views vs whole rows from one unbind.

    python benchmarks/bench_row_views.py [--shape 1x4] [--threads 1] [--rounds 15]

Times a 10-step DPM-Solver++(3M) loop of fused updates (model 0.9*x) with its backward w.r.t. the
timesteps and x, in one process, round-robin: each step's coefficients taken as ``table[i, 0, :1+p]``
(three views, three autograd nodes a step) and as ``table.select(1, 0).unbind(0)[i]`` (what the
solvers' per-step loops do, ``solvers.base.table_rows``; the update reads the first 1 + p entries).
"""
from __future__ import annotations

import argparse

import torch

from round_robin import medians_us, native_module

from ld3_ext import ops
from ld3_ext.coefficients import SolverSpec, step_orders
from ld3_ext.schedules import EDM


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1x4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    native_module(args.threads)
    schedule, spec, n = EDM(), SolverSpec("dpmpp", 3), 10
    steps = torch.linspace(schedule.t_max ** (1 / 7), schedule.t_min ** (1 / 7), n + 1, dtype=torch.float64) ** 7
    orders = step_orders(spec, n)
    x0 = torch.randn(tuple(int(v) for v in args.shape.split("x")), requires_grad=True)

    def loop(style):
        def run():
            t = steps.detach().requires_grad_()
            table = ops.coefficient_table(schedule, t, spec, "fused")
            rows = table.select(1, 0).unbind(0)
            x, hist = x0, []
            for i in range(n):
                hist.insert(0, 0.9 * x)
                del hist[3:]
                p = orders[i]
                coef = rows[i] if style == "rows" else table[i, 0, : 1 + p]
                x = ops.multistep_update(x, coef, hist[:p], "fused")
            torch.autograd.grad(x.sum(), [t, x0])
        return run

    res = medians_us({"views t[i, 0, :p]": (None, loop("views")), "whole rows": (None, loop("rows"))},
                     rounds=args.rounds, inner=50)
    print(f"shape {args.shape}, {args.threads} thread(s): 10-step loop fwd + bwd, median us")
    for name, us in res.items():
        print(f"  {name:18s} {us:9.1f}")
    print(f"  views / rows       {res['views t[i, 0, :p]'] / res['whole rows']:9.2f}")


if __name__ == "__main__":
    main()
