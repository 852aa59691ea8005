"""What the whole-sampler node's generator snapshots cost a sample + backward (benchmark case 3).

    python benchmarks/bench_rng_replay.py [--shape 64x3x32x32] [--threads 1] [--rounds 30]

The fused node takes ``torch.get_rng_state()`` (and, on CUDA, the device generator's) before each network
evaluation, so that a backward that evaluates the network again replays its random numbers (dropout;
``ld3_ext/adjoint.py``).  This times a 10-step DPM-Solver++(3M) sample with the trivial model (x0 = 0.9 x) and its
backward w.r.t. the timesteps with the snapshots as shipped and with them replaced by a no-op, in one process and
round-robin.  Run with the malloc guard of bench_kernels.py to compare with its numbers.
"""
from __future__ import annotations

from round_robin import medians_us, native_module, parser, sampler_run

from ld3_ext import adjoint


def main(argv=None):
    args = parser(__doc__, rounds=30, shape="64x3x32x32", inner=10).parse_args(argv)
    native_module(args.threads)
    run = sampler_run(args.shape, "fused")
    shipped = adjoint._rng_snapshot

    def use(snapshot):
        def setup():
            adjoint._rng_snapshot = snapshot
        return setup

    try:
        res = medians_us({"snapshots": (use(shipped), run), "none": (use(lambda device: None), run)},
                         args.rounds, args.inner)
    finally:
        adjoint._rng_snapshot = shipped
    print(f"shape {args.shape}, {args.threads} thread(s), medians of {args.rounds} rounds of {args.inner}: "
          "µs per fused sample + backward")
    print(f"  with snapshots {res['snapshots']:9.1f}   without {res['none']:9.1f}   "
          f"ratio {res['snapshots'] / res['none']:5.3f}")


if __name__ == "__main__":
    main()
