"""What Python's cyclic garbage collector costs a whole sample + backward (benchmark case 3).

    python benchmarks/bench_sampler_gc.py [--shape 1x4] [--threads 1] [--rounds 30]

A 10-step DPM-Solver++(3M) sample with the trivial model (x0 = 0.9 x) and its backward w.r.t. the
timesteps, fused and reference backends, each with the collector on and off, in one process and
round-robin.  Why: the fused path keeps each step's states and model graphs alive until the
backward, so young-generation collections find survivors to traverse; the library leaves the
collector alone (it is interpreter-wide state), this measures what that choice costs.
"""
from __future__ import annotations

import argparse
import gc

import torch

from round_robin import medians_us, native_module

import ld3_ext
from ld3_ext.schedules import EDM


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1x4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--inner", type=int, default=20)
    args = ap.parse_args(argv)
    native_module(args.threads)
    schedule = EDM()
    model = ld3_ext.wrap_model(lambda xx, tt: 0.9 * xx, schedule, prediction="x0", check_output=False)
    steps = torch.linspace(schedule.t_max ** (1 / 7), schedule.t_min ** (1 / 7), 11, dtype=torch.float64) ** 7
    x = torch.randn(tuple(int(v) for v in args.shape.split("x")))
    gout = torch.randn_like(x)

    def sample(backend):
        solver = ld3_ext.DPMSolverPP(order=3, backend=backend)

        def run():
            tt = steps.detach().requires_grad_()
            torch.autograd.grad(solver.sample(model, x, tt), tt, gout)
        return run

    variants = {f"{b}, gc {'on' if on else 'off'}": (gc.enable if on else gc.disable, sample(b))
                for b in ("fused", "reference") for on in (True, False)}
    try:
        res = medians_us(variants, args.rounds, args.inner)
    finally:
        gc.enable()
    print(f"shape {args.shape}, {args.threads} thread(s), medians of {args.rounds} rounds of {args.inner}: "
          "µs per sample + backward")
    for b in ("fused", "reference"):
        on, off = res[f"{b}, gc on"], res[f"{b}, gc off"]
        print(f"  {b:<10} gc on {on:9.1f}   gc off {off:9.1f}   on/off {on / off:5.3f}")


if __name__ == "__main__":
    main()
