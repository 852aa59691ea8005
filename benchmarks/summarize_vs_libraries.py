"""Markdown table of bench_vs_libraries.py runs: per (mode, solver, shape), ld3_ext's median time and how many times
longer each other library took, as the median over the runs [min-max].

    python benchmarks/summarize_vs_libraries.py benchmarks/results/vs_libraries_*_run*.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

LIBRARIES = ("k_diffusion", "diffusers", "ld3_ext_reference")


def cell(values, fmt):
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def main(paths):
    if not paths:
        raise SystemExit(__doc__)
    runs = []
    for p in paths:
        with open(p) as fh:
            runs.append(json.load(fh))
    partial = [p for p, r in zip(paths, runs) if not r.get("complete")]
    if partial:  # written after every case: a run stopped early holds only some rows
        raise SystemExit(f"incomplete run(s), not summarised: {', '.join(partial)}")
    machines = {(r["machine"].get("cpu"), json.dumps(r["machine"].get("cpu_caches"), sort_keys=True), r["threads"],
                 r["device"]) for r in runs}
    if len(machines) > 1:  # ratios from different hosts or thread counts do not pool into one median
        raise SystemExit(f"runs from different machines / thread counts / devices: {sorted(machines, key=str)}")
    for cpu, caches, threads, device in machines:
        print(f"machine: {cpu}, caches {caches}, threads {threads}, device {device}")
    for version in sorted({json.dumps(r.get("versions"), sort_keys=True) for r in runs}):
        print(f"versions: {version}")
    ld3_time = defaultdict(list)
    ratio = defaultdict(list)
    order = []
    for run in runs:
        for r in run["records"]:
            key = (r["mode"], r["solver"], r["shape"])
            if key not in order:
                order.append(key)
            if r["library"] == "ld3_ext":
                ld3_time[key].append(r["median_s"] * 1e3)
            else:
                ratio[key + (r["library"],)].append(r["ratio_vs_ld3"])
    print(f"{len(runs)} run(s)\n")
    print("| mode | solver | shape | ld3_ext (ms) | k-diffusion / ld3_ext | diffusers / ld3_ext | ld3_ext reference backend / ld3_ext |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted(order, key=lambda k: (k[0] != "sample", k[1], order.index(k))):
        cells = [cell(ratio[key + (lib,)], "{:.2f}x") for lib in LIBRARIES]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {cell(ld3_time[key], '{:.2f}')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="JSON files written by bench_vs_libraries.py --json")
    main(ap.parse_args().files)
