"""The fused CPU kernels on cache-hot buffers against a ``copy_`` of the same bytes.

    python benchmarks/bench_hot_kernels.py [--shape 64x3x32x32] [--rounds 300]

Run with the malloc guard of bench_kernels.py (MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=1073741824).  One thread.  Times (medians, microseconds) the adjoint step of the
whole-sampler backward (three adjoints, with and without its dot products) and the update with three
history terms, in both CPU instruction-set copies, beside copies that move the same number of bytes
(7 and 5 passes over a sample).  Next to benchmarks/profile_sampler.py, which times the same kernels inside
a sampler, this separates the kernels' own speed from the cost of reading states that left the caches.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ld3_ext import _native


def median_us(fn, rounds: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64x3x32x32")
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args(argv)
    if not _native.native_available():
        raise SystemExit(f"ld3_ext._C is not built ({_native.load_error()})")
    C = _native._C
    torch.set_num_threads(1)
    n = 1
    for s in args.shape.split("x"):
        n *= int(s)
    lam, v, older, x, m = (torch.randn(n) for _ in range(5))
    w = torch.tensor([0.3, -0.2, 0.05], dtype=torch.float64)
    scale = torch.tensor([0.9], dtype=torch.float64)
    dots = torch.zeros(5, dtype=torch.float64)
    hist = [torch.randn(n) for _ in range(3)]
    coef = torch.tensor([0.9, 0.3, -0.2, 0.05], dtype=torch.float64)
    print(f"shape {args.shape}, 1 thread, median of {args.rounds} calls (us)")
    for isa in ("base", "avx2"):
        try:
            C.set_cpu_isa(isa)
        except (RuntimeError, ValueError) as exc:
            print(f"  {isa}: not available ({exc})")
            continue
        print(f"  {isa:5s} adjoint step, 3 adjoints, dots   {median_us(lambda: C.multistep_adjoint(lam, v, scale, [older], x, m, w, dots), args.rounds):8.1f}")
        print(f"  {isa:5s} adjoint step, 3 adjoints, no dots{median_us(lambda: C.multistep_adjoint(lam, v, scale, [older], x, m, w, None), args.rounds):8.1f}")
        print(f"  {isa:5s} update, 3 history terms          {median_us(lambda: C.multistep_update(x, coef, hist), args.rounds):8.1f}")
    C.set_cpu_isa("auto")
    for passes in (7, 5):
        src = torch.randn(n * passes // 2)
        dst = torch.empty_like(src)
        print(f"  copy_ of {passes} passes                   {median_us(lambda: dst.copy_(src), args.rounds):8.1f}")


if __name__ == "__main__":
    main()
