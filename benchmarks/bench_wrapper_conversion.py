"""The model wrapper's x0 <-> eps conversion: plain PyTorch formulas against the fused update kernel.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        python benchmarks/bench_wrapper_conversion.py [--shapes 2x64,64x3x32x32] [--threads 1] [--rounds 15]

An eps-predicting model (a trivial network, x -> 0.9 x) asked for x0 = (x - sigma eps) / alpha, as DPM-Solver++
asks every step: ``wrap_model(..., backend="reference")`` (three eager ops) against ``backend="fused"`` (two
kernel calls whose time-gradient dot products do not depend on the thread count), forward alone and forward +
backward (gradients of x and of the time), median microseconds per call, in one process, round-robin.
"""
from __future__ import annotations

import torch

from round_robin import medians_us, native_module, parser

import ld3_ext


def main(argv=None):
    ap = parser(__doc__, rounds=15)
    ap.add_argument("--shapes", default="2x64,64x3x32x32,16x4x64x64,8x4x128x128")
    args = ap.parse_args(argv)
    native_module(args.threads)
    schedule = ld3_ext.VPLinear()
    models = {b: ld3_ext.wrap_model(lambda x, t: 0.9 * x, schedule, prediction="eps", backend=b,
                                    check_output=False) for b in ("reference", "fused")}
    print(f"{args.threads} thread(s): eps -> x0 conversion, median us")
    print(f"{'shape':14s} {'case':8s} {'reference':>10s} {'fused':>10s} {'ref/fused':>10s}")
    for name in args.shapes.split(","):
        shape = tuple(int(v) for v in name.split("x"))
        g = torch.Generator().manual_seed(0)
        x, gout = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        xs = x.clone().requires_grad_()

        def forward(model):
            def run():
                with torch.no_grad():
                    model.x0(x, torch.tensor(0.5, dtype=torch.float64))
            return run

        def forward_backward(model):
            def run():
                t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
                torch.autograd.grad(model.x0(xs, t), (xs, t), gout)
            return run

        for case, make in (("fwd", forward), ("fwd+bwd", forward_backward)):
            res = medians_us({b: (None, make(m)) for b, m in models.items()}, rounds=args.rounds, inner=20)
            print(f"{name:14s} {case:8s} {res['reference']:10.1f} {res['fused']:10.1f} "
                  f"{res['reference'] / res['fused']:10.2f}")
    errs = time_gradient_errors("eps")
    print(f"\nfloat32 time gradient of x0 at VPLinear t=1, relative to float64: reference {errs['reference']:.2e}, "
          f"fused {errs['fused']:.2e}")


def time_gradient_errors(prediction: str = "eps") -> dict:
    """{backend: relative error} of the float32 time gradient of the conversion at VPLinear's t = 1 (alpha ~ 0.007),
    against float64: x0 from an eps or v network, eps from an x0 one.  The fused steps keep the reference's order
    of operations (a one-pass a*x + b*out with a = 1/alpha would subtract terms ~1/alpha^2 larger than their
    difference).  tests/test_wrapper_conversion.py asserts on it."""
    s = ld3_ext.VPLinear()
    g = torch.Generator().manual_seed(0)
    x0, eps, gout = (torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=g) for _ in range(3))
    t = torch.tensor(1.0, dtype=torch.float64)
    x = s.alpha(t) * x0 + s.sigma(t) * eps

    def grad(backend, dtype):
        m = ld3_ext.wrap_model(lambda xx, tt: torch.tanh(xx), s, prediction=prediction, backend=backend)
        tt = t.clone().requires_grad_()
        view = m.x0(x.to(dtype), tt) if prediction != "x0" else m.eps(x.to(dtype), tt)
        return torch.autograd.grad(view, tt, gout.to(dtype))[0].item()

    truth = grad("reference", torch.float64)
    return {b: abs(grad(b, torch.float32) - truth) / abs(truth) for b in ("reference", "fused")}


if __name__ == "__main__":
    main()
