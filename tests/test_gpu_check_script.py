"""benchmarks/gpu_check.sh, the one script a scarce GPU session runs, exercised on the CPU.

Without a GPU its preflight fails at once, which is enough to check where its logs go and that
it stops cleanly; the steps after the preflight are checked with a stand-in python (a shell
script) that makes each step take as long as the test wants.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "gpu_check.sh")


def _run(tmp_path, env_extra, args=(), timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, **env_extra}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT, *args], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def test_results_default_to_out_when_no_dir_is_given(tmp_path):
    """On the GPU machine only $OUT comes back: with no RESULTS_DIR argument the logs must land there."""
    out = tmp_path / "out"
    out.mkdir()
    proc, _ = _run(tmp_path, {"OUT": str(out)})
    assert proc.returncode == 1, proc.stdout + proc.stderr  # no GPU here: the preflight stops it
    summary = (out / "summary.log").read_text()
    assert "PREFLIGHT FAILED" in summary and (out / "env.log").exists()


def test_total_time_is_capped_by_the_budget(tmp_path):
    """Each step's timeout is cut to what is left of GPU_CHECK_BUDGET_S: a build that would run for a minute
    is stopped after the few seconds left, not after its own 150 s (the steps' own limits alone add up to
    more than the 6 minutes a GPU session plans for)."""
    fake = tmp_path / "fake_python"
    # passes the preflight and the other quick calls; `-m pip` (the build) would take a minute
    fake.write_text('#!/bin/bash\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exec sleep 60; fi\n'
                    'if [ "$1" = "-" ]; then cat > /dev/null; fi\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc, seconds = _run(tmp_path, {"PYTHON": str(fake), "GPU_CHECK_BUDGET_S": "5"}, args=(str(out),))
    assert proc.returncode == 1 and "BUILD FAILED" in (out / "summary.log").read_text(), proc.stdout + proc.stderr
    assert seconds < 30, f"gpu_check.sh ran {seconds:.0f} s on a 5 s budget"


def test_python3_is_preferred_over_python(tmp_path):
    """On the GPU machine the plain python3 holds torch; a `python` earlier on PATH (another interpreter)
    must not be the one the check runs with."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text("#!/bin/bash\necho 'wrong interpreter' >&2\nexit 3\n")
    (fake_bin / "python").chmod(0o755)
    (fake_bin / "python3").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env.get('PATH', '')}"
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT, str(out)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    env_log = (out / "env.log").read_text()
    assert "wrong interpreter" not in env_log and "torch " in env_log, env_log
    # the preflight ran in the real interpreter: it names what this GPU-less machine lacks
    assert "preflight:" in (out / "summary.log").read_text(), proc.stdout + proc.stderr


def test_a_full_run_leaves_at_most_8_files(tmp_path):
    """Only 8 files come back from the GPU machine's $OUT: a step that wrote a ninth would lose a log.  A
    stand-in python runs every step at once and writes the files the real tools are told to write."""
    fake = tmp_path / "fake_python"
    fake.write_text('#!/bin/bash\nprev=""\nfor a in "$@"; do\n'
                    '  case "$a" in --junitxml=*) : > "${a#--junitxml=}" ;; esac\n'
                    '  if [ "$prev" = "--json" ]; then : > "$a"; fi\n  prev="$a"\ndone\n'
                    'if [ "$1" = "-" ]; then cat > /dev/null; fi\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc, _ = _run(tmp_path, {"PYTHON": str(fake)}, args=(str(out),))
    assert proc.returncode == 0 and "done (status 0)" in (out / "summary.log").read_text(), proc.stdout + proc.stderr
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert {"tests.xml", "bench_cuda.json", "launches.log"} <= set(files), files  # every step ran
    assert len(files) <= 8 and all(p.is_file() for p in out.rglob("*")), files


def test_steps_run_outside_the_results_folder_in_budget_order(tmp_path):
    """A step that leaves a file in its working folder (a compiler's debug folder, a crash dump) must not make a
    ninth file in $OUT, and the bounded steps that give the numbers (launch counts, benchmark) run before the tests,
    so a hung test cannot take their time."""
    fake = tmp_path / "fake_python"
    order = tmp_path / "order.txt"
    # (not in the source tree, where the build must run: pip install . there)
    fake.write_text('#!/bin/bash\n[ -e pyproject.toml ] || : > "stray_$$"\nprev=""\nfor a in "$@"; do\n'
                    f'  case "$a" in --junitxml=*) : > "${{a#--junitxml=}}"; echo tests >> {order} ;; esac\n'
                    f'  if [ "$prev" = "--json" ]; then : > "$a"; echo benchmark >> {order}; fi\n  prev="$a"\ndone\n'
                    f'if [ "$1" = "-" ]; then grep -q "launch budget" && echo launches >> {order}; fi\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc, _ = _run(tmp_path, {"PYTHON": str(fake)}, args=(str(out),))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith("stray_")]
    assert order.read_text().split() == ["launches", "benchmark", "tests"]
