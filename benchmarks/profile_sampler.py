#!/usr/bin/env python
"""Where a fused 10-step DPM-Solver++(3M) sample + backward spends its time (benchmark case 3).

    python benchmarks/profile_sampler.py [--shape 64x3x32x32] [--runs 40] [--threads 1]

Wraps the native update and adjoint kernels, the trivial model (x0 = 0.9 x) and the per-step model
VJP of the whole-sampler node in wall-clock timers and prints milliseconds per run for each, plus
the rest (Python, autograd, small tensor ops).  Run it with the malloc guard of bench_kernels.py
(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824) to compare with its numbers.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

import ld3_ext
from ld3_ext import _native, adjoint
from ld3_ext.schedules import EDM


class _TimedModule:
    """Stands in for ld3_ext._C with the two kernels timed (everything else passed through)."""

    def __init__(self, real, acc):
        self._real, self._acc = real, acc

    def __getattr__(self, name):
        fn = getattr(self._real, name)
        if name not in ("multistep_update", "multistep_adjoint"):
            return fn
        return _timed(self._acc, name, fn)


def _timed(acc, name, fn):
    def call(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[name] += time.perf_counter() - t0
    return call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64x3x32x32")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not _native.native_available():
        raise SystemExit("ld3_ext._C is not built")
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split("x"))
    schedule = EDM()
    x, gout = torch.randn(shape), torch.randn(shape)
    acc = collections.defaultdict(float)
    model = ld3_ext.wrap_model(_timed(acc, "model forward", lambda xx, tt: 0.9 * xx), schedule, prediction="x0",
                               check_output=False)
    steps = torch.linspace(schedule.t_max ** (1 / 7), schedule.t_min ** (1 / 7), 11, dtype=torch.float64) ** 7
    solver = ld3_ext.DPMSolverPP(order=3, backend="fused")
    real_c, real_vjp = _native._C, adjoint._model_vjp
    _native._C = _TimedModule(real_c, acc)
    adjoint._model_vjp = _timed(acc, "model VJP (autograd.grad)", real_vjp)
    try:
        def run():
            tt = steps.detach().requires_grad_()
            t0 = time.perf_counter()
            y = solver.sample(model, x, tt)
            assert type(y.grad_fn).__name__ == "_WholeSamplerBackward"
            torch.autograd.grad(y, tt, gout)
            acc["total"] += time.perf_counter() - t0
        for _ in range(5):
            run()
        acc.clear()
        for _ in range(args.runs):
            run()
    finally:
        _native._C, adjoint._model_vjp = real_c, real_vjp
    per = {k: v / args.runs * 1e3 for k, v in acc.items()}
    parts = ["multistep_update", "multistep_adjoint", "model forward", "model VJP (autograd.grad)"]
    print(f"shape {args.shape}, {args.threads} thread(s), {args.runs} runs: ms per run (10 steps, fwd + bwd)")
    for k in parts:
        print(f"  {k:28s} {per.get(k, 0.0):7.2f}")
    print(f"  {'everything else':28s} {per['total'] - sum(per.get(k, 0.0) for k in parts):7.2f}")
    print(f"  {'total':28s} {per['total']:7.2f}")


if __name__ == "__main__":
    main()
