"""Shared by the small in-process A/B benchmarks (bench_cpu_isa.py, bench_stream_threshold.py, bench_sampler_gc.py,
bench_rng_replay.py)."""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from ld3_ext import _native


def parser(doc: str, rounds: int, shape: Optional[str] = None, inner: Optional[int] = None) -> argparse.ArgumentParser:
    """The options every round-robin benchmark takes (--threads, --rounds; --shape and --inner where defaults are
    given, as for the sampler_run benchmarks); a script adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=rounds)
    if shape is not None:
        ap.add_argument("--shape", default=shape)
    if inner is not None:
        ap.add_argument("--inner", type=int, default=inner)
    return ap


def sampler_run(shape: str, backend: str) -> Callable[[], None]:
    """Benchmark case 3 as a call: a 10-step DPM-Solver++(3M) sample of a ``shape`` ("64x3x32x32") state with the
    trivial model (x0 = 0.9 x) and its backward w.r.t. the timesteps, on ``backend``."""
    import ld3_ext
    from ld3_ext.schedules import EDM
    schedule = EDM()
    model = ld3_ext.wrap_model(lambda xx, tt: 0.9 * xx, schedule, prediction="x0", check_output=False)
    steps = torch.linspace(schedule.t_max ** (1 / 7), schedule.t_min ** (1 / 7), 11, dtype=torch.float64) ** 7
    x = torch.randn(tuple(int(v) for v in shape.split("x")))
    gout = torch.randn_like(x)
    solver = ld3_ext.DPMSolverPP(order=3, backend=backend)

    def run():
        tt = steps.detach().requires_grad_()
        torch.autograd.grad(solver.sample(model, x, tt), tt, gout)
    return run


def native_module(threads: int):
    """ld3_ext._C with torch set to ``threads`` threads (exits with a message when not built)."""
    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    if not _native.native_available():
        raise SystemExit("ld3_ext._C is not built")
    torch.set_num_threads(threads)
    return _native._C


def medians_us(variants: Dict[str, Tuple[Optional[Callable[[], object]], Callable[[], object]]], rounds: int,
               inner: int) -> Dict[str, float]:
    """Median microseconds per call of each variant, sampled round-robin so load hits all alike.

    ``variants`` maps a name to (setup, fn): setup (e.g. selecting an instruction set) runs untimed
    before each sample, then fn once untimed and ``inner`` times timed."""
    if rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {rounds}")
    samples = {k: [] for k in variants}
    for _ in range(rounds):
        for name, (setup, fn) in variants.items():
            if setup is not None:
                setup()
            fn()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}
