"""Peak memory of one differentiable solve (what LD3 training backpropagates through) vs NFE.

    python benchmarks/bench_memory.py [--batch 4096] [--json PATH]

Each configuration runs in a fresh subprocess: load the digits model, draw x_T, record the resident
set size, then run DPM-Solver++(3M) forward + backward w.r.t. the timesteps and read the peak RSS
(ru_maxrss).  The number reported is the increment (peak - before), i.e. the memory the solve
itself needed, with and without per-step checkpointing of the network calls
(``checkpoint_model=True``: each evaluation is recomputed in backward, only x_i and the outputs
are kept, as the LD3 paper's App. D.3 describes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import resource, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from ld3_ext import DPMSolverPP, discretizations
from ld3_ext.models import load_model

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

model, schedule = load_model("digits")
x_T = schedule.prior_std() * torch.randn({batch}, 1, 8, 8, generator=torch.Generator().manual_seed(0))
t = discretizations.logsnr_uniform(schedule, {nfe}).requires_grad_(True)
solver = DPMSolverPP(order=3, checkpoint_model={ckpt})
# warm-up on a tiny batch so one-off allocations (kernels, autograd engine) are not counted
solver.sample(model, x_T[:2], t).sum().backward()
t.grad = None
before = rss_kib()
solver.sample(model, x_T, t).sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak - before)
"""


def run(batch, nfe, ckpt):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    code = CHILD.format(root=root, batch=batch, nfe=nfe, ckpt=ckpt)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0  # MiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--nfes", type=int, nargs="*", default=[4, 6, 8, 10])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rec = {"batch": args.batch, "model": "digits (4x512 MLP)", "solver": "DPM-Solver++(3M)", "peak_increment_mib": {}}
    print(f"digits model, DPM-Solver++(3M), batch {args.batch}: peak RSS increment of forward+backward (MiB)")
    print("NFE  | no checkpointing | checkpointing")
    for nfe in args.nfes:
        a, b = run(args.batch, nfe, False), run(args.batch, nfe, True)
        rec["peak_increment_mib"][str(nfe)] = {"plain": a, "checkpointed": b}
        print(f"{nfe:4d} | {a:16.1f} | {b:13.1f}")
    lo, hi = str(min(args.nfes)), str(max(args.nfes))
    pk = rec["peak_increment_mib"]
    rec["ratio_max_vs_min_nfe"] = {"plain": pk[hi]["plain"] / pk[lo]["plain"],
                                   "checkpointed": pk[hi]["checkpointed"] / pk[lo]["checkpointed"]}
    print(f"NFE {hi} / NFE {lo}: plain {rec['ratio_max_vs_min_nfe']['plain']:.2f}x, "
          f"checkpointed {rec['ratio_max_vs_min_nfe']['checkpointed']:.2f}x")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
