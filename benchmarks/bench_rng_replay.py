"""What the whole-sampler node's generator snapshots cost a sample + backward (benchmark case 3).

    python benchmarks/bench_rng_replay.py [--shape 64x3x32x32] [--threads 1] [--rounds 30]

The fused node takes ``torch.get_rng_state()`` (and, on CUDA, the device generator's) before each network
evaluation, so that a backward that evaluates the network again replays its random numbers (dropout;
``ld3_ext/adjoint.py``).  This times a 10-step DPM-Solver++(3M) sample with the trivial model (x0 = 0.9 x) and its
backward w.r.t. the timesteps with the snapshots as shipped and with them replaced by a no-op, in one process and
round-robin.  Run with the malloc guard of bench_kernels.py to compare with its numbers.
"""
from __future__ import annotations

import argparse

import torch

from round_robin import medians_us, native_module

import ld3_ext
from ld3_ext import adjoint
from ld3_ext.schedules import EDM


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64x3x32x32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--inner", type=int, default=10)
    args = ap.parse_args(argv)
    native_module(args.threads)
    schedule = EDM()
    model = ld3_ext.wrap_model(lambda xx, tt: 0.9 * xx, schedule, prediction="x0", check_output=False)
    steps = torch.linspace(schedule.t_max ** (1 / 7), schedule.t_min ** (1 / 7), 11, dtype=torch.float64) ** 7
    x = torch.randn(tuple(int(v) for v in args.shape.split("x")))
    gout = torch.randn_like(x)
    solver = ld3_ext.DPMSolverPP(order=3, backend="fused")

    def run():
        tt = steps.detach().requires_grad_()
        torch.autograd.grad(solver.sample(model, x, tt), tt, gout)

    shipped = adjoint._rng_snapshot

    def use(snapshot):
        def setup():
            adjoint._rng_snapshot = snapshot
        return setup

    try:
        res = medians_us({"snapshots": (use(shipped), run), "none": (use(lambda device: None), run)},
                         args.rounds, args.inner)
    finally:
        adjoint._rng_snapshot = shipped
    print(f"shape {args.shape}, {args.threads} thread(s), medians of {args.rounds} rounds of {args.inner}: "
          "µs per fused sample + backward")
    print(f"  with snapshots {res['snapshots']:9.1f}   without {res['none']:9.1f}   "
          f"ratio {res['snapshots'] / res['none']:5.3f}")


if __name__ == "__main__":
    main()
