"""benchmarks/bench_kernels.py still runs and writes the records the issue specifies.

Not a timing test (no speed is asserted): a tiny shape, --quick, in a child process from outside the
source tree.  The benchmark is run by hand and on the GPU box (benchmarks/gpu_check.sh), so without
this a broken import or a renamed record field would show only there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "bench_kernels.py")
FIELDS = {"case", "shape", "variant", "median_s", "ratio_vs_eager", "bytes_moved", "GBps", "fraction_of_copy",
          "machine", "threads", "device", "dtype"}


def test_bench_kernels_writes_one_record_per_case_shape_variant(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--no-compile", "--threads", "1",
                           "--shapes", "2x3x8x8,1x5", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and data["device"] == "cpu" and data["complete"] is True
    assert data["machine"]["commit"]  # which code ran (a git checkout here; LD3_GIT_COMMIT on the GPU box)
    # VMs share a model name across hosts: the cache sizes and clock say which host ran it
    caches = data["machine"]["cpu_caches"]
    assert isinstance(caches, dict)
    if os.path.isdir("/sys/devices/system/cpu/cpu0/cache"):
        assert caches.get("L1d", "").endswith("K") and "L2" in caches
    # the malloc guard re-executes the script with the glibc settings and records them
    assert all(data["machine"]["malloc_env"][k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    recs = data["records"]
    keys = [(r["case"], r["shape"], r["variant"]) for r in recs]
    assert len(keys) == len(set(keys))
    want = {("copy", "copy_fwd_bytes"), ("copy", "copy_fwdbwd_bytes"), ("update_fwd", "eager"),
            ("update_fwd", "fused"), ("update_fwd", "fused_out"), ("update_fwdbwd", "eager"),
            ("update_fwdbwd", "fused"), ("sampler", "reference"), ("sampler", "fused")}
    for shape in ("2x3x8x8", "1x5"):
        assert {(c, v) for c, s, v in keys if s == shape} == want
    for r in recs:
        assert FIELDS <= r.keys(), r
        assert r["median_s"] > 0 and r["threads"] == 1 and r["dtype"] == "float32"
        if r["case"] in ("update_fwd", "update_fwdbwd"):
            # bytes the fused kernel must move: (2 + K) passes forward, (3 + 2K) more backward, K = 3
            numel = 2 * 3 * 8 * 8 if r["shape"] == "2x3x8x8" else 5
            passes = 5 if r["case"] == "update_fwd" else 5 + 9
            assert r["bytes_moved"] == passes * numel * 4
            assert r["GBps"] > 0 and r["fraction_of_copy"] > 0 and r["ratio_vs_eager"] > 0
        if (r["case"], r["variant"]) == ("sampler", "fused"):
            assert r["overhead_ratio_vs_reference"] > 0
    assert "sampler" in proc.stdout and "update_fwd" in proc.stdout  # the printed table
    # the README table from it: a run without the compile variant (the GPU check's) shows "-" there
    summary = subprocess.run([sys.executable, os.path.join(os.path.dirname(BENCH), "summarize_kernels.py"), str(out)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr[-4000:]
    if caches.get("L2"):
        assert f"L2 {caches['L2']}" in summary.stdout  # the machine line names the host's caches
    rows = [ln.split(" | ") for ln in summary.stdout.splitlines() if ln.startswith(("| 2x3x8x8", "| 1x5"))]
    assert len(rows) == 2 and all(r[2] == "-" and r[1].endswith("x") for r in rows)


def test_bench_hot_kernels_runs_and_prints_every_row(tmp_path):
    script = os.path.join(os.path.dirname(BENCH), "bench_hot_kernels.py")
    proc = subprocess.run([sys.executable, script, "--shape", "2x3x8x8", "--rounds", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("shape")]
    timed = [float(ln.split()[-1]) for ln in rows if "not available" not in ln]
    assert len(timed) >= 5 and all(t > 0 for t in timed)  # one ISA copy at least, and both copies
    assert sum("copy_ of" in ln for ln in rows) == 2


def _small_shape_rows(tmp_path, script_name):
    """The table rows (split) of a round-robin benchmark run on two tiny shapes, 3 rounds."""
    script = os.path.join(os.path.dirname(BENCH), script_name)
    proc = subprocess.run([sys.executable, script, "--shapes", "2x3x8x8,1x2x4x4", "--rounds", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [ln.split() for ln in proc.stdout.splitlines() if ln.startswith(("2x3x8x8", "1x2x4x4"))]


def test_bench_update_node_runs_and_prints_every_shape(tmp_path):
    rows = _small_shape_rows(tmp_path, "bench_update_node.py")
    # the update alone (5 columns), then table + update (4 columns), one row per shape each
    assert [len(r) for r in rows] == [5, 5, 4, 4] and all(float(v) > 0 for r in rows for v in r[1:])


def test_bench_wrapper_conversion_runs_and_prints_every_shape(tmp_path):
    rows = _small_shape_rows(tmp_path, "bench_wrapper_conversion.py")
    assert [r[1] for r in rows] == ["fwd", "fwd+bwd"] * 2 and all(float(v) > 0 for r in rows for v in r[2:])


def test_coefficient_precision_prints_the_bounds_the_tests_hold(tmp_path):
    """benchmarks/coefficient_precision.py (README's precision figures) runs, one row per schedule and grid, and
    its errors are the ones tests/test_coefficient_precision.py bounds (rows 2e-15; Jacobians 1e-13 at gap 1e-1)."""
    script = os.path.join(os.path.dirname(BENCH), "coefficient_precision.py")
    proc = subprocess.run([sys.executable, script, "--gaps", "1e-1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [ln.split() for ln in proc.stdout.splitlines()[1:] if ln.strip()]
    assert [(r[0], " ".join(r[1:3])) for r in rows] == [
        (s, g) for s in ("edm", "flow_matching") for g in ("gap 0.1", "sampling N=4", "sampling N=8")] + [
        ("edm", "large steps")]
    for r in rows:
        assert 0 <= float(r[3]) <= 2e-15 and 0 < float(r[4]) <= 1e-13, r


def test_coefficient_precision_measures_an_older_commits_reference(tmp_path):
    """--reference-at REV loads that commit's ld3_ext/coefficients.py (README's "before" figures): at 368a9fa the
    recursions' errors on the gap-0.1 grid are the ones README quotes (rows ~2e-14, Jacobians ~5e-13)."""
    script = os.path.join(os.path.dirname(BENCH), "coefficient_precision.py")
    proc = subprocess.run([sys.executable, script, "--gaps", "1e-1", "--reference-at", "368a9fa"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [ln.split() for ln in proc.stdout.splitlines()[1:] if ln.strip()]
    gap = [r for r in rows if r[1:3] == ["gap", "0.1"]]
    assert len(gap) == 2 and all(r[5].endswith("@368a9fa") for r in rows)
    for r in gap:
        assert 1e-14 < float(r[3]) < 5e-14 and 1e-13 < float(r[4]) < 1e-12, r


def test_bench_finite_check_runs_and_prints_every_shape(tmp_path):
    rows = _small_shape_rows(tmp_path, "bench_finite_check.py")
    # 4 dtypes per shape (6 columns), then one sampler row per shape (4 columns)
    assert [len(r) for r in rows] == [6] * 8 + [4, 4] and all(float(v) > 0 for r in rows for v in r[2:])


def test_bench_kernels_keeps_the_shapes_measured_before_it_is_stopped(tmp_path):
    """The GPU check stops the benchmark at its time limit: the JSON is rewritten after every shape, so the shapes
    done are kept (complete=false) instead of nothing; and a torch.compile failure loses only that variant."""
    out = tmp_path / "bench.json"
    # a stand-in torch.compile that raises, and a Timer that stops the run on the second shape's first case
    driver = tmp_path / "driver.py"
    driver.write_text(f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(BENCH)!r})
import bench_kernels as bk
def broken_compile(*a, **k):
    def f(*a, **k):
        raise RuntimeError("inductor exploded")
    return f
torch.compile = broken_compile
real_run, calls = bk.Timer.run, []
def run(self, variants):
    calls.append(1)
    if len(calls) == 6:  # shape 1: copy, update, fwd+bwd, model, sampler; shape 2: its copy ceilings
        raise KeyboardInterrupt
    return real_run(self, variants)
bk.Timer.run = run
try:
    bk.main(["--quick", "--no-malloc-guard", "--threads", "1", "--shapes", "2x3x8x8,1x5", "--json", {str(out)!r}])
except KeyboardInterrupt:
    print("stopped")
""")
    proc = subprocess.run([sys.executable, str(driver)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "stopped" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
    assert "compile 2x3x8x8 FAILED" in proc.stdout
    data = json.loads(out.read_text())
    assert data["complete"] is False
    assert {r["shape"] for r in data["records"]} == {"2x3x8x8"}
    assert {r["variant"] for r in data["records"] if r["case"] == "update_fwd"} == {"eager", "fused", "fused_out"}
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_kernels_times_the_compiled_reference(tmp_path):
    """Case 1's torch.compile variant (the target's second baseline) is recorded, not only skipped: one tiny
    shape, inductor's real compile."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--threads", "1", "--cases", "1", "--shapes", "2x3x8x8",
                           "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "FAILED" not in proc.stdout, proc.stdout[-4000:]
    recs = {(r["case"], r["variant"]): r for r in json.loads(out.read_text())["records"]}
    assert {("update_fwd", v) for v in ("eager", "fused", "fused_out", "compile")} <= recs.keys()
    assert recs[("update_fwd", "compile")]["median_s"] > 0 and recs[("update_fwd", "compile")]["ratio_vs_eager"] > 0


def test_bench_kernels_default_shapes_are_the_issues():
    """The four fp32 shapes the README tables report."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_kernels_for_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.SHAPES == [(64, 3, 32, 32), (16, 4, 64, 64), (8, 4, 128, 128), (1, 3, 256, 256)]


def test_bench_kernels_reads_cases_by_number_or_name_and_refuses_typos():
    import argparse
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_kernels_for_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod._parse_cases("sampler,copy") == {3, 4}
    assert mod._parse_cases("1, update_fwdbwd") == {1, 2}
    for bad in ("5", "sampler,bogus", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            mod._parse_cases(bad)
    assert mod._parse_shapes("64x3x32x32, 1x3x256x256") == [(64, 3, 32, 32), (1, 3, 256, 256)]
    for bad in ("64x3x", "foo", "0x3x32x32", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            mod._parse_shapes(bad)
    proc = subprocess.run([sys.executable, BENCH, "--cases", "sampler,bogus", "--no-malloc-guard"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown case 'bogus'" in proc.stderr


def test_float32_gradient_error_prints_both_paths(tmp_path):
    script = os.path.join(os.path.dirname(BENCH), "float32_gradient_error.py")
    proc = subprocess.run([sys.executable, script, "--solvers", "ipndm3", "--schedules", "vp_cosine"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("vp_cosine")]
    assert [r[2] for r in rows] == ["fused", "reference"]
    errs = [float(v) for r in rows for v in r[3:]]
    assert len(errs) == 8 and all(0 < e < 1e-3 for e in errs)  # float32-accurate, and measured (not zero)


def test_bench_vs_libraries_checks_agreement_and_writes_records(tmp_path):
    """benchmarks/bench_vs_libraries.py: every library's sample (and grid gradient) is checked against the float64
    reference before it is timed, and the records say so; no speed is asserted."""
    pytest.importorskip("diffusers")
    import importlib.util
    if importlib.util.find_spec("k_diffusion") is None:
        if os.environ.get("LD3_REQUIRE_ORACLES") == "1":
            raise AssertionError("k-diffusion is not installed but LD3_REQUIRE_ORACLES=1")
        pytest.skip("k-diffusion is not installed")
    script = os.path.join(os.path.dirname(BENCH), "bench_vs_libraries.py")
    out = tmp_path / "vs.json"
    proc = subprocess.run([sys.executable, script, "--quick", "--threads", "1", "--shapes", "2x3x8x8",
                           "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(out.read_text())
    assert data["complete"] is True and data["threads"] == 1 and data["steps"] == 10
    assert all(data["machine"]["malloc_env"][k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    got = {(r["mode"], r["solver"], r["library"]) for r in data["records"]}
    libs = {"ld3_ext", "ld3_ext_reference"}
    want = {("sample", s, lib) for s in ("dpmpp_2m", "dpmpp_3m", "unipc_3") for lib in libs | {"diffusers"}}
    want |= {("sample", s, "k_diffusion") for s in ("dpmpp_2m", "dpmpp_3m")}
    want |= {("grad", s, lib) for s in ("dpmpp_2m", "dpmpp_3m") for lib in libs | {"k_diffusion"}}
    want |= {("grad", "unipc_3", lib) for lib in libs}
    assert got == want
    for r in data["records"]:
        assert r["median_s"] > 0 and r["ratio_vs_ld3"] > 0
        # the same computation on every side: float32 against the float64 solve
        assert 0 <= r["max_rel_err_vs_float64"] <= (1e-5 if r["mode"] == "sample" else 1e-3), r
        if r["library"] == "ld3_ext":
            assert r["ratio_vs_ld3"] == 1.0
    assert "k_diffusion" in proc.stdout and "diffusers" in proc.stdout  # the printed table
    # the README table from it
    summary = subprocess.run([sys.executable, os.path.join(os.path.dirname(BENCH), "summarize_vs_libraries.py"),
                              str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr[-4000:]
    rows = [ln for ln in summary.stdout.splitlines() if ln.startswith("| sample | dpmpp_2m | 2x3x8x8 |")]
    assert len(rows) == 1 and rows[0].count("x |") == 3, summary.stdout  # k-diffusion, diffusers, reference
    assert any(ln.startswith("| grad | dpmpp_3m | 2x3x8x8 |") and "| - |" in ln  # diffusers has no grad row
               for ln in summary.stdout.splitlines()), summary.stdout


def test_bench_vs_libraries_refuses_an_unknown_solver(tmp_path):
    script = os.path.join(os.path.dirname(BENCH), "bench_vs_libraries.py")
    proc = subprocess.run([sys.executable, script, "--solvers", "dpmpp_9m", "--shapes", "1x4", "--no-malloc-guard"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "dpmpp_9m" in proc.stderr


@pytest.fixture
def vs_bench():
    """benchmarks/bench_vs_libraries.py as a module (its main() runs in this process); the thread count its main()
    sets is given back to the other tests afterwards."""
    pytest.importorskip("diffusers")
    import importlib.util
    import torch
    if importlib.util.find_spec("k_diffusion") is None:
        pytest.skip("k-diffusion is not installed")
    spec = importlib.util.spec_from_file_location("bench_vs_libraries",
                                                  os.path.join(os.path.dirname(BENCH), "bench_vs_libraries.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    yield mod
    torch.set_num_threads(threads)


@pytest.mark.parametrize("solver, ours", [
    # a gross mismatch, and a subtle one: the 3M with the midpoint instead of the heun warm-up step
    ("dpmpp_2m", lambda b: __import__("ld3_ext").Euler(backend=b)),
    ("dpmpp_3m", lambda b: __import__("ld3_ext").DPMSolverPP(3, solver_type="midpoint", lower_order_final=False,
                                                              backend=b)),
])
def test_bench_vs_libraries_stops_when_the_libraries_compute_something_else(monkeypatch, vs_bench, solver, ours):
    """The agreement check can fail: pair k-diffusion's and diffusers' solver with another of ours and the run
    must stop before timing anything."""
    monkeypatch.setattr(vs_bench, "ld3_solver", lambda name, backend: ours(backend))
    with pytest.raises(SystemExit, match="disagree"):
        vs_bench.main(["--quick", "--shapes", "1x4", "--solvers", solver, "--modes", "sample", "--no-malloc-guard"])


def test_bench_vs_libraries_grad_check_sees_every_grid_point(monkeypatch, vs_bench):
    """dL/dsigma spans five orders of magnitude along the grid; the check compares sigma * dL/dsigma, so a sampler
    that drops the gradient of the first grid points (here k-diffusion's, with sigma_0..sigma_6 detached) is
    refused, although its largest entries are right."""
    import types
    import torch
    real = vs_bench.load_kdiffusion_sampling()

    def broken(model, x, sigmas, **kw):
        return real.sample_dpmpp_2m.__wrapped__(model, x, torch.cat([sigmas[:7].detach(), sigmas[7:]]), **kw)

    def shipped(*a, **kw):
        return real.sample_dpmpp_2m(*a, **kw)
    shipped.__wrapped__ = broken
    monkeypatch.setattr(vs_bench, "load_kdiffusion_sampling", lambda: types.SimpleNamespace(
        sample_dpmpp_2m=shipped, sample_dpmpp_3m_sde=real.sample_dpmpp_3m_sde))
    args = ["--quick", "--shapes", "2x3x8x8", "--solvers", "dpmpp_2m", "--modes", "grad", "--no-malloc-guard"]
    with pytest.raises(SystemExit, match="grid gradients disagree"):
        vs_bench.main(args)
    # the intact sampler passes the same check
    monkeypatch.setattr(vs_bench, "load_kdiffusion_sampling", lambda: real)
    assert {r["library"] for r in vs_bench.main(args)} == {"ld3_ext", "ld3_ext_reference", "k_diffusion"}


def test_bench_rng_replay_runs_and_prints_both_variants(tmp_path):
    script = os.path.join(os.path.dirname(BENCH), "bench_rng_replay.py")
    proc = subprocess.run([sys.executable, script, "--shape", "2x3x4x4", "--rounds", "2", "--inner", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if "with snapshots" in ln][0].split()
    assert float(line[2]) > 0 and float(line[4]) > 0 and float(line[6]) > 0


def test_bench_ld3_refresh_twice_keeps_the_value_before_the_first(tmp_path):
    """--refresh run twice (the second e.g. after a run cut short) replaced median_rmse_before_refresh with the
    first refresh's result, and listed the column twice under "refreshed" (review)."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rec = {"model": "gmm:digits64", "solver": "dpmpp", "nfe": 4, "n_eval": 4, "best_baseline": "dmn",
           "reduction_vs_best": 0.7, "median_rmse": {"time_uniform": 0.5, "time_quadratic": 0.4, "logsnr": 0.12,
                                                     "edm": 0.999, "dmn": 0.07, "gits": 0.1, "ld3": 0.02},
           "init_choice": "edm"}
    path = tmp_path / "res.json"
    path.write_text(json.dumps({"records": [rec]}))
    cmd = [sys.executable, os.path.join(root, "benchmarks", "bench_ld3.py"), "--json", str(path), "--refresh", "edm",
           "--models", "gmm:digits64", "--solvers", "dpmpp", "--nfes", "4"]
    for _ in range(2):
        out = subprocess.run(cmd, check=True, capture_output=True, cwd=root, text=True).stdout
    got = json.loads(path.read_text())["records"][0]
    assert got["median_rmse_before_refresh"] == {"edm": 0.999} and got["refreshed"] == ["edm"]
    assert got["median_rmse"]["edm"] != 0.999
    # LD3 started from the refreshed baseline's grid here: its number is of the old grid, and that is said
    assert got["ld3_started_from_refreshed"] is True and "rerun it without --refresh" in out


def test_readme_ld3_table_is_the_committed_results_file():
    """The README's "LD3 vs baselines" table is benchmarks/ld3_table.py's rendering of the committed
    benchmarks/results/ld3_cpu.json, row for row: a results file refreshed without the README (or the other way
    round) fails here."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import ld3_table
    finally:
        sys.path.pop(0)
    with open(os.path.join(root, "benchmarks", "results", "ld3_cpu.json")) as f:
        records = json.load(f)["records"]
    rendered = ld3_table.table(records).splitlines()
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read().splitlines()
    start = readme.index(rendered[0])
    assert readme[start:start + len(rendered)] == rendered
    assert len(records) == 45 and {r["nfe"] for r in records} == {4, 5, 6, 8, 10}


def test_bench_ld3_cut_short_keeps_the_earlier_records_it_has_not_redone(tmp_path):
    """The results file is rewritten after every record: a run stopped after its first record replaced an earlier
    complete file (README's benchmarks/results/ld3_cpu.json) with that one record (review)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "res.json"
    old = [{"model": "digits", "solver": "dpmpp", "nfe": n, "median_rmse": {"ld3": 0.1}, "reduction_vs_best": 0.5}
           for n in (4, 5, 6)] + [{"model": "gmm:ring2d", "solver": "dpmpp", "nfe": 4, "median_rmse": {"ld3": 9.0},
                                   "reduction_vs_best": 0.5}]
    path.write_text(json.dumps({"records": old}))
    driver = tmp_path / "driver.py"
    driver.write_text(f"""
import sys
sys.path.insert(0, {os.path.join(root, "benchmarks")!r})
sys.argv = ["bench_ld3.py", "--threads", "1", "--json", {str(path)!r}, "--models", "gmm:ring2d", "--solvers", "dpmpp",
            "--nfes", "4", "5", "--n-eval", "8"]
import bench_ld3
real, calls = bench_ld3.LD3Trainer.fit, []
def fit(self, *a, **k):
    calls.append(1)
    if len(calls) == 2:
        raise KeyboardInterrupt
    return real(self, *a, **k)
bench_ld3.LD3Trainer.fit = fit
try:
    bench_ld3.main()
except KeyboardInterrupt:
    print("stopped")
""")
    proc = subprocess.run([sys.executable, str(driver)], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "stopped" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(path.read_text())
    assert data["complete"] is False
    got = {(r["model"], r["nfe"]): r for r in data["records"]}
    assert set(got) == {("digits", 4), ("digits", 5), ("digits", 6), ("gmm:ring2d", 4)}
    assert got[("gmm:ring2d", 4)]["median_rmse"]["ld3"] != 9.0  # the one it measured again is the new one


def test_bench_ld3_final_write_keeps_the_configurations_it_did_not_measure():
    """`--nfes 8 10` against the full table: the finished run's file held only those rows (the README's table
    was then merged by hand); now the re-measured rows replace theirs in place and the others stay."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import bench_ld3
    finally:
        sys.path.pop(0)
    rec = lambda nfe, v: {"model": "m", "solver": "s", "nfe": nfe, "v": v}  # noqa: E731
    earlier = [rec(4, "old"), rec(8, "old"), rec(10, "old")]
    got = bench_ld3._merged(earlier, [rec(10, "new"), rec(12, "new"), rec(8, "new")])
    assert [(r["nfe"], r["v"]) for r in got] == [(4, "old"), (8, "new"), (10, "new"), (12, "new")]


def _bench_module(name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_bench_ld3_finished_run_merges_into_the_results_file(tmp_path):
    """A run that ends writes the merged table (the configurations it did not measure stay, the one it measured
    again is replaced) as a complete file (no "complete": false), each record with its init="auto" pick."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "res.json"
    old = [{"model": "digits", "solver": "dpmpp", "nfe": 4, "median_rmse": {"ld3": 0.1}, "reduction_vs_best": 0.5},
           {"model": "gmm:ring2d", "solver": "dpmpp", "nfe": 4, "median_rmse": {"ld3": 9.0}, "reduction_vs_best": 0.5}]
    path.write_text(json.dumps({"records": old}))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_ld3.py"), "--threads", "1",
                           "--json", str(path), "--models", "gmm:ring2d", "--solvers", "dpmpp", "--nfes", "4",
                           "--n-eval", "8"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(path.read_text())
    assert "complete" not in data
    assert [(r["model"], r["nfe"]) for r in data["records"]] == [("digits", 4), ("gmm:ring2d", 4)]
    assert data["records"][0] == old[0]
    new = data["records"][1]
    assert new["median_rmse"]["ld3"] != 9.0 and "init_choice" in new


def test_bench_ld3_records_file_helpers(tmp_path):
    """_read_records: a missing, unreadable or odd file is no earlier records (a first run's --json path does not
    exist yet); _write_records marks only a run in progress as incomplete."""
    bench_ld3 = _bench_module("bench_ld3")
    assert bench_ld3._read_records(str(tmp_path / "missing.json")) == []
    for text in ("{not json", "[1, 2]"):
        (tmp_path / "bad.json").write_text(text)
        assert bench_ld3._read_records(str(tmp_path / "bad.json")) == []
    recs = [{"model": "m", "solver": "s", "nfe": 4}]
    path = str(tmp_path / "sub" / "out.json")
    bench_ld3._write_records(path, recs)
    assert json.loads(open(path).read()) == {"records": recs}
    bench_ld3._write_records(path, recs, complete=False)
    assert json.loads(open(path).read()) == {"records": recs, "complete": False}
    assert bench_ld3._read_records(path) == recs


def test_ld3_table_summary():
    """summary(): how many rows reach the 25 % target (25 % itself counts), the smallest reduction and its row,
    and the best baseline per row, most frequent first."""
    ld3_table = _bench_module("ld3_table")

    def rec(nfe, ld3, **base):
        return {"model": "m", "solver": "s", "nfe": nfe, "median_rmse": {**base, "ld3": ld3}}
    records = [rec(4, 0.75, edm=1.0, dmn=2.0), rec(5, 0.5, edm=2.0, dmn=1.0), rec(6, 0.9, edm=3.0, dmn=1.0)]
    got = ld3_table.summary(records)
    assert got.startswith("2 of 3 configurations reach the >= 25 % target (smallest reduction 10.0 %: s on m at "
                          "NFE 6)"), got
    assert got.endswith("best baseline per row: dmn 2, edm 1"), got
