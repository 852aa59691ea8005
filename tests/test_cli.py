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
    from ld3_ext.models import digits, digits_classifier
    assert saved["weights_sha256"] == {"denoiser": digits.WEIGHTS_SHA256, "classifier": digits_classifier.WEIGHTS_SHA256}
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


def _run(argv, capsys):
    """(exit status, stderr) of `ld3 ARGV`: a UsageError leaves main as SystemExit(2), as argparse's errors do."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        return e.code, str(e) + capsys.readouterr().err
    return rc, capsys.readouterr().err


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


def test_sample_with_a_schedule_does_not_check_flags_against_the_default_solver(tmp_path, capsys):
    """--variant with a UniPC schedule was refused as "only unipc has variants ..., not dpmpp" (the default
    --solver, which the user never named); like --order/--nfe it gets the note that the file's solver is used."""
    from ld3_ext.solvers import UniPC
    path = _schedule_file(tmp_path, UniPC(2, variant="bh2"), 4)
    rc = cli.main(["sample", "--model", "gmm:ring2d", "--schedule", path, "--variant", "bh1", "--n", "16",
                   "--out", str(tmp_path / "o")])
    cap = capsys.readouterr()
    assert rc == 0 and "comparing at the schedule's own solver" in cap.err and "variant='bh2'" in cap.err
    # without a schedule file the flag is still checked against the solver it would modify
    rc, err = _run(["sample", "--model", "gmm:ring2d", "--variant", "bh1", "--n", "16", "--out", str(tmp_path / "p")],
                   capsys)
    assert rc == 2 and "--variant: only unipc has variants (bh1, bh2), not dpmpp" in err


def test_sample_into_a_run_folder_says_how_to_compare_its_schedule(tmp_path, capsys):
    """`ld3 eval --out DIR` scores DIR/schedule.json by itself; `ld3 sample --out DIR` without --schedule does
    not sample it, and says how to (a user who trained into DIR would otherwise see only the baselines)."""
    from ld3_ext.solvers import DPMSolverPP
    run = tmp_path / "run"
    run.mkdir()
    os.replace(_schedule_file(tmp_path, DPMSolverPP(2), 4), run / "schedule.json")
    argv = ["sample", "--model", "gmm:ring2d", "--nfe", "4", "--n", "8", "--out", str(run)]
    assert cli.main(argv) == 0
    cap = capsys.readouterr()
    assert f"pass --schedule {run / 'schedule.json'} to compare it" in cap.err
    assert "ld3" not in _rows(cap.out)
    assert cli.main(argv + ["--schedule", str(run / "schedule.json")]) == 0
    cap = capsys.readouterr()
    assert "is not sampled" not in cap.err and "ld3" in _rows(cap.out)
    assert cli.main(["sample", "--model", "gmm:ring2d", "--nfe", "4", "--n", "8", "--out", str(tmp_path / "o")]) == 0
    assert "is not sampled" not in capsys.readouterr().err  # no file there: no note


def test_sample_below_the_warm_up_says_which_orders_run(tmp_path, capsys):
    """`ld3 train` refuses an NFE below the solver's warm-up; `ld3 sample` runs it (well defined) but says so."""
    base = ["sample", "--model", "gmm:ring2d", "--n", "8", "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--nfe", "2"]) == 0
    assert "2 step(s) never get past the warm-up of order-3 DPMSolverPP, so every row runs at orders 1..2" \
        in capsys.readouterr().err
    assert cli.main(base + ["--nfe", "3"]) == 0
    assert "warm-up" not in capsys.readouterr().err
    assert cli.main(base + ["--nfe", "2", "--solver", "heun"]) == 0  # no order: no note
    assert "warm-up" not in capsys.readouterr().err


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


def test_sample_without_model_uses_the_model_the_schedule_file_records(tmp_path, capsys):
    """As `ld3 eval`: `ld3 sample --schedule F` without --model samples F's model, not the built-in ring."""
    from ld3_ext.solvers import DPMSolverPP
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4, spec="gmm:digits64")
    rc = cli.main(["sample", "--schedule", path, "--n", "4", "--out", str(tmp_path / "o")])
    cap = capsys.readouterr()
    assert rc == 0 and "learned for the model" not in cap.err
    assert cap.out.count("gmm:digits64  solver=") == 1
    rc = cli.main(["sample", "--nfe", "4", "--n", "4", "--out", str(tmp_path / "p")])  # no file: the ring
    assert rc == 0 and "gmm:ring2d  solver=" in capsys.readouterr().out


def _digits_schedule_file(tmp_path, teacher):
    from ld3_ext import discretizations
    from ld3_ext.models import load_model
    from ld3_ext.schedule_file import LearnedSchedule
    from ld3_ext.solvers import DPMSolverPP
    _, s = load_model("digits")
    path = str(tmp_path / "digits.json")
    LearnedSchedule(discretizations.logsnr_uniform(s, 4), solver_config=DPMSolverPP(2).config(), nfe=4,
                    schedule_config=s.config(), model={"spec": "digits", "name": "digits"},
                    training={"teacher": teacher}).save(path)
    return path


def test_eval_and_sample_score_against_the_teacher_the_schedule_was_trained_on(tmp_path, monkeypatch, capsys):
    """Without --teacher-* flags the file's recorded teacher is the reference; any flag names the teacher instead."""
    from ld3_ext.solvers import DPMSolverPP, UniPC
    recorded = {"kind": "solver", "solver": DPMSolverPP(2).config(), "nfe": 8, "discretization": "logsnr"}
    path = _digits_schedule_file(tmp_path, recorded)
    used = []
    real = cli._teacher

    def spy(model, schedule, x_T, args, kw=None):
        used.append((cli._make_teacher_solver(args).config(), args.teacher_nfe))
        return real(model, schedule, x_T, args, kw)

    monkeypatch.setattr(cli, "_teacher", spy)
    base = ["--schedule", path, "--n", "4", "--no-progress"]
    assert cli.main(["eval", *base, "--out", str(tmp_path / "e"), "--skip-model-baselines", "--nfe-curve"]) == 0
    assert cli.main(["sample", *base, "--out", str(tmp_path / "s")]) == 0
    assert used == [(DPMSolverPP(2).config(), 8)] * 2
    out = capsys.readouterr().out
    assert out.count("DPMSolverPP(order=2") >= 2 and "8 NFE logSNR" in out
    saved = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert saved["teacher"] == {"solver": DPMSolverPP(2).config(), "nfe": 8, "discretization": "logsnr"}
    used.clear()  # one flag given: the flags (with their defaults) name the teacher
    assert cli.main(["eval", *base, "--out", str(tmp_path / "f"), "--skip-model-baselines", "--nfe-curve",
                     "--teacher-nfe", "6"]) == 0
    assert used == [(UniPC(3).config(), 6)]


def test_a_recorded_teacher_the_flags_cannot_spell_falls_back_to_the_defaults(tmp_path, monkeypatch):
    from ld3_ext.solvers import UniPC
    from ld3_ext.solvers import Heun
    used = []
    monkeypatch.setattr(cli, "_teacher", lambda m, s, x, args, kw=None: used.append(
        (cli._make_teacher_solver(args).config(), args.teacher_nfe)) or x)
    for bad in ({"solver": {"name": "nope"}, "nfe": 8}, {"solver": Heun().config(), "nfe": 7},
                {"solver": UniPC(3).config(), "nfe": 0}):
        path = _digits_schedule_file(tmp_path, {"kind": "solver", "discretization": "logsnr", **bad})
        assert cli.main(["sample", "--schedule", path, "--n", "2", "--no-progress", "--out", str(tmp_path / "s")]) == 0
    assert used == [(UniPC(3).config(), 20)] * 3


def test_eval_nfe_curve_records_the_nfe_heun_actually_runs(tmp_path, monkeypatch):
    """Heun spends two evaluations a step: an odd k in the NFE curve runs k - 1 evaluations, plotted as such."""
    from ld3_ext import plotting
    from ld3_ext.solvers import Heun
    seen = {}

    def fake_plot(grids, schedule, errors=None):
        seen.update(errors)
        return b""
    monkeypatch.setattr(plotting, "schedule_plot_png", fake_plot)
    path = _schedule_file(tmp_path, Heun(), 4)
    rc = cli.main(["eval", "--model", "gmm:ring2d", "--schedule", path, "--n", "8", "--nfe-curve", "3", "5",
                   "--skip-model-baselines", "--out", str(tmp_path / "o")])
    assert rc == 0
    # the file's NFE 4, then k = 3 -> 2; k = 5 runs 4, already there: each NFE once (no duplicate point)
    assert [k for k, _ in seen["logsnr"]] == [4, 2]


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
    (tmp_path / "o" / "teacher" / "meta.json").mkdir(parents=True)  # a folder where the cache's file goes
    rc = cli.main(["teacher", "--model", "gmm:ring2d", "--n-train", "2", "--n-valid", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "IsADirectoryError" in err and "meta.json" in err and "Traceback" not in err


def test_ctrl_c_is_one_line_with_the_resume_hint(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_train", interrupted)
    rc = cli.main(["train", "--model", "gmm:ring2d", "--out", str(tmp_path / "o")])
    assert rc == 130
    assert capsys.readouterr().err.strip() == ("ld3 train: interrupted (rerun the same command to resume from the last "
                                               "checkpoint)")


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
    # a test bed's teacher is its exact ODE solution, as in `ld3 eval`: the --teacher-* flags do not change it
    assert cli.main(base + ["--nfe", "5", "--teacher-nfe", "10"]) == 0
    meta = json.loads(open(os.path.join(out, "teacher", "meta.json")).read())
    assert meta["settings"]["teacher"]["kind"] == "exact", meta["settings"]
    capsys.readouterr()
    assert cli.main(base + ["--nfe", "5", "--seed", "1"]) == 2  # other teacher noises
    assert "--regenerate-teacher replaces the cached teacher set" in capsys.readouterr().err
    assert cli.main(base + ["--nfe", "5", "--seed", "1", "--regenerate-teacher"]) == 0  # implies --fresh
    from ld3_ext.schedule_file import load_schedule
    learned = load_schedule(os.path.join(out, "schedule.json"))
    assert learned.nfe == 5 and learned.model["name"] == "gmm:ring2d"
    # every schedule file the run writes says how to rebuild the model: eval works from the checkpoint's own copy
    own = os.path.join(out, "checkpoint", "schedule.json")
    assert load_schedule(own).model["spec"] == learned.model["spec"] == "gmm:ring2d"
    capsys.readouterr()
    assert cli.main(["eval", "--schedule", own, "--n", "8", "--teacher-nfe", "10", "--out", str(tmp_path / "ev")]) == 0
    assert "ld3 vs best baseline" in capsys.readouterr().out


def test_factory_module_in_the_working_folder_is_found_without_it_on_sys_path(tmp_path, monkeypatch):
    """The `ld3` console script's sys.path lacks the folder it runs in (unlike `python -m`): a factory module there
    must still import; a module name found nowhere stays an error."""
    (tmp_path / "ld3_cwd_factory_mod.py").write_text(
        "from ld3_ext.models import load_model\n"
        "def make():\n    return load_model('gmm:ring2d')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "ld3_cwd_factory_mod", raising=False)
    model, schedule = load_model("ld3_cwd_factory_mod:make")
    assert type(schedule).__name__ == "EDM" and sys.path[-1] == str(tmp_path)
    with pytest.raises(ModelSpecError, match="cannot import module 'ld3_nowhere_mod'"):
        load_model("ld3_nowhere_mod:make")


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


# ----------------------------------------------------------------------------------------------
# held-out noises, counts, flags a solver has no use for, eval.json, odd sample shapes
# ----------------------------------------------------------------------------------------------
def test_sample_and_eval_noises_never_are_the_teachers(tmp_path):
    """The teacher draws prior_std * randn(n) from the plain --seed: sample and eval must not (an LD3 row scored on
    the schedule's own training noises looks better than it is), and differ from each other."""
    import torch
    from ld3_ext.training.teacher import sample_noise
    model, schedule = load_model("gmm:ring2d")
    for seed in (0, 10_000):
        teacher = sample_noise(16, model.testbed.event_shape, seed, torch.float64)
        for purpose in ("sample", "eval"):
            x = cli._prior(model, schedule, 16, seed, "cpu", purpose) / schedule.prior_std()
            for row in x:  # no noise of theirs is any of the teacher's
                assert not any(torch.allclose(row, z.to(row)) for z in teacher)
        assert not torch.equal(cli._prior(model, schedule, 4, seed, "cpu", "sample"),
                               cli._prior(model, schedule, 4, seed, "cpu", "eval"))
    # a stream is reproducible
    assert torch.equal(cli._prior(model, schedule, 4, 3, "cpu", "eval"), cli._prior(model, schedule, 4, 3, "cpu", "eval"))


@pytest.mark.parametrize("argv, match", [
    (["sample", "--n", "-1"], "--n must be >= 1"),
    (["eval", "--n", "0"], "--n must be >= 1"),
    (["teacher", "--n-train", "-3"], "--n-train must be >= 1"),
    (["teacher", "--n-valid", "0"], "--n-valid must be >= 1"),
    (["sample", "--teacher-nfe", "0"], "--teacher-nfe must be >= 1"),
    (["eval", "--nfe-curve", "4", "0"], "--nfe-curve values must be in 1..1000"),
    (["sample", "--seed", str(2 ** 64)], r"--seed must be in \[0, 2\*\*63\)"),
    (["sample", "--seed", "-1"], r"--seed must be in"),
    (["sample", "--device", "meta"], "meta device holds no values"),
    (["sample", "--out", ""], "--out must name a directory"),
    (["sample", "--solver", "euler", "--order", "2"], "--order: euler has no order"),
    (["sample", "--solver", "dpmpp", "--variant", "bh2"], "--variant: only unipc"),
    (["sample", "--solver", "heun", "--nfe", "5"], "--nfe 5: heun spends 2 evaluations a step; use 4 or 6"),
    # a budget below one Heun step: it was refused as "nfe must be >= 2 for Heun", naming no flag
    (["sample", "--solver", "heun", "--nfe", "1"], "--nfe 1: heun spends 2 evaluations a step; use 2"),
    (["train", "--teacher-solver", "heun", "--teacher-nfe", "1"],
     "--teacher-nfe 1: heun spends 2 evaluations a step; use 2"),
    (["sample", "--solver", "dpmpp", "--order", "7"], "--solver dpmpp --order 7"),
])
def test_bad_counts_and_flags_name_the_flag(tmp_path, argv, match):
    model = [] if argv[0] in ("eval",) else ["--model", "gmm:ring2d"]
    with pytest.raises(SystemExit, match=match):
        cli.main(argv + model + ["--out", str(tmp_path / "o")] if "--out" not in argv else argv + model)


def test_teacher_order_is_checked_for_a_model_with_a_solver_teacher(tmp_path):
    with pytest.raises(SystemExit, match="--teacher-solver unipc --teacher-order 9"):
        cli._make_teacher_solver(cli.build_parser().parse_args(["sample", "--teacher-order", "9"]))


def test_eval_nfe_curve_below_one_step_is_refused_first(tmp_path, monkeypatch):
    from ld3_ext.solvers import Heun
    path = _schedule_file(tmp_path, Heun(), 4)
    monkeypatch.setattr(cli, "_teacher", lambda *a: pytest.fail("the teacher ran"))
    with pytest.raises(SystemExit, match=r"--nfe-curve \[1\]: heun spends 2 evaluations a step"):
        cli.main(["eval", "--model", "gmm:ring2d", "--schedule", path, "--nfe-curve", "1", "4",
                  "--out", str(tmp_path / "o")])


def test_options_are_never_abbreviated(tmp_path, capsys):
    """`ld3 eval --nfe 8` must not run as --nfe-curve 8."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "--nfe", "8"])
    assert "unrecognized arguments: --nfe" in capsys.readouterr().err


def test_cli_teacher_spends_the_nfe_it_names_for_heun():
    """--teacher-nfe 20 with Heun: 10 steps, 20 network calls (as the training teacher), not 20 steps."""
    import torch
    import ld3_ext
    calls = []
    schedule = ld3_ext.EDM()

    def net(x, t):
        calls.append(1)
        return 0.5 * x
    model = ld3_ext.wrap_model(net, schedule, prediction="x0")
    args = cli.build_parser().parse_args(["sample", "--teacher-solver", "heun", "--teacher-nfe", "20"])
    cli._teacher(model, schedule, torch.randn(2, 3), args)
    assert len(calls) == 20
    args = cli.build_parser().parse_args(["sample", "--teacher-solver", "heun", "--teacher-nfe", "21"])
    with pytest.raises(SystemExit, match="--teacher-nfe 21"):
        cli._teacher(model, schedule, torch.randn(2, 3), args)


@pytest.mark.parametrize("value, wanted", [("", False), ("0", False), ("false", False), ("off", False),
                                           ("1", True), ("yes", True)])
def test_ld3_traceback_reads_as_a_switch(monkeypatch, value, wanted):
    monkeypatch.setenv("LD3_TRACEBACK", value)
    assert cli._traceback_wanted() is wanted


def test_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    def too_big(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1000000000000 bytes.")
    monkeypatch.setattr(cli, "cmd_sample", too_big)
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    rc = cli.main(["sample", "--model", "gmm:ring2d", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("ld3 sample: error: out of memory") and "Traceback" not in err


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    """Only the user's mistakes become one line: an internal error keeps its traceback for the report."""
    def buggy(args):
        raise KeyError("internal")
    monkeypatch.setattr(cli, "cmd_sample", buggy)
    with pytest.raises(KeyError):
        cli.main(["sample", "--model", "gmm:ring2d", "--out", str(tmp_path / "o")])


def test_median_is_the_middle_of_an_even_count():
    import torch
    assert cli._median(torch.tensor([1.0, 2.0, 3.0, 4.0])) == 2.5
    assert cli._median(torch.tensor([3.0, 1.0, 2.0])) == 2.0


def test_bare_mixture_name_is_recorded_as_gmm(tmp_path):
    args = cli.build_parser().parse_args(["sample", "--model", "ring2d@vp_linear", "--out", str(tmp_path)])
    cli._load(args)
    assert args.model == "gmm:ring2d@vp_linear"
    assert cli.torch.get_num_threads() == 1  # a built-in model: one thread by default


def test_eval_json_holds_numbers_and_what_they_were_measured_with(tmp_path, capsys):
    from ld3_ext.solvers import DPMSolverPP
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4)
    out = tmp_path / "o"
    rc = cli.main(["eval", "--schedule", path, "--n", "6", "--seed", "5", "--nfe-curve", "6",
                   "--skip-model-baselines", "--out", str(out)])
    assert rc == 0
    with open(out / "eval.json") as f:
        rec = json.load(f)
    assert rec["model"] == "gmm:ring2d" and rec["nfe"] == 4 and rec["n"] == 6 and rec["seed"] == 5
    assert rec["solver"]["name"] == "dpmpp" and rec["teacher"] == "exact"
    assert rec["dtype"] == "float64"  # the test bed's states (--dtype auto): a --dtype choice moves the numbers
    rows = {r["schedule"]: r for r in rec["rows"]}
    assert isinstance(rows["ld3"]["median RMSE"], float) and rows["ld3"]["median RMSE"] > 0
    assert rows["ld3"]["median RMSE"] == rows["logsnr"]["median RMSE"]  # the file holds the logSNR grid
    assert sorted(k for k, _ in rec["curves"]["logsnr"]) == [4, 6]
    assert rec["gain_vs_best"] == pytest.approx(1 - rows["ld3"]["median RMSE"] /
                                                min(r["median RMSE"] for k, r in rows.items() if k != "ld3"))


@pytest.mark.parametrize("shape", [(4, 3), (4, 7), (4, 2, 4, 4), (4, 5, 6), (4, 2, 3, 4, 5), (4, 3, 4, 4), (4, 2)])
def test_sample_grid_draws_any_sample_shape(tmp_path, shape):
    import torch
    from ld3_ext.plotting import sample_grid
    x = torch.randn(*shape)
    path = sample_grid({"a": x, "b": 3 * x}, str(tmp_path / "g.png"))
    assert os.path.getsize(path) > 500


def test_ctrl_c_after_fresh_says_to_drop_the_flag_once_this_run_saved_a_checkpoint(tmp_path, monkeypatch, capsys):
    """Rerunning `ld3 train --fresh` would start over again: once this run saved a checkpoint the message says to
    rerun without it.  Before that, the earlier run's checkpoint is still there (found, or refused, without
    --fresh): the message says to rerun the same command."""
    out = tmp_path / "o"
    (out / "checkpoint").mkdir(parents=True)
    old = out / "checkpoint" / "state.safetensors"
    old.write_bytes(b"an earlier run's")
    os.utime(old, (1e9, 1e9))

    def interrupted_before_saving(args):
        raise KeyboardInterrupt

    def interrupted_after_saving(args):
        old.write_bytes(b"this run's")
        raise KeyboardInterrupt
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    for fake, hint in ((interrupted_before_saving, "(rerun the same command: this run saved no checkpoint yet)"),
                       (interrupted_after_saving, "(rerun the command without --fresh to resume from this run's")):
        monkeypatch.setattr(cli, "_train", fake)
        rc = cli.main(["train", "--model", "gmm:ring2d", "--fresh", "--out", str(out)])
        assert rc == 130
        assert hint in capsys.readouterr().err


def test_ctrl_c_of_a_teacher_regeneration_says_to_rerun_the_same_command(tmp_path, monkeypatch, capsys):
    """Without --regenerate-teacher the staged set is refused (settings differ); with it, it resumes."""
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_teacher", interrupted)
    p = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(p, "teacher", interrupted))
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    rc = cli.main(["teacher", "--model", "gmm:ring2d", "--regenerate-teacher", "--out", str(tmp_path / "o")])
    assert rc == 130
    assert capsys.readouterr().err.strip() == "ld3 teacher: interrupted (rerun the same command to resume)"


def _with_func(parser, cmd, fn):
    for action in parser._subparsers._group_actions:
        action.choices[cmd].set_defaults(func=fn)
    return parser


def test_library_warnings_are_one_line_with_the_flag(tmp_path, monkeypatch, capsys):
    import warnings

    def warns(args):
        warnings.warn("resuming it in 'lambda'. Pass resume='never' to let 'auto' choose")
        return 0
    monkeypatch.setattr(cli, "cmd_sample", warns)
    before = warnings.showwarning
    assert cli.main(["sample", "--model", "gmm:ring2d", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "warning: resuming it in 'lambda'. Pass resume='never' to let 'auto' choose"
    assert "`ld3 train --fresh`" in err and "warnings.warn" not in err
    assert warnings.showwarning is before  # restored for the rest of the process


@pytest.mark.parametrize("blocker", ["checkpoint", "schedule.json"])
def test_train_output_locations_are_checked_before_any_work(tmp_path, monkeypatch, blocker, capsys):
    """A file where the checkpoint directory goes, or a directory where the schedule file goes: refused at once,
    not after the teacher and a training round."""
    from ld3_ext import training
    out = tmp_path / "o"
    out.mkdir()
    (out / blocker).mkdir() if blocker == "schedule.json" else (out / blocker).write_text("x")

    def no_trainer(*a, **k):
        raise AssertionError("the trainer was built")
    monkeypatch.setattr(training, "LD3Trainer", no_trainer)
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    try:
        rc = cli.main(["train", "--model", "gmm:ring2d", "--out", str(out)])
        err = capsys.readouterr().err
    except SystemExit as e:
        rc, err = 2, str(e)
    want = "schedule.json is a folder; schedule.json cannot be written there" if blocker == "schedule.json" else "checkpoint: cannot write there"
    assert rc == 2 and want in err


def test_train_and_teacher_use_a_test_beds_exact_solution_as_eval_does(tmp_path, capsys):
    """`ld3 eval` scores against the exact ODE solution of a gmm model: `ld3 teacher` and `ld3 train` fit to it too
    (not to the --teacher-* solver), and the schedule file says so."""
    out = str(tmp_path / "t")
    assert cli.main(["teacher", "--model", "gmm:ring2d", "--n-train", "4", "--n-valid", "4", "--no-progress",
                     "--out", out]) == 0
    meta = json.loads(open(os.path.join(out, "teacher", "meta.json")).read())
    assert meta["settings"]["teacher"] == {"kind": "exact", "reference": "GaussianMixture:ring2d"}
    assert cli.main(["train", "--model", "gmm:ring2d", "--solver", "dpmpp", "--order", "2", "--nfe", "4",
                     "--n-train", "4", "--n-valid", "4", "--rounds-v1", "1", "--rounds-v2", "0", "--time-mode", "lambda",
                     "--init", "logsnr", "--no-progress", "--out", out]) == 0  # reuses the teacher set above
    from ld3_ext.schedule_file import load_schedule
    assert load_schedule(os.path.join(out, "schedule.json")).training["teacher"]["kind"] == "exact"


def test_bare_mixture_names_are_canonical_in_the_registry():
    """The Python API spells a bare mixture name as the CLI does (gmm:NAME), and treats it as a built-in."""
    from ld3_ext.models import canonical_spec, is_builtin
    assert canonical_spec("ring2d") == "gmm:ring2d"
    assert canonical_spec("digits64@vp_linear") == "gmm:digits64@vp_linear"
    for spec in ("gmm:ring2d", "digits", "pkg.mod:ring2d", "ring2d_x", "diffusers:/abs/ring2d"):
        assert canonical_spec(spec) == spec
    # a relative diffusers folder is recorded absolute: `ld3 eval` from another folder still finds it
    assert canonical_spec("diffusers:ring2d") == "diffusers:" + os.path.join(os.getcwd(), "ring2d")
    assert canonical_spec("diffusers:~/m") == "diffusers:" + os.path.join(os.path.expanduser("~"), "m")
    assert is_builtin("ring2d@flow") and is_builtin("digits") and not is_builtin("pkg.mod:factory")
    model, schedule = load_model("ring2d@flow")
    from ld3_ext import FlowMatching
    assert isinstance(schedule, FlowMatching) and model.name == load_model("gmm:ring2d@flow")[0].name
    with pytest.raises(ModelSpecError, match=r"the built-in model 'gmm:ring2d' is unconditional"):
        load_model("ring2d", guidance_scale=2.0)
    with pytest.raises(ModelSpecError, match="unknown schedule"):
        load_model("ring2d@nope")


@pytest.mark.parametrize("cmd", ["train", "teacher"])
def test_an_odd_heun_teacher_nfe_is_refused_before_any_work(tmp_path, monkeypatch, cmd):
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=r"--teacher-nfe 21: heun spends 2 evaluations a step; use 20 or 22"):
        cli.main([cmd, "--model", "gmm:ring2d", "--teacher-solver", "heun", "--teacher-nfe", "21",
                  "--out", str(tmp_path / "o"), "--no-progress"])


def test_eval_output_directory_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """An --out that cannot be made (under a file) is refused at once, as `ld3 sample` and `ld3 train` do, not
    after the teacher and every schedule's samples have run."""
    from ld3_ext.solvers import DPMSolverPP
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran")
    monkeypatch.setattr(cli, "_teacher", no_teacher)
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    (tmp_path / "a_file").write_text("x")
    rc, err = _run(["eval", "--schedule", path, "--n", "4", "--skip-model-baselines",
                    "--out", str(tmp_path / "a_file" / "sub")], capsys)
    assert rc == 2 and "--out" in err and "cannot write there (Not a directory)" in err


def test_the_default_gmm_noise_schedule_has_one_spelling(tmp_path, capsys):
    """gmm:ring2d, gmm:ring2d@edm, ring2d@ are one model: one spelling in files and caches, and a schedule learned
    under one spelling is used under another without a 'learned for another model' warning."""
    from ld3_ext.models import canonical_spec
    from ld3_ext.solvers import DPMSolverPP
    for spec in ("gmm:ring2d@edm", "ring2d@edm", "gmm:ring2d@", "ring2d"):
        assert canonical_spec(spec) == "gmm:ring2d"
    assert canonical_spec("gmm:ring2d@flow") == "gmm:ring2d@flow"
    for recorded, given in (("gmm:ring2d@edm", "gmm:ring2d"), ("gmm:ring2d", "ring2d@edm")):
        path = _schedule_file(tmp_path, DPMSolverPP(2), 4, spec=recorded)
        rc = cli.main(["sample", "--model", given, "--nfe", "4", "--schedule", path, "--n", "4",
                       "--out", str(tmp_path / "o")])
        assert rc == 0 and "was learned for the model" not in capsys.readouterr().err
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4, spec="gmm:digits64@edm")  # another model still warns
    assert cli.main(["sample", "--model", "gmm:ring2d@edm", "--nfe", "4", "--schedule", path, "--n", "4",
                     "--out", str(tmp_path / "o")]) == 0
    assert "was learned for the model 'gmm:digits64@edm'" in capsys.readouterr().err


def test_eval_n_too_small_for_digits_fd_names_the_flag_before_any_work(tmp_path, monkeypatch):
    """digits-FD needs a covariance (two samples): `ld3 eval --n 1` on the digits model is refused naming --n, not
    by the metric's 'samples: need at least 2' after the teacher has run."""
    from ld3_ext.solvers import DPMSolverPP
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4, spec="digits")

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran")
    monkeypatch.setattr(cli, "_teacher", no_teacher)
    with pytest.raises(SystemExit, match="--n: digits-FD needs at least 2 samples"):
        cli.main(["eval", "--schedule", path, "--n", "1", "--skip-model-baselines", "--out", str(tmp_path / "o")])


def test_threads_flag_does_not_leak_into_the_calling_process(tmp_path):
    # cli.main called in-process (notebooks, scripts): --threads (and the one-thread default for built-in
    # models) applies to the command, the caller keeps its own thread count afterwards
    import torch
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    torch.set_num_threads(want)
    try:
        rc = cli.main(["sample", "--model", "gmm:ring2d", "--nfe", "4", "--n", "8", "--threads", "1",
                       "--out", str(tmp_path / "s")])
        assert rc == 0
        assert torch.get_num_threads() == want
        with pytest.raises(SystemExit):
            cli.main(["sample", "--model", "gmm:nope", "--threads", "1", "--out", str(tmp_path / "t")])
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cmd", ["sample", "teacher", "train", "eval"])
def test_a_teacher_order_for_an_orderless_teacher_is_refused(cmd, tmp_path, monkeypatch):
    """As --order for --solver euler/heun: a flag the solver has no use for is refused before any work, not ignored."""
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    argv = [cmd, "--model", "digits", "--teacher-solver", "heun", "--teacher-order", "2", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--teacher-order: heun has no order setting") as exc:
        cli.main(argv + (["--schedule", str(tmp_path / "missing.json")] if cmd == "eval" else []))
    assert exc.value.code == 2


def test_eval_with_a_baseline_equal_to_the_teacher_still_writes_its_results(tmp_path, monkeypatch, capsys):
    """A teacher no finer than a baseline (--teacher-solver/-nfe equal to the schedule's solver and NFE) makes that
    baseline's error 0: the gain has no ratio (it divided by zero, a traceback and no eval.json)."""
    from ld3_ext.discretizations import get_discretization
    from ld3_ext.solvers import DPMSolverPP
    solver = DPMSolverPP(2)
    path = _schedule_file(tmp_path, solver, 4)

    def teacher_is_the_logsnr_baseline(model, schedule, x_T, args, kw=None):
        return solver.sample(model, x_T, get_discretization("logsnr", schedule, 4))
    monkeypatch.setattr(cli, "_teacher", teacher_is_the_logsnr_baseline)
    out = tmp_path / "o"
    assert cli.main(["eval", "--model", "gmm:ring2d", "--schedule", path, "--n", "8", "--nfe-curve",
                     "--skip-model-baselines", "--out", str(out)]) == 0
    assert "not comparable, that baseline reproduces the teacher exactly" in capsys.readouterr().out
    record = json.loads((out / "eval.json").read_text())
    assert record["gain_vs_best"] is None
    assert {r["schedule"]: r["median RMSE"] for r in record["rows"]}["logsnr"] == 0.0


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_a_schedule_file_never_makes_ld3_import_its_model_factory(tmp_path, monkeypatch, capsys, command):
    """A file's model spec package.module:factory was imported and called when --model was not given: reading a
    (downloaded) schedule file could run any function.  Only built-in and diffusers: specs are taken from a file;
    a factory must be named on the command line, where it still works."""
    from ld3_ext.solvers import DPMSolverPP
    called = []
    mod = types.ModuleType("ld3_untrusted_factory_mod")

    def make():
        called.append(1)
        from ld3_ext.models import load_model
        return load_model("gmm:ring2d")
    mod.make = make
    monkeypatch.setitem(sys.modules, "ld3_untrusted_factory_mod", mod)
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4, spec="ld3_untrusted_factory_mod:make")
    extra = ["--skip-model-baselines"] if command == "eval" else []
    rc, err = _run([command, "--schedule", path, "--n", "4", "--out", str(tmp_path / "o"), *extra], capsys)
    assert rc == 2 and called == []
    assert "never makes ld3 import code" in err and "--model ld3_untrusted_factory_mod:make" in err
    rc = cli.main([command, "--schedule", path, "--n", "4", "--out", str(tmp_path / "o"), *extra,
                   "--model", "ld3_untrusted_factory_mod:make"])
    assert rc == 0 and called == [1]


def test_sample_with_a_file_that_records_no_model_asks_for_one(tmp_path, capsys):
    """It sampled the built-in ring without a word (ld3 eval refused); and the note about overridden solver flags
    appeared although none were given."""
    from ld3_ext.solvers import DPMSolverPP
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4, spec=None)
    rc, err = _run(["sample", "--schedule", path, "--n", "4", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "does not record which model" in err
    rc = cli.main(["sample", "--schedule", path, "--model", "gmm:ring2d", "--n", "4", "--out", str(tmp_path / "o")])
    cap = capsys.readouterr()
    assert rc == 0 and "comparing at the schedule's own solver" not in cap.err


@pytest.mark.parametrize("command", ["eval", "sample", "train"])
def test_an_out_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys, command,
                                                                        unwritable_out):
    """os.makedirs succeeds on an existing read-only folder: the run went on to the end and then lost its results
    with an error naming a temporary file.  (Root ignores permissions, so the write probe is made to fail.)"""
    from ld3_ext.solvers import DPMSolverPP
    out = unwritable_out

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran")
    monkeypatch.setattr(cli, "_teacher", no_teacher)
    path = _schedule_file(tmp_path, DPMSolverPP(2), 4)
    args = {"eval": ["eval", "--schedule", path, "--n", "4", "--skip-model-baselines"],
            "sample": ["sample", "--schedule", path, "--n", "4"],
            "train": ["train", "--model", "gmm:ring2d", "--nfe", "4", "--n-train", "4", "--n-valid", "4"]}[command]
    rc, err = _run(args + ["--out", str(out)], capsys)
    assert rc == 2 and f"--out {out}" in err and "cannot write there (Permission denied)" in err


def test_progress_bars_only_on_a_terminal(monkeypatch):
    """A job log or CI capture of `ld3 train` got one line per tqdm redraw (hundreds of kB for the main job):
    the bars are on only when stderr is a terminal, and --no-progress turns them off there too."""
    import argparse
    for tty, flag, want in ((True, False, True), (True, True, False), (False, False, False)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        assert cli._progress(argparse.Namespace(no_progress=flag)) is want


def test_eval_baselines_take_a_schedule_of_more_than_60_steps():
    """GITS searched a fine grid of its default 60 intervals: `ld3 eval` of an NFE-61 schedule failed after the
    teacher and DMN had run ("fine_steps (60) must be >= nfe (61)", exit 2)."""
    from ld3_ext.models import load_model
    model, schedule = load_model("gmm:ring2d")
    grids = cli._baseline_grids(["gits", "logsnr"], schedule, 61, model=model, solver=None, seed=0)
    assert grids["gits"].shape == (62,) and bool((grids["gits"][1:] < grids["gits"][:-1]).all())


def test_factory_model_must_say_its_sample_shape(monkeypatch):
    """Every command draws noise of the model's sample shape: a factory that does not set it was refused only at
    the first draw (`ld3 train`: with advice for the Python API), now before any work, naming --model."""
    from ld3_ext import EDM, wrap_model
    mod = types.ModuleType("ld3_shapeless_factory_mod")

    def make(shape):
        def factory():
            m = wrap_model(lambda x, t: 0.5 * x, EDM(), prediction="x0")
            if shape is not None:
                m.sample_shape = shape
            return m, m.schedule
        return factory
    for name, shape in [("none", None), ("empty", ()), ("zero", (0, 8)), ("float", (1.0,)), ("int", 3)]:
        setattr(mod, name, make(shape))
    mod.good = make((1, 8, 8))
    monkeypatch.setitem(sys.modules, "ld3_shapeless_factory_mod", mod)
    for name in ("none", "empty", "zero", "float", "int"):
        with pytest.raises(ModelSpecError, match=r"--model 'ld3_shapeless_factory_mod:%s'.*model.sample_shape" % name):
            load_model(f"ld3_shapeless_factory_mod:{name}")
    assert load_model("ld3_shapeless_factory_mod:good")[0].sample_shape == (1, 8, 8)


@pytest.mark.parametrize("argv, flag", [
    (["train", "--loss", "foo"], "--loss"),
    (["train", "--init", "foo"], "--init"),
    (["train", "--nfe", "2"], "--nfe 2"),                      # below order 3's warm-up
    (["sample", "--schedule", "no_such_schedule.json"], "--schedule"),
    (["train", "--model", "diffusers:no_such_folder"], "--model"),
])
def test_argument_mistakes_name_their_flag_even_with_tracebacks_on(argv, flag, tmp_path, monkeypatch, capsys):
    """LD3_TRACEBACK=1 shows the traceback of a failed run, but a flag's mistake keeps its one line and status 2
    (these four reached the library first and came back as a traceback and status 1, naming no flag)."""
    monkeypatch.setenv("LD3_TRACEBACK", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "o" / "checkpoint").exists()  # refused before any work


def test_teacher_regeneration_whose_set_another_run_replaced_fails(tmp_path, monkeypatch, capsys):
    """`ld3 teacher --regenerate-teacher` exists to cache a set: when a regeneration beside it restarted the staged
    set with its own settings (commit() then keeps the cache as it is and warns), the command fails (exit 1) instead
    of printing 'teacher pairs ready' over another run's set.  An undisturbed regeneration still succeeds."""
    import warnings

    from ld3_ext.training import teacher as teacher_mod
    out = tmp_path / "o"
    base = ["teacher", "--model", "gmm:ring2d", "--n-train", "4", "--n-valid", "2", "--no-progress", "--out", str(out)]
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    assert cli.main(base + ["--seed", "0"]) == 0
    assert cli.main(base + ["--seed", "1", "--regenerate-teacher"]) == 0  # swapped in: seed 1's set cached
    capsys.readouterr()

    def foreign_commit(self):  # what commit() does when another run owns the staged set
        if self.regenerating:
            self.directory = self.root
            warnings.warn("the staged teacher set was replaced by another run with other settings; this run's "
                          "pairs are not cached")
    monkeypatch.setattr(teacher_mod.TeacherCache, "commit", foreign_commit)
    rc = cli.main(base + ["--seed", "2", "--regenerate-teacher"])
    err = capsys.readouterr().err
    assert rc == 1 and "holds another run's teacher set" in err and "teacher pairs ready" not in err, err


@pytest.mark.parametrize("text,expect", [
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:36012. "
     "This is typically caused by a remote worker crashing.", "another rank stopped"),
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 600000ms for recv operation "
     "to complete", "a collective timed out"),
])
def test_a_rank_whose_peer_died_says_so_in_one_line(monkeypatch, capsys, text, expect):
    """Under torchrun, the rank left behind when another is killed or fails got gloo's multi-line traceback; it now
    prints one line naming the cause (exit 1).  Outside torchrun the same RuntimeError stays a bug's traceback."""
    def fails(args):
        raise RuntimeError(text)
    p = cli.build_parser()
    # train: the commands that use several ranks (the others run on rank 0 only)
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(p, "train", fails))
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rc = cli.main(["train", "--model", "gmm:ring2d"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"ld3 train: error: rank 1: {expect}"), err
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="pair.cc|unbound_buffer"):
        cli.main(["train", "--model", "gmm:ring2d"])


def test_ld3_teacher_generates_on_the_device_given(tmp_path, monkeypatch):
    """`ld3 teacher --device cuda` made its pairs with CPU tensors for a model loaded on the GPU (the device never
    reached the generator; `ld3 train` passed it): each call now gets --device."""
    from ld3_ext.training import teacher
    seen, real = [], teacher.load_or_generate_teacher

    def spy(*a, **k):
        seen.append(k.get("device"))
        return real(*a, **k)
    monkeypatch.setattr(teacher, "load_or_generate_teacher", spy)
    args = ["teacher", "--model", "gmm:ring2d", "--n-train", "2", "--n-valid", "2", "--no-progress", "--device", "cpu",
            "--out", str(tmp_path / "t")]
    assert cli.main(args) == 0
    assert cli.main(args + ["--regenerate-teacher"]) == 0
    assert seen == ["cpu"] * 3
