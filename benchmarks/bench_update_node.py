"""The eager autograd nodes: Python autograd.Function against the C++ node (python/update_autograd.cpp).

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        python benchmarks/bench_update_node.py [--shapes 64x3x32x32,8x4x128x128] [--threads 1] [--rounds 15]

One forward + backward of x_next = a*x + sum_k b_k m_k (3 history terms, fp32, gradients of x, coef and every
history term) per call, in one process, round-robin:
  python node   fused._MultistepUpdate.apply (the reference of the node)
  C++ node      _C.multistep_update_autograd (what fused.multistep_update records)
  kernels only  _C.multistep_update + _C.multistep_update_backward, no autograd (the floor)
The kernels sweep megabytes through the caches, so the autograd work after them runs cold; the Python node's
own work is what the C++ node removes.

A second table times bench_kernels.py's forward+backward case (coefficient table of a 5-point grid, its row
for step 3, the update, gradients of x, the grid and every history term) with both nodes in Python
(fused._CoefficientTable, fused._MultistepUpdate) against both in C++ (python/table_autograd.cpp too).
"""
from __future__ import annotations

import torch

from round_robin import medians_us, native_module, parser

from ld3_ext import fused
from ld3_ext.coefficients import SolverSpec
from ld3_ext.schedules import EDM

K = 3


def main(argv=None):
    ap = parser(__doc__, rounds=15)
    ap.add_argument("--shapes", default="64x3x32x32,16x4x64x64,8x4x128x128,1x3x256x256")
    args = ap.parse_args(argv)
    C = native_module(args.threads)
    print(f"{args.threads} thread(s): update forward + backward, median us")
    print(f"{'shape':14s} {'python node':>12s} {'C++ node':>10s} {'kernels only':>13s} {'python/C++':>11s}")
    tables = []
    for name in args.shapes.split(","):
        shape = tuple(int(v) for v in name.split("x"))
        g = torch.Generator().manual_seed(0)
        x, gout = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        hist = [torch.randn(shape, generator=g) for _ in range(K)]
        coef = torch.tensor([0.9, 0.3, -0.2, 0.05], dtype=torch.float64)
        leaves = [t.clone().requires_grad_() for t in (x, coef, *hist)]

        def python_node():
            y = fused._MultistepUpdate.apply(*leaves)
            torch.autograd.grad(y, leaves, gout)

        def cpp_node():
            y = C.multistep_update_autograd(leaves[0], leaves[1], leaves[2:])
            torch.autograd.grad(y, leaves, gout)

        def kernels_only():
            C.multistep_update(x, coef, hist)
            C.multistep_update_backward(gout, x, coef, hist, True, True, True)

        res = medians_us({"python": (None, python_node), "cpp": (None, cpp_node), "kernels": (None, kernels_only)},
                         rounds=args.rounds, inner=20)
        print(f"{name:14s} {res['python']:12.1f} {res['cpp']:10.1f} {res['kernels']:13.1f} "
              f"{res['python'] / res['cpp']:11.2f}")
        tables.append((name, _table_and_update(C, x, hist, gout, args.rounds)))
    print(f"\n{args.threads} thread(s): coefficient table + update, forward + backward, median us")
    print(f"{'shape':14s} {'python nodes':>13s} {'C++ nodes':>10s} {'python/C++':>11s}")
    for name, res in tables:
        print(f"{name:14s} {res['python']:13.1f} {res['cpp']:10.1f} {res['python'] / res['cpp']:11.2f}")


def _table_and_update(C, x, hist, gout, rounds):
    schedule, spec = EDM(), SolverSpec("dpmpp", order=K)
    args = fused._table_args(schedule.native_spec(), spec)
    t = torch.tensor([80.0, 40.0, 20.0, 10.0, 5.0], dtype=torch.float64)
    xs, hs = x.clone().requires_grad_(), [h.clone().requires_grad_() for h in hist]

    def python_nodes():
        tt = t.detach().requires_grad_()
        table = fused._CoefficientTable.apply(tt, args, schedule, spec)
        y = fused._MultistepUpdate.apply(xs, table[3, 0, :1 + K], *hs)
        torch.autograd.grad(y, [xs, tt, *hs], gout)

    def cpp_nodes():
        tt = t.detach().requires_grad_()
        table = C.coefficient_table_autograd(tt, *args)
        y = C.multistep_update_autograd(xs, table[3, 0, :1 + K], hs)
        torch.autograd.grad(y, [xs, tt, *hs], gout)

    return medians_us({"python": (None, python_nodes), "cpp": (None, cpp_nodes)}, rounds=rounds, inner=20)


if __name__ == "__main__":
    main()
