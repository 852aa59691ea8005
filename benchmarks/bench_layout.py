#!/usr/bin/env python
"""What a channels_last state costs the fused update (forward, x + 3 history terms, float32).

    python benchmarks/bench_layout.py [--threads 1] [--shape 16,4,64,64] [--rounds 30]

Times, round-robin in one process: the fused update on contiguous tensors; on channels_last tensors (the
kernel walks their storage in place and returns channels_last); on channels_last tensors made contiguous
first (what the kernel did before it kept layouts: K+1 permuting copies and a contiguous result); with a
channels_last x and contiguous history (mixed: the history is copied into x's layout); and the eager
reference (plain torch ops) on channels_last.  Run it with the malloc guard of bench_kernels.py
(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824).
"""
from __future__ import annotations


import torch

from round_robin import medians_us, native_module, parser


def main(argv=None):
    ap = parser(__doc__, rounds=30)
    ap.add_argument("--shape", default="16,4,64,64", help="N,C,H,W")
    args = ap.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise SystemExit(f"--shape must be four positive integers N,C,H,W, got {args.shape!r}")
    C = native_module(args.threads)
    from ld3_ext.ops import multistep_update_reference

    gen = torch.Generator().manual_seed(0)
    cont = [torch.randn(shape, generator=gen) for _ in range(4)]
    cl = [t.contiguous(memory_format=torch.channels_last) for t in cont]
    coef = torch.tensor([0.9, 0.3, -0.2, 0.05], dtype=torch.float64)
    out = C.multistep_update(cl[0], coef, cl[1:])
    if not out.is_contiguous(memory_format=torch.channels_last):
        raise SystemExit("this build returns a contiguous result for channels_last inputs (an older _C?)")
    variants = {
        "contiguous": (None, lambda: C.multistep_update(cont[0], coef, cont[1:])),
        "channels_last": (None, lambda: C.multistep_update(cl[0], coef, cl[1:])),
        "channels_last, copied to contiguous (old)": (
            None, lambda: C.multistep_update(cl[0].contiguous(), coef, [m.contiguous() for m in cl[1:]])),
        "mixed (x channels_last, history contiguous)": (None, lambda: C.multistep_update(cl[0], coef, cont[1:])),
        "eager reference, channels_last": (None, lambda: multistep_update_reference(cl[0], coef, cl[1:])),
    }
    med = medians_us(variants, args.rounds, inner=10)
    base = med["channels_last"]
    print(f"shape {shape} float32, 3 history terms, {args.threads} thread(s); median us per call "
          f"(ratio to the fused channels_last call)")
    for name, us in med.items():
        print(f"  {name:45s} {us:9.1f} us  {us / base:6.2f}x")


if __name__ == "__main__":
    main()
