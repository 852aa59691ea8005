"""The ``ld3`` command line: sample end to end, and clear errors for bad --model strings."""
import json
import os
import sys
import types

import pytest

from ld3_ext import cli
from ld3_ext.models import ModelSpecError, load_model


def test_sample_ring_writes_png_and_ranks_schedules(tmp_path, capsys):
    out = tmp_path / "s"
    rc = cli.main(["sample", "--model", "gmm:ring2d", "--nfe", "6", "--n", "64", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert (out / "samples.png").stat().st_size > 1000
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("time_uniform", "time_quadratic", "logsnr", "edm"):
            rows[parts[0]] = float(parts[3])
    assert set(rows) == {"time_uniform", "time_quadratic", "logsnr", "edm"}
    # on the ring, lambda-aware grids beat the uniform-in-time grid by a wide margin
    assert rows["logsnr"] < 0.5 * rows["time_uniform"]
    assert rows["edm"] < 0.5 * rows["time_uniform"]


@pytest.mark.parametrize("spec, match", [
    ("gmm:nope", "unknown mixture"),
    ("gmm:ring2d@vp_weird", "unknown schedule"),
    ("not_a_module_xyz:factory", "cannot import module"),
    ("os:path_does_not_exist", "no callable"),
    ("justaname", "expected a built-in name"),
    ("", "non-empty"),
])
def test_bad_model_spec(spec, match):
    with pytest.raises(ModelSpecError, match=match):
        load_model(spec)


def test_factory_must_return_model_and_schedule(monkeypatch):
    mod = types.ModuleType("ld3_fake_factory_mod")
    mod.bad = lambda: (lambda x, t: x, None)
    mod.good = lambda: load_model("gmm:ring2d")
    monkeypatch.setitem(sys.modules, "ld3_fake_factory_mod", mod)
    with pytest.raises(ModelSpecError, match="must return"):
        load_model("ld3_fake_factory_mod:bad")
    model, schedule = load_model("ld3_fake_factory_mod:good")
    assert model.schedule is schedule


def test_cli_reports_bad_model_cleanly(tmp_path):
    with pytest.raises(SystemExit, match="unknown mixture"):
        cli.main(["sample", "--model", "gmm:nope", "--out", str(tmp_path)])


def test_corrupt_schedule_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "schedule.json"
    bad.write_text('{"format": "ld3_ext.schedule", "version": 1, "timesteps": [1, 2')  # truncated
    rc = cli.main(["eval", "--schedule", str(bad), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and str(bad) in err and "Traceback" not in err


def test_train_then_eval_digits_reports_the_teachers_fd(tmp_path, capsys):
    """ld3 eval on the digits model: every schedule's row, and the teacher's digits-FD as the reference
    point (few-sample FD is biased, so a schedule is read against the teacher, not against zero)."""
    out = str(tmp_path / "d")
    rc = cli.main(["train", "--model", "digits", "--solver", "dpmpp", "--order", "2", "--nfe", "4", "--n-train", "8",
                   "--n-valid", "8", "--rounds-v1", "1", "--rounds-v2", "1", "--time-mode", "lambda", "--init", "logsnr",
                   "--out", out])
    assert rc == 0
    capsys.readouterr()
    rc = cli.main(["eval", "--out", out, "--n", "64", "--nfe-curve", "--skip-model-baselines"])
    assert rc == 0
    cap = capsys.readouterr()
    text = cap.out
    assert "was learned for the model" not in cap.err  # the same weights: no warning
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in ("teacher", "ld3", "logsnr", "edm", "time_uniform", "time_quadratic"):
            rows[parts[0]] = parts
    assert set(rows) == {"teacher", "ld3", "logsnr", "edm", "time_uniform", "time_quadratic"}
    assert rows["teacher"][1] == "20" and float(rows["teacher"][3]) == 0.0
    fds = {k: float(v[4]) for k, v in rows.items()}
    assert all(0.0 < v < 1e4 for v in fds.values())
    assert fds["time_uniform"] > 3 * fds["teacher"]  # 4 uniform steps are far off; the teacher is not
    assert "ld3 vs best baseline (teacher)" not in text
    with open(os.path.join(out, "eval.json")) as f:
        saved = json.load(f)
    assert [r["schedule"] for r in saved["rows"]][0] == "teacher"
    # written through a uniquely named temp file that is gone afterwards (no fixed-name eval.json.tmp)
    assert not [p for p in os.listdir(out) if p.startswith(".") or p.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# a schedule file against the model it is used with; bad --device/--out; errors as one line
# ----------------------------------------------------------------------------------------------
def _schedule_file(tmp_path, solver, nfe, schedule=None, spec="gmm:ring2d"):
    from ld3_ext import EDM, discretizations
    from ld3_ext.schedule_file import LearnedSchedule
    s = schedule or EDM()
    path = str(tmp_path / f"{solver.name}{nfe}.json")
    LearnedSchedule(discretizations.logsnr_uniform(s, solver.steps_for_nfe(nfe)), solver_config=solver.config(),
                    nfe=nfe, schedule_config=s.config(), model={"spec": spec, "name": spec}).save(path)
    return path


def _rows(text):
    return {p[0]: p for p in (line.split() for line in text.splitlines())
            if len(p) == 4 and p[0] in ("ld3", "logsnr", "edm", "time_uniform", "time_quadratic")}


def test_sample_compares_at_the_schedules_own_solver_and_nfe(tmp_path, capsys):
    """A learned grid belongs to its solver and NFE: `ld3 sample --schedule` runs every row at those (saying
    so when the command line asked for others), not at --solver/--nfe."""
    from ld3_ext.solvers import DPMSolverPP
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4)
    rc = cli.main(["sample", "--model", "gmm:ring2d", "--schedule", path, "--solver", "unipc", "--nfe", "10",
                   "--n", "16", "--out", str(tmp_path / "o")])
    cap = capsys.readouterr()
    assert rc == 0
    assert "comparing at the schedule's own solver" in cap.err and "NFE 4" in cap.err
    rows = _rows(cap.out)
    assert set(rows) == {"ld3", "logsnr", "edm", "time_uniform", "time_quadratic"}
    assert all(r[1] == "4" for r in rows.values())
    assert rows["ld3"][2] == rows["logsnr"][2]  # the file holds the logSNR grid: same solver, same result
    assert "solver=DPMSolverPP" in cap.out


def test_schedule_learned_on_another_noise_schedule_is_refused(tmp_path, capsys):
    from ld3_ext import EDM
    from ld3_ext.solvers import DPMSolverPP
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4, schedule=EDM(0.002, 120.0))
    for argv in (["sample", "--model", "gmm:ring2d", "--nfe", "4"], ["eval", "--model", "gmm:ring2d"]):
        rc = cli.main(argv + ["--schedule", path, "--n", "8", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and "was learned on the noise schedule" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o" / "eval.json")


def test_schedule_learned_for_another_model_warns(tmp_path, capsys):
    from ld3_ext.solvers import DPMSolverPP
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4, spec="gmm:digits64")
    rc = cli.main(["sample", "--model", "gmm:ring2d", "--nfe", "4", "--schedule", path, "--n", "8",
                   "--out", str(tmp_path / "o")])
    assert rc == 0
    assert "was learned for the model 'gmm:digits64'" in capsys.readouterr().err


def test_eval_nfe_curve_records_the_nfe_heun_actually_runs(tmp_path, monkeypatch):
    """Heun spends two evaluations a step: an odd k in the NFE curve runs k - 1 evaluations, plotted as such."""
    from ld3_ext import plotting
    from ld3_ext.solvers import Heun
    seen = {}

    def fake_plot(grids, schedule, path, errors=None):
        seen.update(errors)
        return path
    monkeypatch.setattr(plotting, "schedule_plot", fake_plot)
    path = _schedule_file(tmp_path, Heun(), 4)
    rc = cli.main(["eval", "--model", "gmm:ring2d", "--schedule", path, "--n", "8", "--nfe-curve", "3", "5",
                   "--skip-model-baselines", "--out", str(tmp_path / "o")])
    assert rc == 0
    assert [k for k, _ in seen["logsnr"]] == [4, 2, 4]  # the file's NFE 4, then k = 3 -> 2, k = 5 -> 4


@pytest.mark.parametrize("argv, match", [
    (["--device", "foo"], r"--device 'foo': Expected one of"),
    (["--device", "cuda:0"], r"--device 'cuda:0': CUDA is not available"),
])
def test_bad_device_is_one_line_before_any_work(tmp_path, argv, match):
    import torch
    if "cuda" in argv[1] and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")  # the check is for machines without one
    with pytest.raises(SystemExit, match=match):
        cli.main(["train", "--model", "gmm:ring2d", "--out", str(tmp_path / "o")] + argv)
    assert not os.path.exists(tmp_path / "o")


def test_out_that_is_a_file_is_refused_first(tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    with pytest.raises(SystemExit, match=r"--out .*afile' exists and is not a directory"):
        cli.main(["sample", "--model", "gmm:ring2d", "--out", str(f)])
    assert f.read_text() == "mine"


def test_os_errors_are_one_line(tmp_path, capsys):
    rc = cli.main(["eval", "--model", "gmm:ring2d", "--schedule", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "IsADirectoryError" in err and "Traceback" not in err


def test_ctrl_c_is_one_line_with_the_resume_hint(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_train", interrupted)
    rc = cli.main(["train", "--model", "gmm:ring2d", "--out", str(tmp_path / "o")])
    assert rc == 130
    assert capsys.readouterr().err.strip() == "interrupted (rerun the same command to resume from the last checkpoint)"


def test_fresh_and_regenerate_teacher_flags(tmp_path, capsys):
    """The errors that name Python options (resume='never', regenerate=True) say the flag; the flags work;
    a test-bed model is identified by its --model name without a warning meant for Python callers."""
    import warnings
    out = str(tmp_path / "r")
    base = ["train", "--model", "gmm:ring2d", "--solver", "dpmpp", "--order", "2", "--n-train", "4", "--n-valid", "4",
            "--rounds-v1", "1", "--rounds-v2", "0", "--time-mode", "lambda", "--init", "logsnr", "--out", out]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "the model has no weights to hash" warning
        assert cli.main(base + ["--nfe", "4"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--nfe", "5"]) == 2
    assert "`ld3 train --fresh` starts over" in capsys.readouterr().err
    assert cli.main(base + ["--nfe", "5", "--fresh"]) == 0
    assert cli.main(base + ["--nfe", "5", "--teacher-nfe", "10"]) == 2
    assert "--regenerate-teacher replaces the cached teacher set" in capsys.readouterr().err
    assert cli.main(base + ["--nfe", "5", "--teacher-nfe", "10", "--regenerate-teacher"]) == 0  # implies --fresh
    from ld3_ext.schedule_file import load_schedule
    learned = load_schedule(os.path.join(out, "schedule.json"))
    assert learned.nfe == 5 and learned.model["name"] == "gmm:ring2d"


def test_factory_that_raises_is_one_clear_error(monkeypatch):
    mod = types.ModuleType("ld3_fake_raising_mod")

    def broken():
        raise RuntimeError("weights file missing")
    mod.make = broken
    monkeypatch.setitem(sys.modules, "ld3_fake_raising_mod", mod)
    with pytest.raises(ModelSpecError, match="the factory raised RuntimeError: weights file missing"):
        load_model("ld3_fake_raising_mod:make")


def test_weightless_factories_with_one_function_name_are_different_models(tmp_path, monkeypatch, capsys):
    """Two factories wrapping functions that share a name (both `denoise`) must not share a teacher cache:
    a weightless model is identified by its --model string."""
    for name, sign in (("ld3_fac_a", 1.0), ("ld3_fac_b", -1.0)):
        mod = types.ModuleType(name)

        def make(sign=sign):
            import ld3_ext

            def denoise(x, t):
                return 0.5 * sign * x
            m = ld3_ext.wrap_model(denoise, ld3_ext.EDM(), prediction="x0")
            m.sample_shape = (2,)
            return m, m.schedule
        mod.make = make
        monkeypatch.setitem(sys.modules, name, mod)
    out = str(tmp_path / "o")
    args = ["teacher", "--n-train", "2", "--n-valid", "2", "--teacher-nfe", "3", "--out", out, "--no-progress"]
    assert cli.main(args + ["--model", "ld3_fac_a:make"]) == 0
    assert cli.main(args + ["--model", "ld3_fac_b:make"]) == 2
    assert "different settings" in capsys.readouterr().err


@pytest.mark.parametrize("config, match", [
    ({"_class_name": "AutoencoderKL"}, "is not a diffusers denoising network class"),
    ({"_class_name": "DDPMPipeline"}, "is not a diffusers denoising network class"),
    ([], "must hold a JSON object"),
])
def test_diffusers_folder_of_another_class_is_refused(tmp_path, config, match):
    pytest.importorskip("diffusers")
    from ld3_ext.integrations.diffusers import DiffusersConfigError, load_diffusers_model
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    with pytest.raises(DiffusersConfigError, match=match):
        load_diffusers_model(str(tmp_path))


def test_shipped_weights_metadata_is_a_copy():
    from ld3_ext.models import digits, digits_classifier
    for meta_fn in (digits.weights_metadata, digits_classifier.classifier_metadata):
        meta = meta_fn()
        first = json.dumps(meta, sort_keys=True, default=str)
        for v in meta.values():
            if isinstance(v, dict):
                v["edited"] = 1
        meta["edited"] = 1
        assert json.dumps(meta_fn(), sort_keys=True, default=str) == first
    digits.load_digits_net()  # still loads
