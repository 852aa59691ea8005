#!/usr/bin/env python
"""Where non-temporal stores start to pay for the float32 CPU update (sets the default threshold).

    python benchmarks/bench_stream_threshold.py [--threads 1] [--mib 0.75,1,2,3,4,6,8]

For each output size, times the fused update (x + 3 history terms) with the output written through
the cache and with non-temporal stores (``_C.set_stream_min_bytes`` 0 / -1), and ``copy_`` of the
same bytes; medians of round-robin samples in one process.  Run it with the malloc guard of
bench_kernels.py (MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824).
"""
from __future__ import annotations


import torch

from round_robin import medians_us, native_module, parser


def main(argv=None):
    ap = parser(__doc__, rounds=30)
    ap.add_argument("--mib", default="0.75,1,2,3,4,6,8", help="output sizes in MiB")
    args = ap.parse_args(argv)
    C = native_module(args.threads)
    default = C.set_stream_min_bytes(-1)
    print(f"{args.threads} thread(s), CPU loops: {C.cpu_isa()}, default threshold {default / 2**20:g} MiB")
    print(f"{'MiB':>6} {'cached us':>10} {'streamed us':>12} {'copy_ us':>9} {'streamed/cached':>16}")
    try:
        for mib in (float(v) for v in args.mib.split(",")):
            n = int(mib * 2**20) // 4
            x, *hist = (torch.randn(n) for _ in range(4))
            coef = torch.tensor([0.9, 0.3, -0.2, 0.05], dtype=torch.float64)
            src = torch.randn(5 * n // 2)
            dst = torch.empty_like(src)
            update = lambda: C.multistep_update(x, coef, hist)  # noqa: E731
            med = medians_us({"cached": (lambda: C.set_stream_min_bytes(-1), update),
                              "streamed": (lambda: C.set_stream_min_bytes(0), update),
                              "copy": (None, lambda: dst.copy_(src))}, args.rounds, inner=20)
            print(f"{mib:6g} {med['cached']:10.1f} {med['streamed']:12.1f} {med['copy']:9.1f} "
                  f"{med['streamed'] / med['cached']:16.2f}")
    finally:
        C.set_stream_min_bytes(default)


if __name__ == "__main__":
    main()
