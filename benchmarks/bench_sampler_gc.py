"""What Python's cyclic garbage collector costs a whole sample + backward (benchmark case 3).

    python benchmarks/bench_sampler_gc.py [--shape 1x4] [--threads 1] [--rounds 30]

A 10-step DPM-Solver++(3M) sample with the trivial model (x0 = 0.9 x) and its backward w.r.t. the
timesteps, fused and reference backends, each with the collector on and off, in one process and
round-robin.  Why: the fused path keeps each step's states and model graphs alive until the
backward, so young-generation collections find survivors to traverse; the library leaves the
collector alone (it is interpreter-wide state), this measures what that choice costs.
"""
from __future__ import annotations

import gc

from round_robin import medians_us, native_module, parser, sampler_run


def main(argv=None):
    args = parser(__doc__, rounds=30, shape="1x4", inner=20).parse_args(argv)
    native_module(args.threads)
    variants = {f"{b}, gc {'on' if on else 'off'}": (gc.enable if on else gc.disable, sampler_run(args.shape, b))
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
