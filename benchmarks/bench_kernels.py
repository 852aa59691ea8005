#!/usr/bin/env python
"""Microbenchmarks of the fused multistep kernels against the pure-PyTorch reference path.

    python benchmarks/bench_kernels.py --json PATH [--threads N] [--device cpu|cuda] [--quick]

Cases (fp32, shapes 64x3x32x32, 16x4x64x64, 8x4x128x128, 1x3x256x256; 3 history terms):
  1 update_fwd     x_next = a*x + sum b_k m_k: eager reference vs fused (and fused with out=)
                   vs torch.compile of the reference
  2 update_fwdbwd  forward + backward incl. the coefficient table and timestep gradients:
                   eager autograd (reference backend) vs fused
  3 sampler        a whole 10-step DPM-Solver++(3M) sample, forward + backward w.r.t. the
                   timesteps, with a trivial model (x0 = 0.9 x): reference vs fused backend
  4 copy           copy_ of as many bytes as the fused kernel must move (the bandwidth ceiling)

Timing: medians over repeated samples after warm-up; the variants of a case are measured
round-robin so that load from other processes hits all of them alike.  Cases 1 and 2 time their
copy ceiling as one more variant of the same rounds (fraction_of_copy = copy time / variant time;
the copy's median is the record's copy_median_s).  A copy reads half the bytes and writes half,
the update forward reads 4 tensors and writes 1: with write-allocate caches a copy moves more than
its byte count says, so the fused forward can exceed 1.0 "of copy" (up to ~1.25).

Fields null by design: bytes_moved, GBps and fraction_of_copy for the sampler (it runs a model and
the coefficient math besides the kernels), ratio_vs_eager and fraction_of_copy for the copies.
The sampler's solver_overhead_s subtracts 20 bare network calls (0.9*x, forward and backward):
the wrapper's per-call work (predict's argument checks and the time conversion, tens of
microseconds) stays in both variants' overhead.

Two traps on the shared 2-core CPU this was written for:
  * glibc malloc returns large blocks to the OS (mmap/trim) and page-faults them back on every
    call, which made eager calls up to 6x slower.  The script re-executes itself with
    MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ set (unless --no-malloc-guard) and records
    the setting in the JSON.
  * another busy process on the second core made 2-thread OpenMP runs ~100x slower: run with
    --threads 1 as well and compare.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# Keep freed blocks in the heap: no mmap for tensors up to 32 MiB (the glibc maximum on 64-bit)
# and no trimming of the heap top, so steady-state calls do not page-fault.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def _malloc_guard(argv):
    if "--no-malloc-guard" in argv or all(k in os.environ for k in MALLOC_ENV):
        return
    env = dict(os.environ, **MALLOC_ENV)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + argv, env)


if __name__ == "__main__":
    _malloc_guard(sys.argv[1:])

import torch  # noqa: E402

try:  # prefer the installed package (a plain install keeps _C only in site-packages)
    import ld3_ext  # noqa: E402
except ImportError:
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
    import ld3_ext  # noqa: E402
from ld3_ext import _native, fused, ops  # noqa: E402
from ld3_ext.coefficients import SolverSpec  # noqa: E402
from ld3_ext.schedules import EDM  # noqa: E402

SHAPES = [(64, 3, 32, 32), (16, 4, 64, 64), (8, 4, 128, 128), (1, 3, 256, 256)]
CUDA_EXTRA_SHAPES = [(16, 4, 512, 512)]  # 64 MiB per tensor: the bandwidth-bound regime
K = 3  # history terms of DPM-Solver++(3M)


def shape_name(shape):
    return "x".join(str(s) for s in shape)


class Timer:
    def __init__(self, device, repeats, warmup, min_sample_s):
        self.device, self.repeats, self.warmup, self.min_sample_s = device, repeats, warmup, min_sample_s

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _calls_per_sample(self, fn):
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        one = max(time.perf_counter() - t0, 1e-7)
        return max(1, min(1000, int(self.min_sample_s / one)))

    def run(self, variants):
        """Median seconds per call of each variant, sampled round-robin."""
        for fn in variants.values():
            for _ in range(self.warmup):
                fn()
        inner = {name: self._calls_per_sample(fn) for name, fn in variants.items()}
        samples = {name: [] for name in variants}
        for _ in range(self.repeats):
            for name, fn in variants.items():
                self.sync()
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    fn()
                self.sync()
                samples[name].append((time.perf_counter() - t0) / inner[name])
        return {name: statistics.median(v) for name, v in samples.items()}


def _git_commit():
    try:
        out = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_caches():
    """{"L1d": "48K", "L2": "2048K", "L3": "...", ...} of CPU 0 from sysfs (Linux); {} elsewhere."""
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return caches
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(base, entry, "level")) as fh:
                level = fh.read().strip()
            with open(os.path.join(base, entry, "type")) as fh:
                kind = fh.read().strip()
            with open(os.path.join(base, entry, "size")) as fh:
                size = fh.read().strip()
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        caches[f"L{level}{suffix}"] = size
    return caches


def machine_info(device):
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
            # other processes' load explains outliers (a busy second core stalls 2-thread runs)
            "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        info["cpu"] = platform.processor()
    # VMs report one model name for different hosts; the cache sizes and clock tell them apart
    info["cpu_caches"] = _cpu_caches()
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_mhz"] = next((float(ln.split(":", 1)[1]) for ln in fh if ln.startswith("cpu MHz")), None)
    except (OSError, ValueError):
        info["cpu_mhz"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
    info["commit"] = os.environ.get("LD3_GIT_COMMIT") or _git_commit()
    if _native.native_available():  # which copy of the CPU loops ran (csrc/cpu/cpu_isa.h)
        info["cpu_isa"] = _native._C.cpu_isa()
    return info


def build_inputs(shape, device, gen_seed=0):
    g = torch.Generator(device="cpu").manual_seed(gen_seed)
    mk = lambda: torch.randn(shape, generator=g).to(device)  # noqa: E731
    return mk(), [mk() for _ in range(K)], mk()


CASE_NAMES = {1: "update_fwd", 2: "update_fwdbwd", 3: "sampler", 4: "copy"}


def _parse_cases(text):
    """--cases: numbers or names, e.g. "3,4" or "sampler,copy"."""
    by_name = {v: k for k, v in CASE_NAMES.items()}
    cases = set()
    for c in (c.strip() for c in text.split(",")):
        if not c:
            continue
        if c in by_name:
            cases.add(by_name[c])
        elif c.isdigit() and int(c) in CASE_NAMES:
            cases.add(int(c))
        else:
            raise argparse.ArgumentTypeError(f"unknown case {c!r}: use 1-4 or {', '.join(CASE_NAMES.values())}")
    if not cases:
        raise argparse.ArgumentTypeError("no case named")
    return cases


def _parse_shapes(text):
    """--shapes: e.g. "64x3x32x32,1x3x256x256" (positive sizes)."""
    shapes = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        try:
            shape = tuple(int(v) for v in name.split("x"))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"shape {name!r} is not sizes joined by 'x', e.g. 64x3x32x32")
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError("no shape named")
    return shapes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    ap.add_argument("--cases", default="1,2,3,4", type=_parse_cases,
                    help="comma-separated subset of 1,2,3,4 or of their names " + ",".join(CASE_NAMES.values()))
    ap.add_argument("--shapes", default=None, type=_parse_shapes, help="comma-separated subset, e.g. 64x3x32x32,1x3x256x256")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant of case 1")
    ap.add_argument("--no-malloc-guard", action="store_true", help="do not set the glibc malloc variables")
    args = ap.parse_args(argv)

    if not _native.native_available():
        sys.exit(f"ld3_ext._C is not built ({_native.load_error()}); build with pip install --no-build-isolation .")
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and _native.native_cuda_available()):
        sys.exit("--device cuda needs a GPU and an extension built with LD3_WITH_CUDA=ON")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cases = args.cases
    repeats, warmup = (7, 2) if args.quick else (25, 5)
    timer = Timer(device, repeats, warmup, min_sample_s=0.002 if args.quick else 0.01)
    machine = machine_info(device)
    # on CUDA the 64 MiB shape first: it carries the bandwidth target, and a run cut short keeps what it measured
    shapes = (CUDA_EXTRA_SHAPES + SHAPES) if device.type == "cuda" else SHAPES
    if args.shapes:
        shapes = args.shapes
    records = []
    esize = 4  # fp32

    def record(case, shape, variant, median, eager, nbytes, copy_s=None):
        gbps = nbytes / median / 1e9 if nbytes else None
        rec = {"case": case, "shape": shape_name(shape), "variant": variant, "median_s": median,
               "ratio_vs_eager": (eager / median) if eager else None, "bytes_moved": nbytes, "GBps": gbps,
               "fraction_of_copy": (copy_s / median) if (copy_s and nbytes) else None,
               "copy_median_s": copy_s if (copy_s and nbytes) else None,  # the ceiling, timed in the same rounds
               "machine": machine, "threads": threads, "device": str(device), "dtype": "float32"}
        records.append(rec)
        return rec

    def write_json(complete):
        if not args.json:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"records": records, "machine": machine, "threads": threads, "device": str(device),
                       "quick": args.quick, "complete": complete}, fh, indent=1)
        os.replace(tmp, args.json)  # a reader (or a kill) never meets half a file

    schedule = EDM()
    spec = SolverSpec("dpmpp", order=3)
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        x, hist, gout = build_inputs(shape, device)
        coef = torch.tensor([0.9, 0.3, -0.2, 0.05], dtype=torch.float64, device=device)
        fwd_bytes = (2 + K) * numel * esize  # read x + K history, write out
        bwd_bytes = (2 + K + 1 + K) * numel * esize  # read g, x, K history; write grad_x, K grads
        # case 4: the copy ceilings on their own (cases 1 and 2 time the same copies again, in their own rounds,
        # for their fraction_of_copy); also the contention check's bandwidth
        src_f = torch.randn(fwd_bytes // (2 * esize), device=device)
        dst_f = torch.empty_like(src_f)
        src_b = torch.randn((fwd_bytes + bwd_bytes) // (2 * esize), device=device)
        dst_b = torch.empty_like(src_b)
        if 4 in cases:
            copy_t = timer.run({"fwd_bytes": lambda: dst_f.copy_(src_f), "fwdbwd_bytes": lambda: dst_b.copy_(src_b)})
            record("copy", shape, "copy_fwd_bytes", copy_t["fwd_bytes"], None, fwd_bytes)
            record("copy", shape, "copy_fwdbwd_bytes", copy_t["fwdbwd_bytes"], None, fwd_bytes + bwd_bytes)

        if 1 in cases:
            out = torch.empty_like(x)
            variants = {
                "eager": lambda: ops.multistep_update_reference(x, coef, hist),
                "fused": lambda: fused.multistep_update(x, coef, hist),
                "fused_out": lambda: fused.multistep_update(x, coef, hist, out=out),
            }
            if not args.no_compile:
                compiled = torch.compile(ops.multistep_update_reference, dynamic=False)
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():  # the grad mode it is timed in: else Dynamo compiles again in the warm-up
                        compiled(x, coef, hist)
                except Exception as e:  # noqa: BLE001 - a compiler failure loses that variant, not the run
                    print(f"[compile {shape_name(shape)} FAILED, variant skipped: {type(e).__name__}: {e}]"[:2000],
                          flush=True)
                else:
                    print(f"[compile {shape_name(shape)}: {time.perf_counter() - t0:.1f} s]", flush=True)
                    variants["compile"] = lambda: compiled(x, coef, hist)
            # the ceiling in the same round-robin: timed on its own it met other load (a copy at 136 GB/s for one
            # shape and 64 GB/s for the next in one run made fraction_of_copy 0.54 and 1.91; benchmark audit)
            variants["copy"] = lambda: dst_f.copy_(src_f)
            with torch.no_grad():
                res = timer.run(variants)
            ceiling = res.pop("copy")
            for name, med in res.items():
                record("update_fwd", shape, name, med, res["eager"], fwd_bytes, ceiling)

        if 2 in cases:
            t = torch.tensor([80.0, 40.0, 20.0, 10.0, 5.0], dtype=torch.float64, device=device)
            xs = x.clone().requires_grad_()
            hs = [h.clone().requires_grad_() for h in hist]

            def fwdbwd(backend):
                def run():
                    tt = t.detach().requires_grad_()
                    table = ops.coefficient_table(schedule, tt, spec, backend)
                    y = ops.multistep_update(xs, table[3, 0, :1 + K], hs, backend)
                    torch.autograd.grad(y, [xs, tt, *hs], gout)
                return run

            res = timer.run({"eager": fwdbwd("reference"), "fused": fwdbwd("fused"),
                             "copy": lambda: dst_b.copy_(src_b)})  # the ceiling in the same rounds, as in case 1
            ceiling = res.pop("copy")
            for name, med in res.items():
                record("update_fwdbwd", shape, name, med, res["eager"], fwd_bytes + bwd_bytes, ceiling)

        if 3 in cases:
            # check_output=False: the NaN/Inf scan of every model output is a wrapper safety check,
            # not solver work, and would be timed identically in both variants
            model = ld3_ext.wrap_model(lambda xx, tt: 0.9 * xx, schedule, prediction="x0", check_output=False)
            steps = torch.linspace(schedule.t_max ** (1 / 7), schedule.t_min ** (1 / 7), 11,
                                   dtype=torch.float64, device=device) ** 7
            solvers = {b: ld3_ext.DPMSolverPP(order=3, backend=b) for b in ("reference", "fused")}

            def sample(backend):
                def run():
                    tt = steps.detach().requires_grad_()
                    y = solvers[backend].sample(model, x, tt)
                    torch.autograd.grad(y, tt, gout)
                return run

            # the trivial model costs the same in both: one 0.9*x forward and one grad*0.9 backward
            # per step, each a single multiply; time it to report the solver overhead
            model_t = timer.run({"model": lambda: 0.9 * x})["model"]
            res = timer.run({"eager": sample("reference"), "fused": sample("fused")})
            for name, med in res.items():
                rec = record("sampler", shape, "reference" if name == "eager" else "fused", med, res["eager"], None)
                rec["solver_overhead_s"] = max(med - 10 * 2 * model_t, 0.0)  # 10 model calls fwd + bwd
            ref_o, fus_o = records[-2]["solver_overhead_s"], records[-1]["solver_overhead_s"]
            records[-1]["overhead_ratio_vs_reference"] = ref_o / fus_o if fus_o > 0 else None

        write_json(False)  # after every shape: a run stopped at a time limit keeps what it measured

    if device.type == "cpu":  # a CPU heuristic: on a GPU small copies are bound by the launch, not contention
        flag_contention(records)
    print_table(records)
    write_json(True)
    if args.json:
        print(f"wrote {len(records)} records to {args.json}")
    return records


def flag_contention(records):
    """Mark shapes whose copy ran >10x below the run's best copy bandwidth: another process held a
    core (the 2-thread trap), so their numbers measure the scheduler, not the kernels."""
    copies = {r["shape"]: r["GBps"] for r in records if r["variant"] == "copy_fwd_bytes" and r["GBps"]}
    if not copies:
        return
    best = max(copies.values())
    for r in records:
        r["contended"] = r["shape"] in copies and copies[r["shape"]] < 0.1 * best
    bad = sorted({r["shape"] for r in records if r["contended"]})
    if bad:
        print(f"WARNING: copy bandwidth collapsed for {', '.join(bad)} (another process on a core?); "
              "those records are flagged contended=true -- rerun, or use --threads 1")


def print_table(records):
    print(f"{'case':<14} {'shape':<14} {'variant':<18} {'median_us':>11} {'x eager':>8} {'GB/s':>8} {'of copy':>8}")
    for r in records:
        fmt = lambda v, spec: (format(v, spec) if v is not None else "-")  # noqa: E731
        print(f"{r['case']:<14} {r['shape']:<14} {r['variant']:<18} {r['median_s'] * 1e6:>11.1f} "
              f"{fmt(r['ratio_vs_eager'], '8.2f'):>8} {fmt(r['GBps'], '8.1f'):>8} "
              f"{fmt(r['fraction_of_copy'], '8.2f'):>8}")


if __name__ == "__main__":
    main()
