"""The NaN/Inf checks of x_T and of every model output: torch.isfinite(t).all() against ld3_ext/_finite.py.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        python benchmarks/bench_finite_check.py [--shapes 64x3x32x32,8x4x128x128] [--threads 1] [--rounds 15]

Per shape and dtype, median us per call, round-robin in one process:
  isfinite.all   bool(torch.isfinite(t).all())  (the checks before; abs, ne, eq, and, all: five passes)
  all_finite     one sum, read back (the sampler's checks now)
  deferred       all_finite_tensor: one aminmax, no read-back (the model wrapper's deferred checks, CUDA)
Then a whole sample: 10-step fused DPM-Solver++(3M), no gradient, the trivial model x0 = 0.9 x with the
wrapper's output check on (the default), with the checks now against the same run with isfinite().all()
patched back in.
"""
from __future__ import annotations

import torch

from round_robin import medians_us, parser

import ld3_ext
import ld3_ext.solvers.base as solver_base
import ld3_ext.wrappers as wrappers
from ld3_ext._finite import all_finite, all_finite_tensor
from ld3_ext.schedules import EDM


def _old_check(t):
    return bool(torch.isfinite(t.detach()).all())


def _sampler_us(shape, rounds, inner):
    sch = EDM()
    x = torch.randn(shape)
    model = ld3_ext.wrap_model(lambda xx, tt: 0.9 * xx, sch, prediction="x0")
    steps = torch.linspace(sch.t_max ** (1 / 7), sch.t_min ** (1 / 7), 11, dtype=torch.float64) ** 7
    solver = ld3_ext.DPMSolverPP(order=3)
    new = (wrappers.all_finite, solver_base.all_finite)

    def use(checks):
        def setup():
            wrappers.all_finite, solver_base.all_finite = checks
        return setup

    def run():
        with torch.no_grad():
            solver.sample(model, x, steps)
    try:
        return medians_us({"old": (use((_old_check, _old_check)), run), "new": (use(new), run)}, rounds, inner)
    finally:
        wrappers.all_finite, solver_base.all_finite = new


def main(argv=None):
    ap = parser(__doc__, rounds=15)
    ap.add_argument("--shapes", default="64x3x32x32,16x4x64x64,8x4x128x128,1x3x256x256")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16,float64")
    args = ap.parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s): one check, median us")
    print(f"{'shape':14s} {'dtype':9s} {'isfinite.all':>13s} {'all_finite':>11s} {'deferred':>9s} {'old/new':>8s}")
    for name in args.shapes.split(","):
        shape = tuple(int(v) for v in name.split("x"))
        for dt in args.dtypes.split(","):
            t = torch.randn(shape).to(getattr(torch, dt))
            res = medians_us({"old": (None, lambda: _old_check(t)), "new": (None, lambda: all_finite(t)),
                              "deferred": (None, lambda: all_finite_tensor(t))}, args.rounds, inner=10)
            print(f"{name:14s} {dt:9s} {res['old']:13.1f} {res['new']:11.1f} {res['deferred']:9.1f} "
                  f"{res['old'] / res['new']:8.2f}")
    print("10-step fused DPM-Solver++(3M) sample, no grad, output checks on: median us")
    print(f"{'shape':14s} {'old checks':>11s} {'new checks':>11s} {'old/new':>8s}")
    for name in args.shapes.split(","):
        shape = tuple(int(v) for v in name.split("x"))
        res = _sampler_us(shape, args.rounds, inner=3)
        print(f"{name:14s} {res['old']:11.1f} {res['new']:11.1f} {res['old'] / res['new']:8.2f}")


if __name__ == "__main__":
    main()
