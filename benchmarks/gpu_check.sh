#!/usr/bin/env bash
# GPU check for a CUDA machine (no network): build with CUDA forced on, run the launch-count check, the CUDA
# benchmark and the CUDA tests, and leave logs + JSON in RESULTS_DIR.  Budget: < 6 minutes in total: each step
# has its own timeout (build 150 s, launch count 40 s, benchmark 80 s, tests 130 s, the python start-ups
# 30-60 s), cut to what is left of GPU_CHECK_BUDGET_S (default 345 s) so that the sum fits as well.  The bounded
# steps that give the numbers run before the tests, so a hung test cannot take their time; the benchmark writes
# its JSON after every shape, the tests their junit XML when stopped.
#   benchmarks/gpu_check.sh [RESULTS_DIR]        (default: $OUT when set, else benchmarks/results/gpu_<host>)
# On the lent GPU machine only what is written under $OUT comes back (at most 8 files): the steps run in a
# scratch folder, so nothing else lands there, and core dumps are off.
set -uo pipefail
ulimit -c 0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${1:-${OUT:-$ROOT/benchmarks/results/gpu_$(hostname -s)}}"
mkdir -p "$RESULTS" || { echo "gpu_check: cannot create $RESULTS" >&2; exit 2; }
RESULTS="$(cd "$RESULTS" && pwd)" || exit 2  # absolute (relative to the caller): later steps run elsewhere
WORK="$(mktemp -d)" || exit 2
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT" || exit 2
# python3 first: on the lent GPU machine the plain python3 is the one with torch (a `python` may not be)
PY="${PYTHON:-$(command -v python3 || command -v python)}"
# nvcc may sit in the toolkit's folder only (CMake would find it there; the preflight looks on PATH)
if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH" CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}"
fi
# which commit ran (the working tree travels without .git): the caller may pass it, else git when there is one
export LD3_GIT_COMMIT="${LD3_GIT_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
status=0
END=$((SECONDS + ${GPU_CHECK_BUDGET_S:-345}))
left() { local l=$((END - SECONDS)); ((l > $1)) && l=$1; ((l < 1)) && l=1; echo "$l"; }  # step timeout, s
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$RESULTS/summary.log"; }

{
  echo "commit $LD3_GIT_COMMIT"
  timeout "$(left 30)" nvidia-smi || true
  timeout "$(left 60)" "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
  nvcc --version || true
} > "$RESULTS/env.log" 2>&1

# 0) preflight, seconds: the offline build needs these already installed, and a failure here costs nothing
#    (a missing header or a read-only site-packages would show only after a minute of compiling); a CUDA major
#    version of nvcc other than torch's may build but load a second runtime (warned, not fatal)
if ! timeout "$(left 60)" "$PY" - >> "$RESULTS/summary.log" 2>&1 <<'PYEOF'
import importlib.util, os, re, shutil, subprocess, sys, sysconfig
import torch
missing = [m for m in ("pip", "scikit_build_core", "pybind11", "ninja", "pytest", "numpy") if importlib.util.find_spec(m) is None]
missing += [c for c in ("cmake", "nvcc") if shutil.which(c) is None]
if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
    missing.append("the Python headers (Python.h)")
if missing:
    sys.exit(f"preflight: missing {', '.join(missing)} (no network here: install them before the GPU session)")
site = sysconfig.get_paths()["purelib"]
if not os.access(site, os.W_OK):
    sys.exit(f"preflight: {site} is not writable: pip cannot install the build there")
if not torch.cuda.is_available():
    sys.exit("preflight: torch.cuda.is_available() is False")
if importlib.util.find_spec("mpmath") is None:
    print("preflight WARNING: no mpmath: the coefficient-precision tests will error")
if importlib.util.find_spec("pytest_timeout") is None:
    print("preflight WARNING: no pytest-timeout: a hung test holds the test step until its timeout")
nv = re.search(r"release (\d+)", subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout)
tc = (torch.version.cuda or "").split(".")[0]
if nv and tc and nv.group(1) != tc:
    print(f"preflight WARNING: nvcc CUDA {nv.group(1)} but torch built with CUDA {torch.version.cuda}")
print("preflight OK:", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
PYEOF
then
  log "PREFLIGHT FAILED"; exit 1
fi

# 1) build: CUDA forced on so a missing nvcc/CUDA torch is an error, not a silent CPU build.
#    Only the GPU's own arch (faster); sm_90 covers H100/H200.
log "build"
ARCH="$(timeout "$(left 30)" "$PY" -c 'import torch; p=torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")' 2>/dev/null || echo 90)"
export LD3_WITH_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
# PIP_BREAK_SYSTEM_PACKAGES: a distro python3 (PEP 668 "externally managed") refuses any install otherwise, and
# the one GPU session would end at this step
if ! PIP_BREAK_SYSTEM_PACKAGES=1 timeout "$(left 150)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v \
     --config-settings=cmake.define.LD3_CUDA_ARCHS="$ARCH" . > "$RESULTS/build.log" 2>&1; then
  log "BUILD FAILED (see build.log)"; tail -30 "$RESULTS/build.log"; exit 1
fi
# run from outside the source tree so the installed package (with _C) is imported
cd "$WORK" || exit 2
timeout "$(left 60)" "$PY" -c 'import ld3_ext, ld3_ext._native as n; assert n.native_cuda_available(), "no CUDA kernels"; print("has_cuda OK")' \
  >> "$RESULTS/summary.log" 2>&1 || { log "IMPORT FAILED"; exit 1; }
# what `ld3 info` tells a user on this machine: the architectures built must cover the GPU
timeout "$(left 30)" "$PY" -c 'from ld3_ext.build_info import build_info, format_build_info
i = build_info(); print(format_build_info(i)); assert i["gpus"] and all(g["covered"] for g in i["gpus"]), "GPU not covered"' \
  >> "$RESULTS/summary.log" 2>&1 || { log "ld3 info: GPU not covered by the build (see summary.log)"; status=1; }

# 2) launch counts: one kernel per forward step, at most two per backward, and no copy kernel either
#    way, also for channels_last inputs (walked in their layout: csrc/dense_layout.h)
log "launch counts"
timeout "$(left 40)" "$PY" - > "$RESULTS/launches.log" 2>&1 <<'PYEOF' || status=1
import torch, ld3_ext
from ld3_ext import fused
from torch.profiler import profile, ProfilerActivity
ok = True
for fmt in (torch.contiguous_format, torch.channels_last):
    x = torch.randn(8, 4, 64, 64, device="cuda").contiguous(memory_format=fmt).requires_grad_()
    h = [torch.randn_like(x) for _ in range(3)]  # randn_like keeps x's layout
    c = torch.randn(4, dtype=torch.float64, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    for _ in range(3):
        y = fused.multistep_update(x, c, h); torch.autograd.grad(y, [x, c], g)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        y = fused.multistep_update(x, c, h); torch.cuda.synchronize()
    fwd = [e.name for e in p.events() if e.device_type.name == "CUDA"]
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        torch.autograd.grad(y, [x, c], g); torch.cuda.synchronize()
    kernels = [e.name for e in p.events() if e.device_type.name == "CUDA"]
    bwd = [k for k in kernels if "ld3" in k]
    copies = [k for k in kernels if "copy" in k.lower() or "memcpy" in k.lower()]
    print(fmt, "forward kernels:", len(fwd), fwd)
    print(fmt, "backward ld3 kernels:", len(bwd), bwd, "copy kernels:", len(copies), copies)
    assert y.stride() == x.stride(), f"{fmt}: output strides {y.stride()}, x's {x.stride()}"
    ok = ok and len(fwd) == 1 and len(bwd) <= 2 and not copies
# a whole fused DPM-Solver++(3M) sample of N steps: one ld3 launch per step forward and at most two per step
# backward (the adjoint step), besides the coefficient table's; the other kernels are the model's and scalar
# bookkeeping, printed for the record
N = 10
sched = ld3_ext.EDM()
model = ld3_ext.wrap_model(lambda xx, tt: 0.9 * xx, sched, prediction="x0", check_output=False)
grid = ld3_ext.discretizations.edm(sched, N).cuda()
x = torch.randn(8, 4, 64, 64, device="cuda")
solver = ld3_ext.DPMSolverPP(order=3, backend="fused")
def solve():
    tt = grid.detach().requires_grad_()
    return tt, solver.sample(model, x, tt)
for _ in range(3):
    tt, y = solve(); torch.autograd.grad(y, tt, torch.ones_like(y))
g = torch.ones_like(x)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as p:
    tt, y = solve(); torch.cuda.synchronize()
fwd = [e.name for e in p.events() if e.device_type.name == "CUDA"]
with profile(activities=[ProfilerActivity.CUDA]) as p:
    torch.autograd.grad(y, tt, g); torch.cuda.synchronize()
bwd = [e.name for e in p.events() if e.device_type.name == "CUDA"]
def ld3_steps(names):  # ld3 kernels other than the coefficient table's
    return [k for k in names if "ld3" in k and "coefficient_table" not in k and "timestep_grad" not in k]
print(f"sampler, {N} steps: forward ld3 step kernels {len(ld3_steps(fwd))} of {len(fwd)} kernels; "
      f"backward ld3 step kernels {len(ld3_steps(bwd))} of {len(bwd)} kernels")
print("  forward kernels:", sorted(set(fwd)))
print("  backward kernels:", sorted(set(bwd)))
ok = ok and len(ld3_steps(fwd)) == N and len(ld3_steps(bwd)) <= 2 * N
assert ok, "launch budget exceeded"
PYEOF
cat "$RESULTS/launches.log" | tee -a "$RESULTS/summary.log"
# 3) benchmark (compile variant skipped on GPU to stay in budget; the JSON is rewritten after every shape)
log "benchmark"
timeout "$(left 80)" "$PY" "$ROOT/benchmarks/bench_kernels.py" --device cuda --no-compile --quick \
  --json "$RESULTS/bench_cuda.json" > "$RESULTS/bench.log" 2>&1 || status=1
tail -40 "$RESULTS/bench.log"
# the issue's GPU bandwidth target, read from the JSON: the fused update forward at >= 64 MB per tensor must run at
# >= 80 % of a copy_ of the same bytes.  A miss is reported (a target, not a correctness failure: status unchanged)
timeout "$(left 30)" "$PY" - "$RESULTS/bench_cuda.json" 2>&1 <<'PYEOF' | tee -a "$RESULTS/summary.log"
import json, math, sys
try:
    recs = json.load(open(sys.argv[1]))["records"]
except (OSError, ValueError, KeyError) as exc:  # the benchmark stopped before its first shape
    recs = []
    print(f"bandwidth target: no benchmark records ({type(exc).__name__}: {exc})")
def tensor_bytes(r):  # one fp32 tensor of the record's shape
    return 4 * math.prod(int(v) for v in r["shape"].split("x"))
rows = [r for r in recs if r.get("case") == "update_fwd" and r.get("variant") == "fused"
        and r.get("fraction_of_copy") is not None and tensor_bytes(r) >= 64 * 2**20]
if not rows:
    print("bandwidth target: NOT MEASURED (no fused update_fwd record at >= 64 MB per tensor)")
for r in rows:
    f = r["fraction_of_copy"]
    print(f"bandwidth target, update_fwd {r['shape']}: {f:.2f} of copy_ ({r.get('GBps', float('nan')):.0f} GB/s): "
          f"{'met' if f >= 0.8 else 'MISSED'} (target >= 0.80)")
PYEOF

# 4) tests: CUDA parity/gradcheck/determinism/graph capture/precision (test_cuda_ops.py; the CPU-only test files
#    are CI's).  SIGINT at the timeout: pytest then still reports the failures so far and writes tests.xml (a
#    SIGTERM would lose both); -v logs each test as it starts, so a hang names its test; -rfEs lists skips too (a
#    skipped CUDA test checks nothing); a per-test timeout where pytest-timeout is installed (its plugin loads by
#    itself).  Not CUDA_LAUNCH_BLOCKING: the graph-capture tests must run as a user's capture does.
log "tests"
PER_TEST=()
"$PY" -c 'import pytest_timeout' 2> /dev/null && PER_TEST=(--timeout 60)
timeout -s INT -k 10 "$(left 130)" "$PY" -m pytest -v -rfEs -p no:cacheprovider "${PER_TEST[@]}" \
  --junitxml="$RESULTS/tests.xml" "$ROOT/tests/test_cuda_ops.py" > "$RESULTS/tests.log" 2>&1 || status=1
grep -E '^(FAILED|ERROR|SKIPPED) |[0-9]+ (passed|failed|error)|KeyboardInterrupt|Timeout' "$RESULTS/tests.log" | tail -40 \
  | tee -a "$RESULTS/summary.log"

log "done (status $status)"
exit $status
