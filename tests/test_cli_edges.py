"""`ld3` edges: an eval.json of a schedule that a training replaced, Ctrl-C during the start-up imports, --out
checked before the work of `ld3 teacher` and `ld3 export-diffusers`, and --scheduler-config errors."""
import errno
import hashlib
import json
import re
import os
import subprocess
import sys

import pytest

from ld3_ext import cli

from _cli_run import one_line_errors, run_cli  # noqa: F401 - an autouse fixture




def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


TRAIN = ["train", "--model", "gmm:ring2d", "--nfe", "4", "--no-progress", "--n-train", "4", "--n-valid", "4",
         "--rounds-v1", "1", "--rounds-v2", "0", "--time-mode", "lambda"]
EVAL = ["eval", "--n", "8", "--nfe-curve", "--skip-model-baselines"]
EVAL_FILES = ("eval.json", "schedules.png", "eval_samples.png")


def _stale(out):
    return sorted(f for f in os.listdir(out) if ".stale-" in f)


# ------------------------------------------------------------------------------------------------
# 1. an eval.json of a schedule that `ld3 train --fresh` replaced
def test_eval_json_records_the_sha256_of_the_schedule_it_evaluated(tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(TRAIN + ["--init", "logsnr", "--out", str(out)], capsys)[0] == 0
    assert run_cli(EVAL + ["--out", str(out)], capsys)[0] == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["schedule_sha256"] == _sha256(out / "schedule.json")  # what `sha256sum schedule.json` prints


def test_a_fresh_training_sets_aside_the_eval_of_the_schedule_it_replaced(tmp_path, capsys):
    """eval.json (and its figures) of the old schedule still looked like the results of the new one."""
    out = tmp_path / "o"
    assert run_cli(TRAIN + ["--init", "logsnr", "--out", str(out)], capsys)[0] == 0
    assert run_cli(EVAL + ["--out", str(out)], capsys)[0] == 0
    earlier = {name: (out / name).read_bytes() for name in EVAL_FILES}
    old_schedule = (out / "schedule.json").read_bytes()
    rc, _, err = run_cli(TRAIN + ["--init", "edm", "--fresh", "--out", str(out)], capsys)
    assert rc == 0 and "evaluated the schedule this training replaced" in err
    assert not any((out / name).exists() for name in EVAL_FILES)  # nothing that looks current
    # the replaced schedule itself is kept too, byte for byte
    (kept_schedule,) = [f for f in _stale(out) if f.startswith("schedule.stale-")]
    assert (out / kept_schedule).read_bytes() == old_schedule and "is kept as" in err
    stale = [f for f in _stale(out) if not f.startswith("schedule.")]
    assert len(stale) == 3
    kept = {name: next((out / f).read_bytes() for f in stale if f.startswith(name.split(".")[0] + ".stale-"))
            for name in EVAL_FILES}
    assert kept == earlier  # renamed, not lost
    old_record = json.loads(kept["eval.json"])
    assert old_record["schedule_sha256"] != _sha256(out / "schedule.json")
    # a second round sets the next stale set beside the first, never over it
    assert run_cli(EVAL + ["--out", str(out)], capsys)[0] == 0
    assert run_cli(TRAIN + ["--init", "time_uniform", "--fresh", "--out", str(out)], capsys)[0] == 0
    assert len(_stale(out)) == 8 and not (out / "eval.json").exists()  # 2 x (3 eval files + the schedule)


def test_rerunning_a_finished_training_keeps_its_schedule_file_and_eval(tmp_path, capsys):
    """Resuming a finished run gives the same schedule: its file is not rewritten (only its creation time would
    change), so the eval.json of it stays current."""
    out = tmp_path / "o"
    assert run_cli(TRAIN + ["--init", "logsnr", "--out", str(out)], capsys)[0] == 0
    assert run_cli(EVAL + ["--out", str(out)], capsys)[0] == 0
    schedule, record = (out / "schedule.json").read_bytes(), (out / "eval.json").read_bytes()
    def state():  # the checkpoint's files; its copy of the best schedule only up to its creation time
        files = {}
        for p in sorted((out / "checkpoint").rglob("*")):
            if p.is_file():
                data = p.read_bytes()
                if p.suffix == ".json":
                    data = {k: v for k, v in json.loads(data).items() if k not in ("created", "checksum")}
                files[p.name] = data
        return files
    checkpoint = state()
    assert len(checkpoint) >= 2
    rc, text, _ = run_cli(TRAIN + ["--init", "logsnr", "--out", str(out)], capsys)
    assert rc == 0 and "already holds this schedule" in text
    assert (out / "schedule.json").read_bytes() == schedule and (out / "eval.json").read_bytes() == record
    assert _stale(out) == []
    # nothing trained, so nothing was saved: the checkpoint's elapsed time grew by microseconds on every rerun, and
    # once that reached train_seconds' third decimal the schedule no longer matched and was rewritten
    assert state() == checkpoint


def test_an_eval_of_another_schedule_file_is_left_alone(tmp_path, capsys):
    other = tmp_path / "other"
    assert run_cli(TRAIN + ["--init", "edm", "--out", str(other)], capsys)[0] == 0
    out = tmp_path / "o"
    assert run_cli(EVAL + ["--schedule", str(other / "schedule.json"), "--out", str(out)], capsys)[0] == 0
    record = (out / "eval.json").read_bytes()
    assert run_cli(TRAIN + ["--init", "logsnr", "--out", str(out)], capsys)[0] == 0
    assert (out / "eval.json").read_bytes() == record and _stale(out) == []


def test_an_eval_json_without_a_sha256_of_the_replaced_schedule_file_is_set_aside(tmp_path, capsys):
    """An eval.json written before the sha256 was recorded: it names the schedule file being replaced."""
    out = tmp_path / "o"
    out.mkdir()
    schedule = out / "schedule.json"
    schedule.write_text("the new schedule")
    (out / "eval.json").write_text(json.dumps({"schedule_file": str(schedule), "rows": []}))
    (out / "schedules.png").write_bytes(b"old figure")
    moved = cli._set_aside_stale_eval(str(out), str(schedule), replaced_sha="0" * 64)
    assert sorted(os.path.basename(p) for p in moved) == _stale(out) and len(moved) == 2
    assert not (out / "eval.json").exists() and not (out / "schedules.png").exists()
    # one that records this very schedule, or is not ours, stays
    (out / "eval.json").write_text(json.dumps({"schedule_file": str(schedule), "schedule_sha256": _sha256(schedule)}))
    assert cli._set_aside_stale_eval(str(out), str(schedule), replaced_sha=None) == []
    (out / "eval.json").write_text("not json")
    assert cli._set_aside_stale_eval(str(out), str(schedule), replaced_sha=None) == []
    assert (out / "eval.json").read_text() == "not json"


def test_an_eval_json_that_cannot_be_renamed_is_a_warning_not_a_failed_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    out.mkdir()
    schedule = out / "schedule.json"
    schedule.write_text("the new schedule")
    (out / "eval.json").write_text(json.dumps({"schedule_file": str(schedule)}))

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "replace", refuse)
    assert cli._set_aside_stale_eval(str(out), str(schedule), replaced_sha=None) == []
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "could not be renamed (Permission denied)" in err


def test_eval_says_so_when_its_schedule_is_replaced_while_it_runs(tmp_path, monkeypatch, capsys):
    """A training that replaces the file during the evaluation: eval.json names the schedule it really ran."""
    out = tmp_path / "o"
    assert run_cli(TRAIN + ["--init", "logsnr", "--out", str(out)], capsys)[0] == 0
    evaluated = _sha256(out / "schedule.json")
    real_prior = cli._prior

    def prior_then_replaced(*a, **k):
        x = real_prior(*a, **k)
        with open(out / "schedule.json", "a") as f:
            f.write("\n")
        return x
    monkeypatch.setattr(cli, "_prior", prior_then_replaced)
    rc, _, err = run_cli(EVAL + ["--out", str(out)], capsys)
    assert rc == 0 and "was replaced during this evaluation" in err
    assert json.loads((out / "eval.json").read_text())["schedule_sha256"] == evaluated != _sha256(out / "schedule.json")


# ------------------------------------------------------------------------------------------------
# 2. Ctrl-C during the start-up imports
_INTERRUPTED_IMPORT = r"""
import importlib.abc, sys
from importlib.metadata import entry_points
target = sys.argv.pop(1)

class Interrupt(importlib.abc.MetaPathFinder):  # the user's Ctrl-C, arriving while `target` is imported
    def find_spec(self, name, path, target_=None):
        if name == target:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
(ep,) = [e for e in entry_points(group="console_scripts") if e.name == "ld3"]
sys.argv[0] = "ld3"
sys.exit(ep.load()())  # what the installed `ld3` script runs
"""


def _script_interrupted_at(module, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LD3_TRACEBACK"}
    return subprocess.run([sys.executable, "-c", _INTERRUPTED_IMPORT, module, "--help"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)


def test_ctrl_c_while_the_script_imports_the_cli_is_one_line_and_130(tmp_path):
    """The `ld3` script pointed at ld3_ext.cli, so a Ctrl-C during its imports printed a long traceback."""
    r = _script_interrupted_at("ld3_ext.cli", tmp_path)
    assert (r.returncode, r.stderr, r.stdout) == (130, "ld3: interrupted\n", "")


def test_ctrl_c_while_the_script_imports_torch_is_one_line_and_130(tmp_path):
    """ld3_ext/__init__.py imports torch before the entry module can run: the package catches it for the script."""
    r = _script_interrupted_at("torch", tmp_path)
    assert (r.returncode, r.stderr, r.stdout) == (130, "ld3: interrupted\n", "")


_SIGNAL_DURING_IMPORT = r"""
import importlib.abc, os, signal, sys
from importlib.metadata import entry_points
target, signame = sys.argv.pop(1), sys.argv.pop(1)

class Signal(importlib.abc.MetaPathFinder):  # the user's Ctrl-C / a kill, arriving while `target` is imported
    fired = False
    def find_spec(self, name, path, target_=None):
        if name == target and not Signal.fired:
            Signal.fired = True
            os.kill(os.getpid(), getattr(signal, signame))
        return None

sys.meta_path.insert(0, Signal())
(ep,) = [e for e in entry_points(group="console_scripts") if e.name == "ld3"]
sys.argv[0] = "ld3"
sys.exit(ep.load()())
"""


@pytest.mark.parametrize("module,signame,code,message", [
    ("numpy", "SIGINT", 130, "ld3: interrupted"),  # torch's C-level numpy set-up swallowed the KeyboardInterrupt
    ("torch", "SIGINT", 130, "ld3: interrupted"),
    ("torch", "SIGTERM", 143, "ld3: terminated (SIGTERM)"),
])
def test_a_signal_during_the_start_up_imports_is_one_line(tmp_path, module, signame, code, message):
    """A Ctrl-C while torch set numpy up was lost: `ld3 --help` ran on and exited 0 (or crashed later)."""
    env = {k: v for k, v in os.environ.items() if k != "LD3_TRACEBACK"}
    r = subprocess.run([sys.executable, "-c", _SIGNAL_DURING_IMPORT, module, signame, "--help"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert (r.returncode, r.stderr, r.stdout) == (code, message + "\n", "")


_SIGNAL_AFTER_THE_RUN = r"""
import os, signal, sys, time
from importlib.metadata import entry_points
sys.argv[0] = "ld3"
from ld3_ext import cli
cli.main = lambda argv=None: 0  # a run that finished
(ep,) = [e for e in entry_points(group="console_scripts") if e.name == "ld3"]
code = ep.load()()
os.kill(os.getpid(), signal.SIGINT)  # during interpreter shutdown, as the user presses Ctrl-C
time.sleep(0.2)
sys.exit(code)
"""


def test_a_ctrl_c_after_the_run_finished_keeps_its_status(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LD3_TRACEBACK"}
    r = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_THE_RUN], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, "")


def test_ctrl_c_while_a_program_imports_the_package_is_left_to_the_program(tmp_path):
    """Only the ld3 script turns it into an exit: a user's program gets its KeyboardInterrupt."""
    code = ("import importlib.abc, sys\n"
            "class I(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'torch': raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, I())\n"
            "try:\n    import ld3_ext\nexcept KeyboardInterrupt:\n    print('caught')\n")
    env = {k: v for k, v in os.environ.items() if k != "LD3_TRACEBACK"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, "caught")


def test_the_entry_catches_a_ctrl_c_outside_a_commands_own_handler(monkeypatch, capsys):
    from ld3_ext import _cli_entry

    def interrupted(*a, **k):  # while the command line is parsed, before main's handler
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert _cli_entry.main() == 130
    assert capsys.readouterr().err == "ld3: interrupted\n"
    monkeypatch.setenv("LD3_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        _cli_entry.main()


# ------------------------------------------------------------------------------------------------
# 3. --out of teacher / export-diffusers, and --scheduler-config
def _schedule_file(tmp_path):
    from ld3_ext import EDM, discretizations
    from ld3_ext.schedule_file import LearnedSchedule
    from ld3_ext.solvers import DPMSolverPP
    s = EDM()
    path = str(tmp_path / "schedule.json")
    LearnedSchedule(discretizations.logsnr_uniform(s, 2), solver_config=DPMSolverPP(2).config(), nfe=2,
                    schedule_config=s.config()).save(path)
    return path


def _never(what):
    def fail(*a, **k):
        raise AssertionError(f"{what} ran")
    return fail


def test_teacher_refuses_an_out_it_cannot_write_before_generating(unwritable_out, monkeypatch, capsys):
    from ld3_ext.training import teacher
    monkeypatch.setattr(teacher, "load_or_generate_teacher", _never("the teacher generation"))
    rc, _, err = run_cli(["teacher", "--model", "gmm:ring2d", "--n-train", "4", "--n-valid", "4", "--no-progress",
                       "--out", str(unwritable_out)], capsys)
    assert rc == 2 and f"--out {unwritable_out}" in err and "cannot write there (Permission denied)" in err
    assert "Traceback" not in err


def test_export_diffusers_refuses_an_out_it_cannot_write_before_building(tmp_path, unwritable_out, monkeypatch,
                                                                         capsys):
    from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler
    monkeypatch.setattr(LD3Scheduler, "from_schedule_file", _never("the scheduler build"))
    rc, _, err = run_cli(["export-diffusers", _schedule_file(tmp_path), "--out", str(unwritable_out)], capsys)
    assert rc == 2 and f"--out {unwritable_out}: cannot write there (Permission denied)" in err
    assert os.listdir(unwritable_out) == []


def test_export_diffusers_refuses_an_out_under_a_file(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    rc, _, err = run_cli(["export-diffusers", _schedule_file(tmp_path), "--out", str(a_file / "sub")], capsys)
    assert rc == 2 and err.startswith(f"ld3 export-diffusers: error: --out {a_file / 'sub'}: cannot write there")
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("where", ["missing file", "folder without the config"])
def test_a_scheduler_config_that_is_not_there_is_an_error_naming_the_flag(tmp_path, capsys, where):
    """It was `error: FileNotFoundError: [Errno 2] No such file or directory: 'x'`: neither the flag nor what
    belongs there."""
    if where == "missing file":
        cfg = tmp_path / "nowhere.json"
    else:
        cfg = tmp_path / "scheduler"
        cfg.mkdir()
    out = tmp_path / "o"
    rc, _, err = run_cli(["export-diffusers", _schedule_file(tmp_path), "--scheduler-config", str(cfg),
                       "--out", str(out)], capsys)
    assert rc == 2 and err.startswith("ld3 export-diffusers: error: --scheduler-config: cannot read ")
    assert "no such file" in err and "scheduler_config.json" in err and "FileNotFoundError" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()  # refused before --out was made


def test_a_scheduler_config_that_is_not_a_json_object_is_an_error_naming_the_flag(tmp_path, capsys):
    cfg = tmp_path / "list.json"
    cfg.write_text("[1, 2]")
    rc, _, err = run_cli(["export-diffusers", _schedule_file(tmp_path), "--scheduler-config", str(cfg),
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and err.startswith(f"ld3 export-diffusers: error: --scheduler-config: {cfg} holds a JSON list")


# ------------------------------------------------------------------------------------------------
# ld3 eval's model baselines (GITS) on a float32 factory model
def test_eval_model_baselines_run_in_the_models_dtype(tmp_path, capsys, monkeypatch):
    """GITS ran its float64 default on a float32 network: 'mat1 and mat2 must have the same dtype', blamed on
    sample_shape, unless --skip-model-baselines."""
    _f32_factory(monkeypatch, "ld3_f32_factory_mod")  # float32 weights
    out = tmp_path / "run"
    train = ["train", "--model", "ld3_f32_factory_mod:make", "--nfe", "4", "--no-progress", "--n-train", "4",
             "--n-valid", "4", "--rounds-v1", "1", "--rounds-v2", "0", "--time-mode", "lambda", "--out", str(out)]
    assert run_cli(train, capsys)[0] == 0
    rc, stdout, err = run_cli(["eval", "--model", "ld3_f32_factory_mod:make", "--n", "4", "--out", str(out)], capsys)
    assert rc == 0, err
    record = json.loads((out / "eval.json").read_text())
    assert "gits" in json.dumps(record["rows"])


def test_export_diffusers_never_replaces_a_models_own_scheduler_config(tmp_path, capsys):
    """Without --scheduler-config, `--out MODEL/scheduler` replaced the model's DDPMScheduler config with ours."""
    folder = tmp_path / "pipe" / "scheduler"
    folder.mkdir(parents=True)
    own = folder / "scheduler_config.json"
    own.write_text(json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}))
    before = own.read_bytes()
    rc, _, err = run_cli(["export-diffusers", _schedule_file(tmp_path), "--out", str(folder)], capsys)
    assert rc == 2 and "DDPMScheduler config" in err and own.read_bytes() == before
    # an earlier export of ours is replaced as before
    from ld3_ext import VPDiscrete, discretizations
    from ld3_ext.schedule_file import LearnedSchedule
    from ld3_ext.solvers import DPMSolverPP
    s = VPDiscrete.linear()
    vp_file = str(tmp_path / "vp.json")
    LearnedSchedule(discretizations.logsnr_uniform(s, 4), solver_config=DPMSolverPP(2).config(), nfe=4,
                    schedule_config=s.config()).save(vp_file)
    out = tmp_path / "export"
    assert run_cli(["export-diffusers", vp_file, "--out", str(out)], capsys)[0] == 0
    assert run_cli(["export-diffusers", vp_file, "--out", str(out)], capsys)[0] == 0
    assert json.loads((out / "scheduler_config.json").read_text())["_class_name"] == "LD3Scheduler"


# ------------------------------------------------------------------------------------------------
# one `ld3 train` per --out at a time
def test_a_second_train_on_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys, monkeypatch):
    """Two runs on one --out both reported success, each overwriting the other's checkpoint and schedule.json."""
    out = tmp_path / "run"
    seen = {}

    def second_run_meanwhile(args, *rest):  # the first run's training, while a second `ld3 train` starts
        monkeypatch.setattr(cli, "_train_locked", real)
        seen["second"] = run_cli(TRAIN + ["--solver", "unipc", "--out", str(out)], capsys)
        return real(args, *rest)
    real = cli._train_locked
    monkeypatch.setattr(cli, "_train_locked", second_run_meanwhile)
    rc, _, err = run_cli(TRAIN + ["--out", str(out)], capsys)
    assert rc == 0, err
    rc2, _, err2 = seen["second"]
    assert rc2 == 2 and "another `ld3 train` is running in" in err2
    # once the first has finished, the same --out takes a new run (the lock is released)
    assert run_cli(TRAIN + ["--out", str(out)], capsys)[0] == 0


# ------------------------------------------------------------------------------------------------
# the teacher a schedule file records, on any grid
def _f32_factory(monkeypatch, name):
    """A `package.module:factory` model with float32 weights (an eps-predicting Linear on VPLinear, samples (4,))."""
    import types
    import torch
    import ld3_ext
    mod = types.ModuleType(name)

    def make():
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 4)
        schedule = ld3_ext.VPLinear()
        model = ld3_ext.wrap_model(lambda x, t: 0.1 * net(x), schedule, prediction="eps")
        model.net = net
        model.sample_shape = (4,)
        return model, schedule
    mod.make = make
    monkeypatch.setitem(sys.modules, name, mod)
    return f"{name}:make"


@pytest.mark.parametrize("grid,used", [("time_uniform", "time_uniform"), ("no_such_grid", "logsnr")])
def test_eval_scores_against_the_recorded_teacher_on_its_own_grid(tmp_path, capsys, monkeypatch, grid, used):
    """A teacher on another grid than logSNR (the Python API's teacher_discretization) was silently replaced by
    the default 20-NFE logSNR teacher; one that cannot be rebuilt is now said to be replaced."""
    from ld3_ext import VPLinear, discretizations
    from ld3_ext.schedule_file import LearnedSchedule
    from ld3_ext.solvers import UniPC
    spec = _f32_factory(monkeypatch, "ld3_teacher_grid_mod")
    s = VPLinear()
    path = str(tmp_path / "schedule.json")
    LearnedSchedule(discretizations.logsnr_uniform(s, 4), solver_config=UniPC(order=2).config(), nfe=4,
                    schedule_config=s.config(),
                    training={"teacher": {"kind": "solver", "solver": UniPC(order=3).config(), "nfe": 10,
                                          "discretization": grid}}).save(path)
    rc, text, err = run_cli(["eval", "--schedule", path, "--model", spec, "--n", "4", "--skip-model-baselines",
                          "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    teacher = json.loads((tmp_path / "o" / "eval.json").read_text())["teacher"]
    assert teacher["discretization"] == used and teacher["nfe"] == (10 if used != "logsnr" else 20)
    assert ("cannot be rebuilt here" in err) == (used == "logsnr")


@pytest.mark.parametrize("record,noted", [("garbage", True), ({"nfe": "x"}, True), ({"kind": "magic"}, True),
                                           ({"kind": "exact", "reference": "ring2d"}, False)])
def test_eval_says_when_the_recorded_teacher_is_no_record_it_can_read(tmp_path, capsys, monkeypatch, record, noted):
    """A teacher record that no trainer writes (a string, no kind, an unknown kind) was replaced by the default
    teacher without the note a solver record that cannot be rebuilt gets (found by a CLI review)."""
    from ld3_ext import VPLinear, discretizations
    from ld3_ext.schedule_file import LearnedSchedule
    from ld3_ext.solvers import UniPC
    spec = _f32_factory(monkeypatch, "ld3_teacher_record_mod")
    s = VPLinear()
    path = str(tmp_path / "schedule.json")
    LearnedSchedule(discretizations.logsnr_uniform(s, 4), solver_config=UniPC(order=2).config(), nfe=4,
                    schedule_config=s.config(), training={"teacher": record}).save(path)
    rc, text, err = run_cli(["eval", "--schedule", path, "--model", spec, "--n", "4", "--skip-model-baselines",
                          "--nfe-curve", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    assert ("is not one ld3 can read; scoring against the default teacher" in err) == noted, err
    teacher = json.loads((tmp_path / "o" / "eval.json").read_text())["teacher"]
    assert teacher["nfe"] == 20 and teacher["discretization"] == "logsnr"


# ------------------------------------------------------------------------------------------------
# review findings: a stale eval.json left by an interrupt, a refused export's folders, two messages
def test_an_eval_json_left_by_an_interrupt_after_the_schedule_was_written_is_set_aside_on_rerun(tmp_path, capsys,
                                                                                               monkeypatch):
    """Ctrl-C between writing the new schedule.json and renaming the eval of the replaced one: the rerun found the
    schedule already written ("kept as it is") and left the old eval.json looking current."""
    out = tmp_path / "o"
    assert run_cli(TRAIN + ["--init", "logsnr", "--out", str(out)], capsys)[0] == 0
    assert run_cli(EVAL + ["--out", str(out)], capsys)[0] == 0
    old_record = (out / "eval.json").read_bytes()
    real = cli._set_aside_stale_eval

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_set_aside_stale_eval", interrupted)
    assert run_cli(TRAIN + ["--init", "edm", "--fresh", "--out", str(out)], capsys)[0] == 130
    monkeypatch.setattr(cli, "_set_aside_stale_eval", real)
    assert (out / "eval.json").read_bytes() == old_record  # the window: the old eval beside the new schedule
    rc, text, err = run_cli(TRAIN + ["--init", "edm", "--out", str(out)], capsys)
    assert rc == 0 and "already holds this schedule" in text and "evaluated the schedule this training" in err
    assert not (out / "eval.json").exists()
    (stale,) = [f for f in _stale(out) if f.startswith("eval.stale-")]
    assert (out / stale).read_bytes() == old_record
    # and an eval of the current schedule stays on the next rerun
    assert run_cli(EVAL + ["--out", str(out)], capsys)[0] == 0
    current = (out / "eval.json").read_bytes()
    assert run_cli(TRAIN + ["--init", "edm", "--out", str(out)], capsys)[0] == 0
    assert (out / "eval.json").read_bytes() == current


def test_a_refused_export_leaves_no_folder_and_a_folder_in_the_configs_place_is_named(tmp_path, capsys):
    edm_file = _schedule_file(tmp_path)  # EDM: LD3Scheduler refuses it
    out = tmp_path / "new" / "scheduler_config.json"  # --out spelled as the file it would write
    rc, _, err = run_cli(["export-diffusers", edm_file, "--out", str(out)], capsys)
    assert rc != 0 and not (tmp_path / "new").exists()
    (tmp_path / "exp" / "scheduler_config.json").mkdir(parents=True)
    rc, _, err = run_cli(["export-diffusers", edm_file, "--out", str(tmp_path / "exp")], capsys)
    assert rc == 2 and "--out: " in err and "scheduler_config.json is a folder" in err and ".tmp" not in err


def test_heun_nfe_too_small_names_the_smallest_it_takes(tmp_path, capsys):
    rc, _, err = run_cli(["train", "--model", "gmm:ring2d", "--solver", "heun", "--nfe", "1", "--out",
                       str(tmp_path / "o")], capsys)
    assert rc == 2 and "nfe >= 4 for Heun" in err


def test_a_diffusers_path_that_is_a_file_is_named_as_such(tmp_path, capsys):
    f = tmp_path / "schedule.json"
    f.write_text("{}")
    rc, _, err = run_cli(["sample", "--model", f"diffusers:{f}", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "is a file, not a folder" in err, err


def test_the_eval_dmn_row_is_the_grid_of_the_solvers_order_as_the_trainers_dmn_start():
    """`ld3 eval` always used the order-3 bound; the trainer's DMN start (--init dmn) follows the solver's order."""
    import torch
    from ld3_ext import EDM, DPMSolverPP, Euler, Heun, IPNDM
    from ld3_ext.baselines.dmn import dmn, order_for
    s = EDM()
    for solver, order in ((DPMSolverPP(order=2), 2), (Euler(), 1), (Heun(), 2), (DPMSolverPP(order=3), 3),
                          (IPNDM(order=4), 3)):
        assert order_for(solver) == order
        got = cli._baseline_grids(["dmn"], s, 5, solver=solver)["dmn"]
        assert torch.equal(got, dmn(s, 5, order=order)), type(solver).__name__
    assert not torch.equal(dmn(s, 5, order=1), dmn(s, 5, order=3))  # the orders give other grids


def test_a_refused_export_leaves_no_folder_of_a_path_with_dot_dot(tmp_path, capsys, monkeypatch):
    """os.makedirs walks the path as written: new2/../new3 creates new2 as well, which was left behind."""
    monkeypatch.chdir(tmp_path)
    edm_file = _schedule_file(tmp_path)  # EDM: LD3Scheduler refuses it
    rc, _, _ = run_cli(["export-diffusers", edm_file, "--out", "new2/../new3"], capsys)
    assert rc != 0 and not (tmp_path / "new2").exists() and not (tmp_path / "new3").exists()


def test_a_refused_export_keeps_a_folder_that_existed_before(tmp_path, capsys, monkeypatch):
    """new/../keep: makedirs makes only new; keep existed (empty) and was removed with it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").mkdir()
    edm_file = _schedule_file(tmp_path)  # EDM: LD3Scheduler refuses it
    for out in ("new/../keep", f"{tmp_path}/new/../keep/"):
        rc, _, _ = run_cli(["export-diffusers", edm_file, "--out", out], capsys)
        assert rc != 0 and (tmp_path / "keep").is_dir() and not (tmp_path / "new").exists()


def test_export_of_a_schedule_no_diffusers_network_reads_fails_without_a_warning_first(tmp_path, capsys):
    """An EDM schedule file cannot become an LD3Scheduler: the export said so only after warning that it assumed
    prediction_type='epsilon', which read as if it had gone ahead."""
    path = _schedule_file(tmp_path)  # an EDM file
    rc, _, err = run_cli(["export-diffusers", path, "--out", str(tmp_path / "sched")], capsys)
    assert rc == 2
    assert "schedule_config type 'EDM'" in err and "VPDiscrete" in err
    assert "warning" not in err and "assuming" not in err
    assert not (tmp_path / "sched").exists()


# ------------------------------------------------------------------------------------------------
# review findings (CLI walkthrough, 2026-12-06): bounds, names and notes
@pytest.mark.parametrize("argv,match", [
    (["train", "--nfe", "100000000000"], "--nfe must be <= 1000, got 100000000000"),
    (["sample", "--nfe", "1001"], "--nfe must be <= 1000, got 1001"),
    (["train", "--teacher-nfe", "20000"], "--teacher-nfe must be <= 10000, got 20000"),
    (["eval", "--nfe-curve", "2", "5000"], r"--nfe-curve values must be in 1\.\.1000, got 5000"),
    (["train", "--rounds-v1", "0", "--rounds-v2", "0"], "--rounds-v1 and --rounds-v2 are both 0"),
    # OpenMP segfaulted making 100000 threads; past int64 torch's "Overflow when unpacking long" named no flag
    (["sample", "--threads", "2000"], r"--threads must be in 1\.\.1024, got 2000"),
    (["sample", "--threads", "99999999999"], r"--threads must be in 1\.\.1024, got 99999999999"),
    (["sample", "--threads", "0"], r"--threads must be in 1\.\.1024, got 0"),
    # past int64: a C++ backtrace from torch.randn (or a bare traceback at 2**62) instead of a flag's name
    (["sample", "--n", str(10 ** 23)], rf"--n must be <= 1000000000, got {10 ** 23}"),
    (["eval", "--n", str(2 ** 62)], rf"--n must be <= 1000000000, got {2 ** 62}"),
    (["train", "--n-train", str(10 ** 20)], rf"--n-train must be <= 1000000000, got {10 ** 20}"),
    (["teacher", "--n-valid", str(10 ** 20)], rf"--n-valid must be <= 1000000000, got {10 ** 20}"),
])
def test_out_of_range_counts_are_refused_naming_the_flag(tmp_path, capsys, argv, match):
    """A huge --nfe ran on for minutes, then failed naming min_gap_fraction; both rounds 0 named rounds_v1 (Python)."""
    rc, _, err = run_cli(argv + ["--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_python_nfe_bound_names_nfe():
    from ld3_ext.solvers import DPMSolverPP
    from ld3_ext.training.trainer import MAX_NFE, check_nfe
    assert check_nfe(DPMSolverPP(3), MAX_NFE) == MAX_NFE
    with pytest.raises(ValueError, match=r"^nfe=1001 is beyond what LD3 is for: at most 1000"):
        check_nfe(DPMSolverPP(3), MAX_NFE + 1)


@pytest.mark.parametrize("cmd", ["eval", "sample"])
def test_a_schedule_flag_naming_a_folder_is_refused_naming_it(tmp_path, capsys, cmd):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "schedule.json").write_text(open(_schedule_file(tmp_path)).read())
    rc, _, err = run_cli([cmd, "--schedule", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and f"--schedule: {folder} is a folder, not a schedule file (pass --schedule " \
        f"{folder / 'schedule.json'})" in err, err
    if cmd == "eval":  # the default OUT/schedule.json being a folder names --out, the flag that chose it
        (tmp_path / "o2" / "schedule.json").mkdir(parents=True)
        rc, _, err = run_cli(["eval", "--out", str(tmp_path / "o2")], capsys)
        assert rc == 2 and f"--out: {tmp_path / 'o2' / 'schedule.json'} is a folder, not a schedule file" in err, err
        assert "pass --schedule" not in err


def test_a_model_record_that_is_no_name_is_refused_as_such(tmp_path, capsys):
    """model.spec 5 was reported as 'the model factory 5 ... pass --model 5 yourself if you trust it'."""
    from ld3_ext.schedule_file import load_schedule
    learned = load_schedule(_schedule_file(tmp_path))
    learned.model = {"spec": 5}
    with pytest.raises(cli.UsageError, match=r"records no valid model \(its model spec is 5, not a name\); pass "
                                             r"--model"):
        cli._model_from_file(learned, "s.json")


def test_heun_curve_points_that_run_at_another_nfe_are_said(tmp_path, capsys):
    from ld3_ext import EDM, discretizations
    from ld3_ext.schedule_file import LearnedSchedule
    from ld3_ext.solvers import Heun
    s = EDM()
    path = str(tmp_path / "schedule.json")
    LearnedSchedule(discretizations.logsnr_uniform(s, 2), solver_config=Heun().config(), nfe=4,
                    schedule_config=s.config(), model={"spec": "gmm:ring2d"}).save(path)
    rc, _, err = run_cli(["eval", "--schedule", path, "--n", "4", "--skip-model-baselines", "--nfe-curve", "2", "3",
                       "4", "5", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    assert "note: --nfe-curve: heun spends 2 evaluations a step, so 3 runs as 2, 5 runs as 4" in err, err
    curves = json.loads((tmp_path / "o" / "eval.json").read_text())["curves"]
    assert sorted({k for k, _ in curves["logsnr"]}) == [2, 4]


def test_trained_in_names_the_total_of_a_resumed_run():
    from types import SimpleNamespace
    assert cli._trained_in(6.54, SimpleNamespace(metrics={"train_seconds": 12.8})) == \
        "trained in 6.5s (12.8s of training in all, with the run this one resumed)"
    assert cli._trained_in(6.54, SimpleNamespace(metrics={"train_seconds": 6.0})) == "trained in 6.5s"
    assert cli._trained_in(6.54, SimpleNamespace(metrics=None)) == "trained in 6.5s"


def test_bare_ld3_names_the_command_and_version_prints(capsys):
    rc, _, err = run_cli([], capsys)
    assert rc == 2 and "the following arguments are required: COMMAND" in err
    import ld3_ext
    rc, out, _ = run_cli(["--version"], capsys)
    assert rc == 0 and out.strip() == f"ld3 (ld3_ext {ld3_ext.__version__})"


def test_export_of_a_schedule_learned_for_no_diffusers_model_says_so(tmp_path, capsys):
    """A schedule of the flow test bed (an x0 model) failed as "prediction_type='sample' does not fit a FlowMatching
    schedule", a prediction type the user never gave."""
    from ld3_ext import FlowMatching, discretizations
    from ld3_ext.schedule_file import LearnedSchedule
    from ld3_ext.solvers import UniPC
    s = FlowMatching()
    path = str(tmp_path / "schedule.json")
    LearnedSchedule(discretizations.logsnr_uniform(s, 4), solver_config=UniPC(order=2).config(), nfe=4,
                    schedule_config=s.config(), model={"spec": "gmm:ring2d@flow", "prediction": "x0"}).save(path)
    rc, _, err = run_cli(["export-diffusers", path, "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "was learned for a model that predicts 'x0' on a FlowMatching schedule" in err \
        and "this schedule is not for a diffusers model" in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model,teacher_nfe,warned", [("digits", "5", True), ("digits", "6", True),
                                                      ("digits", "7", False), ("gmm:ring2d", "5", False)])
def test_a_teacher_no_finer_than_the_student_is_warned_about(tmp_path, capsys, monkeypatch, model, teacher_nfe, warned):
    """--teacher-nfe 2 with --nfe 6 trained without a word (the student is fitted to a coarser solve); the analytic
    test beds' teacher is exact, so their --teacher-nfe is not used and not warned about."""
    monkeypatch.setattr(cli, "_train_locked", lambda *a, **k: 0)
    rc, _, err = run_cli(["train", "--model", model, "--nfe", "6", "--teacher-nfe", teacher_nfe, "--no-progress",
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    assert (f"warning: --teacher-nfe {teacher_nfe} is not above the student's --nfe 6" in err) == warned, err


@pytest.mark.parametrize("cmd,name", [("sample", "samples.png"), ("eval", "eval.json"), ("eval", "schedules.png"),
                                      ("eval", "eval_samples.png")])
def test_an_output_file_that_is_a_folder_is_refused_before_the_work(tmp_path, capsys, monkeypatch, cmd, name):
    """samples.png (or an eval output) being a folder failed the final rename after all the sampling, naming a
    temporary file."""
    out = tmp_path / "o"
    (out / name).mkdir(parents=True)
    monkeypatch.setattr(cli, "_teacher", lambda *a, **k: pytest.fail("the work started"))
    argv = [cmd, "--out", str(out), "--n", "4"] + (["--schedule", _schedule_file(tmp_path), "--model", "gmm:ring2d"]
                                                   if cmd == "eval" else ["--model", "gmm:ring2d"])
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and f"--out: {out / name} is a folder; {name} cannot be written there" in err, err


# ------------------------------------------------------------------------------------------------
# crash-safety audit
def test_a_schedule_kept_once_is_not_kept_again_by_each_interrupted_rerun(tmp_path):
    """Each run interrupted before its own write added one more identical schedule.stale-* copy."""
    from ld3_ext import cli
    p = tmp_path / "schedule.json"
    p.write_bytes(b'{"a": 1}')
    first = cli._keep_replaced_schedule(str(p))
    assert cli._keep_replaced_schedule(str(p)) == first  # the same bytes: that copy
    assert _stale(tmp_path) == [os.path.basename(first)]
    p.write_bytes(b'{"a": 2}')  # another schedule (same mtime second possible): a copy of its own
    os.utime(p, (os.path.getmtime(first), os.path.getmtime(first)))
    second = cli._keep_replaced_schedule(str(p))
    assert second != first and open(second, "rb").read() == b'{"a": 2}' and len(_stale(tmp_path)) == 2


def test_an_output_linked_into_an_unwritable_folder_is_refused_before_the_work(tmp_path, monkeypatch):
    """schedule.json a link into a read-only folder: the whole training ran, then failed naming a temp file."""
    from ld3_ext import atomic_io, cli
    ro, out = tmp_path / "ro", tmp_path / "out"
    ro.mkdir()
    out.mkdir()
    os.symlink(ro / "keep.json", out / "schedule.json")
    real = atomic_io.check_writable_dir

    def check(path):
        if os.path.realpath(path) == os.path.realpath(ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(path)
    monkeypatch.setattr(atomic_io, "check_writable_dir", check)
    with pytest.raises(cli.UsageError, match=r"schedule.json links to .*keep.json, whose folder cannot be written"):
        cli._check_out_dir(str(out), ("schedule.json",))
    cli._check_out_dir(str(out), ("eval.json",))  # a plain name there is fine
    os.unlink(out / "schedule.json")
    os.symlink(tmp_path / "elsewhere.json", out / "schedule.json")  # a writable target folder
    cli._check_out_dir(str(out), ("schedule.json",))


def test_eval_of_another_schedule_sets_aside_the_evaluation_it_would_replace(tmp_path, capsys):
    """`ld3 eval --schedule X --out DIR` replaced DIR's evaluation of DIR's own schedule without a word."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(TRAIN + ["--init", "logsnr", "--out", str(a)], capsys)[0] == 0
    assert run_cli(TRAIN + ["--init", "edm", "--out", str(b)], capsys)[0] == 0
    assert run_cli(EVAL + ["--out", str(a)], capsys)[0] == 0
    earlier = {name: (a / name).read_bytes() for name in EVAL_FILES}
    assert run_cli(EVAL + ["--out", str(a), "--seed", "3"], capsys)[0] == 0  # the same schedule again: rewritten
    assert _stale(a) == []
    earlier = {name: (a / name).read_bytes() for name in EVAL_FILES}
    rc, _, err = run_cli(EVAL + ["--out", str(a), "--schedule", str(b / "schedule.json")], capsys)
    assert rc == 0 and "evaluated another schedule" in err
    assert json.loads((a / "eval.json").read_text())["schedule_sha256"] == _sha256(b / "schedule.json")
    stale = _stale(a)
    assert len(stale) == 3
    kept = {name: next((a / f).read_bytes() for f in stale if f.startswith(name.split(".")[0] + ".stale-"))
            for name in EVAL_FILES}
    assert kept == earlier


def test_a_figure_that_cannot_be_written_leaves_no_earlier_figure_beside_the_new_numbers(tmp_path, capsys,
                                                                                            monkeypatch):
    """A full disk at the last figure left this run's eval.json beside the previous run's eval_samples.png."""
    from ld3_ext import atomic_io
    out = tmp_path / "o"
    assert run_cli(TRAIN + ["--init", "logsnr", "--out", str(out)], capsys)[0] == 0
    assert run_cli(EVAL + ["--out", str(out)], capsys)[0] == 0
    old_samples, old_record = (out / "eval_samples.png").read_bytes(), (out / "eval.json").read_bytes()
    real = atomic_io.atomic_write_bytes

    def full(path, data):
        if str(path).endswith("eval_samples.png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)
    monkeypatch.setattr(atomic_io, "atomic_write_bytes", full)
    rc, _, err = run_cli(EVAL + ["--out", str(out), "--seed", "5"], capsys)
    assert rc == 1 and "of an earlier evaluation" in err
    assert (out / "eval.json").read_bytes() != old_record and (out / "schedules.png").exists()
    assert not (out / "eval_samples.png").exists()
    (kept,) = [f for f in _stale(out) if f.startswith("eval_samples.stale-")]
    assert (out / kept).read_bytes() == old_samples


def test_a_ctrl_c_after_a_figure_was_renamed_into_place_keeps_that_figure(tmp_path, capsys, monkeypatch):
    """Interrupted in the folder's fsync after its rename, this run's own figure was set aside as an earlier one."""
    from ld3_ext import atomic_io
    out = tmp_path / "o"
    assert run_cli(TRAIN + ["--init", "logsnr", "--out", str(out)], capsys)[0] == 0
    assert run_cli(EVAL + ["--out", str(out)], capsys)[0] == 0
    old_samples = (out / "eval_samples.png").read_bytes()
    real, calls = atomic_io.fsync_dir, []

    def interrupted(directory):
        calls.append(directory)
        if len(calls) == 3:  # eval.json, schedules.png, then eval_samples.png: after its rename
            raise KeyboardInterrupt
        return real(directory)
    monkeypatch.setattr(atomic_io, "fsync_dir", interrupted)
    assert run_cli(EVAL + ["--out", str(out), "--seed", "5"], capsys)[0] == 130
    new_samples = (out / "eval_samples.png").read_bytes()
    assert new_samples != old_samples  # this run's, in place
    assert not any(f.startswith("eval_samples.stale-") for f in _stale(out))



@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="no /dev/fd")
def test_eval_of_a_pipe_says_so_naming_the_flag(tmp_path, capsys):
    """`ld3 eval --schedule <(cat schedule.json)`: the sha256 read drained the pipe and the schedule read then said
    "schedule file /dev/fd/63 is empty (truncated write?)", a damaged file where there was none."""
    data = open(_schedule_file(tmp_path), "rb").read()
    r, w = os.pipe()  # what the shell passes for <(cat schedule.json): a pipe whose writer has finished
    try:
        os.write(w, data)  # a few KB: within the pipe's buffer
        os.close(w)
        pipe = f"/dev/fd/{r}"
        rc, _, err = run_cli(["eval", "--model", "gmm:ring2d", "--schedule", pipe, "--n", "4", "--nfe-curve",
                              "--skip-model-baselines", "--out", str(tmp_path / "o")], capsys)
    finally:
        os.close(r)
    assert rc == 2 and f"--schedule: {pipe} is not a regular file" in err, err
    assert "truncated" not in err


def test_eval_of_a_file_far_too_large_refuses_it_before_reading_it(tmp_path, capsys, monkeypatch):
    """load_schedule refuses a file over 64 MiB before reading it, but `ld3 eval` first read the whole file for its
    sha256 (a wrong 1 GiB file: over 1 GiB of memory before the refusal)."""
    import ld3_ext.schedule_file as sf
    path = _schedule_file(tmp_path)
    monkeypatch.setattr(sf, "MAX_SCHEDULE_BYTES", os.path.getsize(path) - 1)
    monkeypatch.setattr(cli, "_file_sha256", lambda p: pytest.fail("the file was read"))
    rc, _, err = run_cli(["eval", "--model", "gmm:ring2d", "--schedule", path, "--n", "4", "--nfe-curve",
                          "--skip-model-baselines", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "a schedule file is a few KiB" in err, err
