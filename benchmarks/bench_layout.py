#!/usr/bin/env python
"""What a channels_last state costs the fused update (forward, x + 3 history terms, float32).

    python benchmarks/bench_layout.py [--threads 1] [--shape 16,4,64,64] [--rounds 30]

Times, round-robin in one process: the fused update on contiguous tensors; on channels_last tensors (the
kernel walks their storage in place and returns channels_last); on channels_last tensors made contiguous
first (what the kernel did before it kept layouts: K+1 permuting copies and a contiguous result); with a
channels_last x and contiguous history (mixed: the history is copied into x's layout); and the eager
reference (plain torch ops) on channels_last.  Then whole samples from a channels_last x_T with a network
that returns channels_last or contiguous tensors (``ld3_ext/layout.py``).  Run it with the malloc guard of bench_kernels.py
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
    sampler_rows(cl[0], args.rounds)


def sampler_rows(x_T, rounds):
    """A 10-step DPM-Solver++(3M) sample (no grad; and forward + backward w.r.t. the timesteps) from a
    channels_last x_T, with a trivial network that returns channels_last (0.9*x) or contiguous tensors
    ((0.9*x).contiguous(): that copy is the network's own, the same in the old and the new code)."""
    import ld3_ext
    from ld3_ext.schedules import EDM

    schedule = EDM()
    steps = torch.linspace(schedule.t_max ** (1 / 7), schedule.t_min ** (1 / 7), 11, dtype=torch.float64) ** 7
    solver = ld3_ext.DPMSolverPP(order=3, backend="fused")
    nets = {"channels_last outputs": lambda x, t: 0.9 * x,
            "contiguous outputs": lambda x, t: (0.9 * x).contiguous()}
    gout = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(1)).to(memory_format=torch.channels_last)
    variants = {}
    for name, net in nets.items():
        model = ld3_ext.wrap_model(net, schedule, prediction="x0", check_output=False)

        def fwd(model=model):
            with torch.no_grad():
                solver.sample(model, x_T, steps)

        def fwdbwd(model=model):
            tt = steps.detach().requires_grad_()
            torch.autograd.grad(solver.sample(model, x_T, tt), tt, gout)
        variants[f"sample, {name}"] = (None, fwd)
        variants[f"sample fwd+bwd, {name}"] = (None, fwdbwd)
    med = medians_us(variants, rounds, inner=3)
    print("10-step DPM-Solver++(3M) from a channels_last x_T; median us per sample (ratio to channels_last outputs)")
    for name, us in med.items():
        base = med[name.replace("contiguous", "channels_last")]
        print(f"  {name:45s} {us:9.1f} us  {us / base:6.2f}x")


if __name__ == "__main__":
    main()
