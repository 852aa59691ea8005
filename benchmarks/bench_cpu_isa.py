#!/usr/bin/env python
"""The CPU kernels per instruction-set copy and per dtype, in one process (csrc/cpu/cpu_isa.h).

    python benchmarks/bench_cpu_isa.py [--shape 64x3x32x32] [--threads 1] [--dtypes float32,bfloat16,float16]

For every dtype, times the update forward (x + 3 history terms), its backward (all gradients and
the coefficient dot products) and one whole-sampler adjoint step (J = 3, with v and dot products)
with each instruction-set copy the CPU can run, plus the eager PyTorch update of the same dtype
(the reference path); medians of round-robin samples.  Run it with the malloc guard of
bench_kernels.py (MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824).
"""
from __future__ import annotations


import torch

from ld3_ext import ops
from round_robin import medians_us, native_module, parser


def main(argv=None):
    ap = parser(__doc__, rounds=25)
    ap.add_argument("--shape", default="64x3x32x32")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = ap.parse_args(argv)
    C = native_module(args.threads)
    shape = tuple(int(v) for v in args.shape.split("x"))
    isas = C.available_cpu_isas()
    before = C.cpu_isa()
    print(f"shape {args.shape}, {args.threads} thread(s), instruction sets {isas}; microseconds per call")
    print(f"{'dtype':9s} {'kernel':9s} " + " ".join(f"{i:>9s}" for i in isas) + f" {'eager':>9s}"
          + (f" {'base/avx2':>10s}" if len(isas) > 1 else ""))
    g = torch.Generator().manual_seed(0)
    try:
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            t = [torch.randn(shape, generator=g).to(dtype) for _ in range(8)]
            x, m0, m1, m2, lam, v, older, gout = t
            hist = [m0, m1, m2]
            coef = torch.tensor([0.9, 0.3, -0.2, 0.05], dtype=torch.float64)
            scale = torch.tensor([0.9], dtype=torch.float64)
            w = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
            dots = torch.zeros(5, dtype=torch.float64)
            kernels = {
                "update": lambda: C.multistep_update(x, coef, hist),
                "backward": lambda: C.multistep_update_backward(gout, x, coef, hist),
                # v is overwritten in place each call: its values stay finite (scale < 1)
                "adjoint": lambda: C.multistep_adjoint(lam, v, scale, [older], x, m0, w, dots),
            }
            for kname, fn in kernels.items():
                variants = {isa: ((lambda isa=isa: C.set_cpu_isa(isa)), fn) for isa in isas}
                if kname == "update":
                    variants["eager"] = ((lambda: C.set_cpu_isa(before)),
                                         lambda: ops.multistep_update_reference(x, coef, hist))
                med = medians_us(variants, args.rounds, inner=10)
                row = f"{name:9s} {kname:9s} " + " ".join(f"{med[i]:9.1f}" for i in isas)
                row += f" {med['eager']:9.1f}" if "eager" in med else f" {'-':>9s}"
                if len(isas) > 1:
                    row += f" {med['base'] / med['avx2']:10.2f}"
                print(row)
    finally:
        C.set_cpu_isa(before)


if __name__ == "__main__":
    main()
