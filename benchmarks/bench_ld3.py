"""End-to-end LD3 benchmark: learned schedule vs every baseline, training time, memory.

    python benchmarks/bench_ld3.py --json benchmarks/results/ld3_cpu.json
    python benchmarks/bench_ld3.py --quick            # one model, one solver, NFE 5

For each (model, solver, NFE) it trains LD3 on 50 + 50 teacher pairs (default settings: time_mode="auto" keeps the
better of the lambda / time parameterisations on the trainer's own validation pairs), then evaluates the median
teacher-RMSE on held-out noises (default 256, never seen in training) for the learned schedule and
for time-uniform, time-quadratic, logSNR, EDM (rho = 7), DMN and GITS.  Teachers: the exact ODE
solution for the analytic mixtures, UniPC(3, bh1) with 20 NFE on a logSNR grid for the digits model.

Memory vs NFE is measured by benchmarks/bench_memory.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ld3_ext import DPMSolverPP, IPNDM, UniPC, discretizations  # noqa: E402
from ld3_ext.models import load_model  # noqa: E402
from ld3_ext.training import LD3Trainer  # noqa: E402

HAND = ["time_uniform", "time_quadratic", "logsnr", "edm"]


def make_solver(name):
    return {"dpmpp": lambda: DPMSolverPP(order=3), "unipc": lambda: UniPC(order=3, variant="bh1"),
            "ipndm": lambda: IPNDM(order=3)}[name]()


def rmse(a, b):
    return (a - b).flatten(1).pow(2).mean(1).sqrt()


def teacher_of(model, schedule, x_T):
    tb = getattr(model, "testbed", None)
    if tb is not None:
        return tb.reference_solution(schedule, x_T, rtol=1e-8, atol=1e-8)
    with torch.no_grad():
        return UniPC(order=3, variant="bh1").sample(model, x_T, discretizations.logsnr_uniform(schedule, 20))


def baseline_grids(model, schedule, solver, nfe, seed):
    grids = {name: discretizations.get_discretization(name, schedule, nfe) for name in HAND}
    try:
        from ld3_ext.baselines import baseline_timesteps
        from ld3_ext.baselines.dmn import order_for
        grids["dmn"] = baseline_timesteps("dmn", schedule, nfe, order=order_for(solver))  # as `ld3 eval`'s
        shape = getattr(model, "sample_shape", None) or model.testbed.event_shape
        grids["gits"] = baseline_timesteps("gits", schedule, nfe, model=model, sample_shape=shape, seed=seed)
    except Exception as exc:  # report, don't hide: the record says which baselines ran
        print(f"  (model-based baselines unavailable: {type(exc).__name__}: {exc})")
    return grids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--models", nargs="*", default=["digits", "gmm:digits64", "gmm:random3072"])
    ap.add_argument("--solvers", nargs="*", default=["dpmpp", "unipc", "ipndm"])
    ap.add_argument("--nfes", type=int, nargs="*", default=[4, 5, 6, 8, 10])
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--time-mode", default="auto", choices=["auto", "lambda", "time"])
    ap.add_argument("--quick", action="store_true", help="digits model, DPM-Solver++(3M), NFE 5 only")
    ap.add_argument("--refresh", choices=["gits", "dmn"] + HAND, default=None,
                    help="recompute only this baseline's column of the records in --json (same held-out noises and "
                         "teacher; LD3 is not retrained, so sound for GITS, which is no init candidate; a record "
                         "whose init_choice is NAME is flagged ld3_started_from_refreshed) and update each "
                         "record's best baseline and reduction; the record keeps the old value under "
                         "median_rmse_before_refresh")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.solvers, args.nfes = ["digits"], ["dpmpp"], [5]
    if args.refresh:
        return refresh(args)
    records = []
    # the file's earlier records stay in it until this run has measured their configuration again: a run cut short
    # after its first record replaced a whole results file (README's ld3_cpu.json) with that one record
    earlier = _read_records(args.json) if args.json else []
    for model_name in args.models:
        model, schedule = load_model(model_name)
        dtype = torch.float64 if getattr(model, "testbed", None) is not None else torch.float32
        shape = getattr(model, "sample_shape", None) or model.testbed.event_shape
        g = torch.Generator().manual_seed(12345)  # held-out noises, disjoint from the trainer's seed-0 draws
        x_T = (schedule.prior_std() * torch.randn(args.n_eval, *shape, generator=g, dtype=torch.float64)).to(dtype)
        t0 = time.time()
        target = teacher_of(model, schedule, x_T)
        print(f"[{model_name}] teacher for {args.n_eval} held-out noises: {time.time() - t0:.1f}s", flush=True)
        for sname in args.solvers:
            for nfe in args.nfes:
                solver = make_solver(sname)
                grids = baseline_grids(model, schedule, solver, nfe, seed=0)
                med = {}
                with torch.no_grad():
                    for name, t in grids.items():
                        med[name] = rmse(solver.sample(model, x_T, t), target).median().item()
                teacher = "exact" if getattr(model, "testbed", None) is not None else "solver"
                t0 = time.time()
                trainer = LD3Trainer(model, schedule, solver, nfe, teacher=teacher, seed=0, progress=False,
                                     dtype=dtype, time_mode=args.time_mode)
                learned = trainer.fit()
                train_s = time.time() - t0
                with torch.no_grad():
                    x = solver.sample(model, x_T, learned.timesteps, model_timesteps=learned.model_timesteps)
                med["ld3"] = rmse(x, target).median().item()
                best_name = min((k for k in med if k != "ld3"), key=med.get)
                gain = 1.0 - med["ld3"] / med[best_name]
                rec = {"model": model_name, "solver": sname, "nfe": nfe, "median_rmse": med,
                       "best_baseline": best_name, "reduction_vs_best": gain, "train_seconds": train_s,
                       "time_mode": learned.time_mode, "time_mode_request": args.time_mode,
                       "time_mode_candidates_valid_loss": learned.metrics.get("time_mode_candidates_valid_loss"),
                       # the init="auto" pick: a --refresh of that baseline's column would leave LD3 stale
                       "init_choice": learned.metrics.get("init_choice"),
                       "n_eval": args.n_eval, "threads": torch.get_num_threads(), "machine": platform.processor()
                       or platform.machine()}
                records.append(rec)
                if args.json:
                    # after every record: a run cut short keeps what it measured, and what it has not redone yet
                    _write_records(args.json, _merged(earlier, records), complete=False)
                print(f"  {model_name:15s} {sname:6s} NFE {nfe:2d}  ld3 {med['ld3']:.4f}  best {best_name} "
                      f"{med[best_name]:.4f}  reduction {100 * gain:5.1f}%  train {train_s:5.1f}s  ({learned.time_mode})",
                      flush=True)
    print("\n| model | solver | NFE | " + " | ".join(HAND + ["dmn", "gits", "ld3"])
          + " | reduction vs best | time mode | train s |")
    print("|" + "---|" * (len(HAND) + 9))
    for r in records:
        m = r["median_rmse"]
        cells = [f"{m[k]:.4f}" if k in m else "—" for k in HAND + ["dmn", "gits", "ld3"]]
        print(f"| {r['model']} | {r['solver']} | {r['nfe']} | " + " | ".join(cells)
              + f" | {100 * r['reduction_vs_best']:.1f}% | {r['time_mode']} | {r['train_seconds']:.1f} |")
    n_ok = sum(r["reduction_vs_best"] >= 0.25 for r in records)
    print(f"\n{n_ok}/{len(records)} configurations at least 25% below the best baseline")
    if args.json:
        # the file's records of configurations this run did not measure stay (e.g. `--nfes 8 10` redoes those rows
        # of a full table), in the file's order; the re-measured ones replace theirs
        _write_records(args.json, _merged(earlier, records))
        print(f"wrote {args.json}")


def _write_records(path, records, complete=True):
    """Write through a temporary file and a rename: a crash leaves the old file or the new one, never half.
    ``complete=False``: a run in progress (its records so far, then the earlier file's not yet measured again)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"records": records, **({} if complete else {"complete": False})}, f, indent=1)
    os.replace(tmp, path)


def _read_records(path):
    try:
        with open(path) as f:
            return list(json.load(f).get("records", []))
    except (OSError, ValueError, AttributeError):
        return []


def _key(r):
    return r.get("model"), r.get("solver"), r.get("nfe")


def _merged(earlier, new):
    """``earlier`` with each record this run measured again replaced by the new one, then the new configurations."""
    fresh = {_key(r): r for r in new}
    out = [fresh.pop(_key(r), r) for r in earlier]
    return out + [r for r in new if _key(r) in fresh]


def refresh(args):
    """--refresh NAME: NAME's column of the records in --json recomputed with the current code."""
    if not args.json or not os.path.exists(args.json):
        raise SystemExit("--refresh needs --json naming an existing results file")
    with open(args.json) as f:
        records = json.load(f)["records"]
    for model_name in args.models:
        mine = [r for r in records if r["model"] == model_name and r["solver"] in args.solvers and r["nfe"] in args.nfes]
        if not mine:
            continue
        model, schedule = load_model(model_name)
        dtype = torch.float64 if getattr(model, "testbed", None) is not None else torch.float32
        shape = getattr(model, "sample_shape", None) or model.testbed.event_shape
        g = torch.Generator().manual_seed(12345)  # the held-out noises of main()
        x_T = (schedule.prior_std() * torch.randn(mine[0]["n_eval"], *shape, generator=g,
                                                  dtype=torch.float64)).to(dtype)
        target = teacher_of(model, schedule, x_T)
        for r in mine:
            solver = make_solver(r["solver"])
            if args.refresh in HAND:
                t = discretizations.get_discretization(args.refresh, schedule, r["nfe"])
            else:
                from ld3_ext.baselines import baseline_timesteps
                from ld3_ext.baselines.dmn import order_for
                kw = {"order": order_for(solver)} if args.refresh == "dmn" else \
                    {"model": model, "sample_shape": shape, "seed": 0}
                t = baseline_timesteps(args.refresh, schedule, r["nfe"], **kw)
            with torch.no_grad():
                new = rmse(solver.sample(model, x_T, t), target).median().item()
            med = r["median_rmse"]
            # the value before the FIRST refresh: a second run (e.g. after one cut short) must not replace it with
            # the first run's result
            r.setdefault("median_rmse_before_refresh", {}).setdefault(args.refresh, med.get(args.refresh))
            med[args.refresh] = new
            r["best_baseline"] = min((k for k in med if k != "ld3"), key=med.get)
            r["reduction_vs_best"] = 1.0 - med["ld3"] / med[r["best_baseline"]]
            if args.refresh not in r.setdefault("refreshed", []):
                r["refreshed"].append(args.refresh)
            if r.get("init_choice") == args.refresh:
                # LD3 started from this baseline's grid: its own number is of the old grid until it is retrained
                r["ld3_started_from_refreshed"] = True
                print(f"  note: LD3's init='auto' started from {args.refresh}'s grid in this record: rerun it without "
                      "--refresh for a current LD3 number", flush=True)
            print(f"  {model_name:15s} {r['solver']:6s} NFE {r['nfe']:2d}  {args.refresh} "
                  f"{r['median_rmse_before_refresh'][args.refresh]:.4f} -> {new:.4f}  best {r['best_baseline']}  "
                  f"ld3 reduction {100 * r['reduction_vs_best']:.1f}%", flush=True)
            _write_records(args.json, records)  # after every record: a run cut short keeps what it refreshed
    n_ok = sum(r["reduction_vs_best"] >= 0.25 for r in records)
    print(f"\n{n_ok}/{len(records)} configurations at least 25% below the best baseline")


if __name__ == "__main__":
    main()
