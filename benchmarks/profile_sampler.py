#!/usr/bin/env python
"""Where a fused 10-step DPM-Solver++(3M) sample + backward spends its time (benchmark case 3).

    python benchmarks/profile_sampler.py [--shape 64x3x32x32] [--runs 40] [--threads 1]

Wraps the native update and adjoint kernels, the trivial model (x0 = 0.9 x) and the per-step model
VJP of the whole-sampler node in wall-clock timers and prints milliseconds per run for each, plus
the rest (Python, autograd, small tensor ops).  Run it with the malloc guard of bench_kernels.py
(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824) to compare with its numbers.

It then counts the memory passes per step of both paths -- every read or write of a tensor of the
sample's size, by aten op (a dispatch mode) and by native kernel (their arguments) -- because once
the tensors outgrow the caches both paths are bound by memory traffic, and the ratio of their
passes bounds the ratio of their times.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


_NO_DATA = {"detach", "view", "expand", "alias", "as_strided", "empty_like", "empty", "_unsafe_view", "t",
            "transpose", "unsqueeze", "squeeze", "reshape", "select", "slice", "split"}


class _PassCounter(TorchDispatchMode):
    """Counts reads and writes of tensors with ``numel`` elements by aten ops (views and allocations
    move no data and are not counted)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.passes = numel, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name not in _NO_DATA:
            big = lambda tree: sum(1 for a in tree_leaves(tree) if isinstance(a, torch.Tensor) and a.numel() == self.numel)
            n = big((args, kwargs)) + big(out)
            if n:
                self.passes[name] += n
        return out


class _CountedModule:
    """Stands in for ld3_ext._C and counts the passes of the two kernels from their arguments."""

    def __init__(self, real, passes):
        self._real, self._passes = real, passes

    def __getattr__(self, name):
        fn = getattr(self._real, name)
        if name == "multistep_update":
            def update(x, coef, history, out=None):
                self._passes[name] += 2 + len(history)  # read x and the history, write the result
                return fn(x, coef, history, out)
            return update
        if name == "multistep_adjoint":
            def adjoint_step(lam_prev, v, scale, older, x, m, w, dots):
                J = w.numel()
                n = 1 + len(older) + (2 if v is not None else 0) + (1 if J else 0)  # v: read + write; gm: write
                n += (1 + (1 if J else 0)) if dots is not None else 0  # x and m, read for the dot products
                self._passes[name] += n
                return fn(lam_prev, v, scale, older, x, m, w, dots)
            return adjoint_step
        return fn


def count_passes(model, x, steps, gout):
    """Tensor-sized memory passes per step of a reference and a fused sample + backward."""
    n = steps.numel() - 1
    res = {}
    for backend in ("reference", "fused"):
        solver = ld3_ext.DPMSolverPP(order=3, backend=backend)
        counter = _PassCounter(x.numel())
        real_c = _native._C
        _native._C = _CountedModule(real_c, counter.passes)
        try:
            tt = steps.detach().requires_grad_()
            with counter:
                y = solver.sample(model, x, tt)
                torch.autograd.grad(y, tt, gout)
        finally:
            _native._C = real_c
        res[backend] = {k: v / n for k, v in counter.passes.items()}
    return res


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
    adjoint._model_vjp = _timed(acc, "model VJP (autograd engine)", real_vjp)
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
    parts = ["multistep_update", "multistep_adjoint", "model forward", "model VJP (autograd engine)"]
    print(f"shape {args.shape}, {args.threads} thread(s), {args.runs} runs: ms per run (10 steps, fwd + bwd)")
    for k in parts:
        print(f"  {k:28s} {per.get(k, 0.0):7.2f}")
    print(f"  {'everything else':28s} {per['total'] - sum(per.get(k, 0.0) for k in parts):7.2f}")
    print(f"  {'total':28s} {per['total']:7.2f}")

    passes = count_passes(model, x, steps, gout)
    print("memory passes per step (reads + writes of sample-sized tensors; the model's are the 'mul's "
          "of 0.9*x and of its backward):")
    for backend, by_op in passes.items():
        detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]))
        print(f"  {backend:9s} {sum(by_op.values()):5.1f}  ({detail})")


if __name__ == "__main__":
    main()
