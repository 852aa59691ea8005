#!/usr/bin/env python
"""digits-FD of a learned schedule, the hand-made grids and the teacher, over several noise seeds.

    python benchmarks/digits_fd_vs_teacher.py --schedule runs/digits/schedule.json [--n 2048]
        [--seeds 10000 777] [--json PATH]

Why: ``ld3 eval`` scores 256 samples, where digits-FD is biased upward and moves by a few points
with the seed; this script shows how the schedules rank with more samples and against the teacher
(the 20-NFE solve LD3 is trained to match).  The digits model, the solver and the network times are
the ones the schedule file records.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from ld3_ext.baselines import baseline_timesteps
from ld3_ext.discretizations import get_discretization, logsnr_uniform
from ld3_ext.metrics import digits_fd
from ld3_ext.models import load_model
from ld3_ext.schedule_file import load_schedule
from ld3_ext.solvers import make_solver


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedule", required=True, help="a schedule file learned on --model digits")
    ap.add_argument("--n", type=int, default=2048, help="samples per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[10000, 777])
    ap.add_argument("--teacher-nfe", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, schedule = load_model("digits")
    learned = load_schedule(args.schedule)
    solver = learned.solver()
    steps = solver.steps_for_nfe(learned.nfe)
    grids = {name: get_discretization(name, schedule, steps) for name in ("logsnr", "edm")}
    grids["dmn"] = baseline_timesteps("dmn", schedule, steps)
    grids["ld3"] = learned.timesteps
    teacher_solver = make_solver("unipc", order=3)
    rows = []
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        x_T = schedule.prior_std() * torch.randn(args.n, *model.sample_shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            teacher = teacher_solver.sample(model, x_T, logsnr_uniform(schedule, args.teacher_nfe))
            row = {"seed": seed, "n": args.n, "teacher": digits_fd(teacher.float())}
            for name, t in grids.items():
                tm = learned.model_timesteps if name == "ld3" else None
                x = solver.sample(model, x_T, t, model_timesteps=tm)
                row[name] = digits_fd(x.float())
                row[name + "_rmse"] = float((x - teacher).flatten(1).square().mean(1).sqrt().mean())
        rows.append(row)
        print(f"seed {seed}, n {args.n}, NFE {learned.nfe}: digits-FD " +
              "  ".join(f"{k} {row[k]:.2f}" for k in ["teacher", *grids]) + "   teacher-RMSE " +
              "  ".join(f"{k} {row[k + '_rmse']:.4f}" for k in grids))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"schedule": os.path.abspath(args.schedule), "solver": solver.config(), "nfe": learned.nfe,
                       "rows": rows}, f, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
