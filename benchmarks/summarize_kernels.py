#!/usr/bin/env python
"""README table from one or more bench_kernels.py JSON files of the same machine and thread count.

    python benchmarks/summarize_kernels.py benchmarks/results/cpu_epyc_2core_threads1_run*.json

Each cell is the median over the files, with [min-max] when there are several: on a shared machine
one run can land in another tenant's burst, so the README quotes repeated runs.
"""
from __future__ import annotations

import argparse
import json
import statistics

COLUMNS = [
    ("update fwd: fused vs eager", lambda by, s: by[("update_fwd", s, "fused")]["ratio_vs_eager"], "x"),
    ("fused vs `torch.compile`",
     lambda by, s: by[("update_fwd", s, "compile")]["median_s"] / by[("update_fwd", s, "fused")]["median_s"], "x"),
    ("fused, fraction of `copy_`", lambda by, s: by[("update_fwd", s, "fused")]["fraction_of_copy"], ""),
    ("fwd+bwd: fused vs eager", lambda by, s: by[("update_fwdbwd", s, "fused")]["ratio_vs_eager"], "x"),
    ("10-step DPM++(3M) sample fwd+bwd: fused vs reference",
     lambda by, s: by[("sampler", s, "fused")]["ratio_vs_eager"], "x"),
    ("same, solver overhead only", lambda by, s: by[("sampler", s, "fused")]["overhead_ratio_vs_reference"], "x"),
]


def _value(fn, by, shape):
    """A column's value in one run, None where the run has no such record (``--no-compile``, the GPU check's
    run, or a ``--cases`` subset)."""
    try:
        v = fn(by, shape)
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return v if isinstance(v, (int, float)) else None


def _cell(values, unit):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}{unit}"
    return f"{med:.2f}{unit} [{min(values):.2f}–{max(values):.2f}]"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    runs, kinds, flagged = [], set(), []
    for path in args.files:
        with open(path) as fh:
            data = json.load(fh)
        if data.get("complete") is False:  # written after every shape: a run stopped early holds only some rows
            raise SystemExit(f"incomplete run, not summarised: {path}")
        m = data["machine"]
        # ratios from other hosts, thread counts, devices or a --quick smoke run do not pool into one median
        kinds.add((m.get("cpu"), json.dumps(m.get("cpu_caches"), sort_keys=True), data["threads"],
                   data.get("device"), bool(data.get("quick"))))
        if len(kinds) > 1:
            raise SystemExit("runs of different machines / thread counts / devices / --quick, not summarised "
                             f"together: {sorted(kinds, key=str)}")
        # a shape whose copy bandwidth collapsed may have measured the scheduler (flag_contention): said above the
        # table (kept: at tiny shapes the copy is call overhead and the flag says nothing)
        flagged += [f"{path}: {r['shape']}" for r in data["records"] if r.get("contended") and r["variant"] == "copy_fwd_bytes"]
        runs.append({(r["case"], r["shape"], r["variant"]): r for r in data["records"]})
        caches = m.get("cpu_caches") or {}
        where = ", ".join(f"{k} {v}" for k, v in caches.items() if k in ("L2", "L3"))
        if m.get("cpu_mhz"):
            where = f"{where}, {m['cpu_mhz']:.0f} MHz" if where else f"{m['cpu_mhz']:.0f} MHz"
        print(f"<!-- {path}: {m.get('cpu')}{' (' + where + ')' if where else ''}, threads {data['threads']}, "
              f"CPU loops {m.get('cpu_isa')}, load at start {m.get('loadavg_at_start')} -->")
    for d in flagged:
        print(f"<!-- flagged contended (copy bandwidth < 10 % of the run's best): {d} -->")
    print("| shape | " + " | ".join(name for name, _, _ in COLUMNS) + " |")
    print("|---" * (1 + len(COLUMNS)) + "|")
    shapes = []  # in the order the runs hold them (the GPU check adds a 64 MiB shape)
    for by in runs:
        for _, s, _ in by:
            if s not in shapes:
                shapes.append(s)
    for shape in shapes:
        if not any(("update_fwd", shape, "fused") in by for by in runs):
            continue
        cells = [_cell([_value(fn, by, shape) for by in runs], unit) for _, fn, unit in COLUMNS]
        print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
