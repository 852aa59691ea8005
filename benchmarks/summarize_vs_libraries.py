"""Markdown table of bench_vs_libraries.py runs: per (mode, solver, shape), ld3_ext's median time and how many times
longer each other library took, as the median over the runs [min-max].

    python benchmarks/summarize_vs_libraries.py benchmarks/results/vs_libraries_*_run*.json
"""
from __future__ import annotations

import json
import statistics
import sys
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
    machines = {(r["machine"].get("cpu"), json.dumps(r["machine"].get("cpu_caches"), sort_keys=True), r["threads"])
                for r in runs}
    for cpu, caches, threads in sorted(machines, key=str):
        print(f"machine: {cpu}, caches {caches}, threads {threads}")
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
    main(sys.argv[1:])
