#!/usr/bin/env python
"""The README's "LD3 vs baselines" table from a bench_ld3.py results file.

    python benchmarks/ld3_table.py benchmarks/results/ld3_cpu.json

*Italic*: the best baseline of the row; **bold**: LD3; then LD3's median RMSE relative to that baseline, the
parameterisation time_mode="auto" chose (λ or t) and the wall time of fit() in seconds.
"""
from __future__ import annotations

import argparse
import json

COLUMNS = ["time_uniform", "time_quadratic", "logsnr", "edm", "dmn", "gits"]
MODES = {"lambda": "λ", "time": "t"}


def table(records) -> str:
    lines = ["| model | solver | NFE | " + " | ".join(COLUMNS + ["ld3"])
             + " | LD3's RMSE vs best baseline | mode | train s |",
             "|" + "---|" * (len(COLUMNS) + 7)]
    for r in records:
        m = r["median_rmse"]
        best = min((k for k in m if k != "ld3"), key=m.get)
        cells = [(f"*{m[k]:.4f}*" if k == best else f"{m[k]:.4f}") if k in m else "—" for k in COLUMNS]
        change = m["ld3"] / m[best] - 1.0
        lines.append(f"| {r['model']} | {r['solver']} | {r['nfe']} | " + " | ".join(cells)
                     + f" | **{m['ld3']:.4f}** | {'−' if change < 0 else '+'}{100 * abs(change):.1f}% | "
                     f"{MODES.get(r['time_mode'], r['time_mode'])} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def summary(records) -> str:
    gains = [(1.0 - r["median_rmse"]["ld3"] / min(v for k, v in r["median_rmse"].items() if k != "ld3"), r)
             for r in records]
    n_ok = sum(g >= 0.25 for g, _ in gains)
    g, r = min(gains, key=lambda x: x[0])
    best_counts = {}
    for r2 in records:
        m = r2["median_rmse"]
        b = min((k for k in m if k != "ld3"), key=m.get)
        best_counts[b] = best_counts.get(b, 0) + 1
    return (f"{n_ok} of {len(records)} configurations reach the >= 25 % target (smallest reduction "
            f"{100 * g:.1f} %: {r['solver']} on {r['model']} at NFE {r['nfe']}); best baseline per row: "
            + ", ".join(f"{k} {v}" for k, v in sorted(best_counts.items(), key=lambda kv: -kv[1])))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="a bench_ld3.py --json results file")
    args = ap.parse_args()
    with open(args.json) as f:
        records = json.load(f)["records"]
    print(table(records))
    print()
    print(summary(records))


if __name__ == "__main__":
    main()
