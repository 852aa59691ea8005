"""`ld3`'s exit statuses, the same for every subcommand (documented in `ld3 --help`): 2 for a bad flag or an
unusable input file / --out path (argparse's code, with an ``ld3 CMD: error: ...`` line), 1 for a run that failed,
130 for Ctrl-C -- each with one line on stderr and no traceback."""
import errno
import os
import subprocess
import sys

import pytest

from ld3_ext import cli
from ld3_ext.training import NonFiniteLossError
from ld3_ext.wrappers import ModelOutputError

from _cli_run import one_line_errors  # noqa: F401 - an autouse fixture

COMMANDS = ["sample", "teacher", "train", "eval", "export-diffusers"]
# the command function each subcommand dispatches to (set_defaults(func=...) reads the module attribute)
FUNCS = {"sample": "cmd_sample", "teacher": "cmd_teacher", "train": "cmd_train", "eval": "cmd_eval",
         "export-diffusers": "cmd_export_diffusers"}


def _argv(cmd, out, extra=()):
    if cmd == "export-diffusers":
        return [cmd, "schedule.json", "--out", str(out), *extra]
    return [cmd, "--model", "gmm:ring2d", "--out", str(out), *extra]


def _exit_status(argv):
    """main()'s status as the `ld3` script exits with it (sys.exit(main()))."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


BAD_FLAGS = {
    "sample": (["--nfe", "0"], "--nfe must be >= 1"),
    "teacher": (["--n-train", "0"], "--n-train must be >= 1"),
    "train": (["--solver", "euler", "--order", "2"], "--order: euler has no order setting"),
    "eval": (["--nfe-curve", "0"], "--nfe-curve values must be in 1..1000"),
    "export-diffusers": ([], "schedule file not found: schedule.json"),
}


@pytest.mark.parametrize("cmd", COMMANDS)
def test_a_bad_flag_is_a_usage_error(cmd, tmp_path, capsys):
    extra, message = BAD_FLAGS[cmd]
    assert _exit_status(_argv(cmd, tmp_path / "o", extra)) == 2
    err = capsys.readouterr().err
    assert err == f"ld3 {cmd}: error: {message}" + err[len(f"ld3 {cmd}: error: {message}"):]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_an_argparse_error_is_a_usage_error(cmd, tmp_path, capsys):
    assert _exit_status(_argv(cmd, tmp_path / "o", ["--no-such-flag"])) == 2
    assert "error: unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["sample", "eval", "export-diffusers"])
def test_a_garbled_schedule_file_is_a_usage_error(cmd, tmp_path, capsys):
    bad = tmp_path / "s.json"
    bad.write_text('{"format": "ld3_ext.schedule", "version": 1, "timest')  # truncated
    argv = ([cmd, str(bad), "--out", str(tmp_path / "o")] if cmd == "export-diffusers"
            else _argv(cmd, tmp_path / "o", ["--schedule", str(bad)]))
    assert _exit_status(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ld3 {cmd}: error: ") and str(bad) in err and "not valid JSON" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("cmd", ["sample", "teacher", "train", "eval"])
def test_an_out_path_under_a_file_is_a_usage_error(cmd, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    monkeypatch.setattr(cli, "_teacher", lambda *a: pytest.fail("the teacher ran"))
    argv = _argv(cmd, a_file / "sub", ["--no-progress"])
    if cmd == "eval":
        from ld3_ext.schedule_file import LearnedSchedule
        from ld3_ext.schedules import EDM
        from ld3_ext.solvers import DPMSolverPP
        from ld3_ext.discretizations import get_discretization
        sched = EDM()
        path = LearnedSchedule(get_discretization("logsnr", sched, 4), solver_config=DPMSolverPP(2).config(), nfe=4,
                               schedule_config=sched.config()).save(str(tmp_path / "s.json"))
        argv += ["--schedule", path]
    assert _exit_status(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ld3 {cmd}: error: ") and "Traceback" not in err
    assert a_file.read_text() == "mine"


FAILURES = [NonFiniteLossError("the loss is NaN", 3, None, None), ModelOutputError("the model returned NaN"),
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10**12 bytes"),
            OSError(errno.ENOSPC, "No space left on device")]


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("failure", FAILURES, ids=lambda e: type(e).__name__ + (str(e.errno) if isinstance(e, OSError)
                                                                                 else ""))
def test_a_run_that_fails_exits_1(cmd, failure, tmp_path, capsys, monkeypatch):
    def fails(args):
        raise failure
    monkeypatch.setattr(cli, FUNCS[cmd], fails)
    assert _exit_status(_argv(cmd, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ld3 {cmd}: error: ") and "Traceback" not in err


@pytest.mark.parametrize("cmd", COMMANDS)
def test_ctrl_c_exits_130_with_one_line(cmd, tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, FUNCS[cmd], interrupted)
    assert _exit_status(_argv(cmd, tmp_path / "o")) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"ld3 {cmd}: interrupted") and len(err.strip().splitlines()) == 1


def test_the_exit_statuses_are_in_the_help(capsys):
    for argv in (["--help"], ["train", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert "exit status:" in out and "130  interrupted" in out and "2    usage error" in out


def test_the_script_exits_with_these_statuses(tmp_path):
    """The process's own status, as a shell sees it (a SystemExit with a message would exit 1)."""
    # the package this test imported (installed, with its _C, under CI), not necessarily the source tree
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
    env = dict(os.environ, PYTHONPATH=pkg_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LD3_TRACEBACK", None)
    r = subprocess.run([sys.executable, "-m", "ld3_ext.cli", "sample", "--nfe", "0", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # -m puts the cwd first on sys.path
    assert r.returncode == 2 and r.stderr.strip() == "ld3 sample: error: --nfe must be >= 1, got 0"



# --- a failure inside the user's network ---------------------------------------------------------------------------
_FACTORY = '''
import torch, ld3_ext

def _make(net):
    sched = ld3_ext.EDM()
    m = ld3_ext.wrap_model(net, sched, prediction="x0")
    m.sample_shape = (2,)
    return m, sched

def valerr():
    def net(x, t, **k):
        raise ValueError("bad conditioning tensor")
    return _make(net)

def rterr():
    def net(x, t, **k):
        return torch.nn.functional.linear(x, torch.ones(5, 3))  # a shape mismatch inside torch
    return _make(net)
'''


@pytest.mark.parametrize("cmd", ["sample", "train"])
@pytest.mark.parametrize("factory, kind", [("valerr", "ValueError: bad conditioning tensor"),
                                           ("rterr", "RuntimeError: mat1 and mat2 shapes cannot be multiplied")])
def test_an_error_inside_the_network_is_a_failed_run(cmd, factory, kind, tmp_path, monkeypatch, capsys):
    """A ValueError there was exit 2 ("a bad flag"), a RuntimeError a 38-line traceback: both are the run failing."""
    (tmp_path / "userfac.py").write_text(_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = ["--n", "2"] if cmd == "sample" else ["--n-train", "2", "--n-valid", "2", "--nfe", "3", "--rounds-v1", "1",
                                                  "--rounds-v2", "0"]
    assert _exit_status([cmd, "--model", f"userfac:{factory}", "--out", str(tmp_path / "o"), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ld3 {cmd}: error: the model raised {kind}"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # the line and the LD3_TRACEBACK hint


def test_our_own_checks_inside_the_model_call_are_not_the_networks():
    """DiffusionModel._call's own ValueError (uncond without guidance) stays the library's: not a network failure."""
    import ld3_ext
    import torch
    model = ld3_ext.wrap_model(lambda x, t, **k: x, ld3_ext.EDM(), prediction="x0")
    with pytest.raises(ValueError) as info:
        model.predict(torch.zeros(1, 2), torch.tensor(1.0), uncond=torch.zeros(1))
    assert not cli._model_failure(info.value)

    def net(x, t):
        raise ValueError("mine")
    with pytest.raises(ValueError) as info:
        ld3_ext.wrap_model(net, ld3_ext.EDM(), prediction="x0").predict(torch.zeros(1, 2), torch.tensor(1.0))
    assert cli._model_failure(info.value)

    # the library's own network (its frames and torch's nn.Module plumbing only): its failure keeps the traceback
    from ld3_ext.models.registry import load_model
    digits, _ = load_model("digits")
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 8, 8\] or \[B, 64\] \(one digit per row\), "
                                         r"got shape \(1, 3, 5, 5\)") as info:
        digits.predict(torch.zeros(1, 3, 5, 5), torch.tensor(1.0))
    assert not cli._model_failure(info.value)

    class UserNet(torch.nn.Module):  # a user's module: its forward's frame is the user's
        def forward(self, x, t):
            return torch.nn.functional.linear(x, torch.ones(5, 3))
    for net in (UserNet(), torch.jit.script(UserNet()), torch.compile(UserNet(), backend="eager")):
        # scripted or compiled, only torch's frames follow the call: still the user's network
        # torch's shape error (plain, through TorchScript, or dynamo's TorchRuntimeError, a RuntimeError too)
        with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(1x2 and 3x5\)"
                                               r"|same reduction dim") as info:
            ld3_ext.wrap_model(net, ld3_ext.EDM(), prediction="x0").predict(torch.zeros(1, 2), torch.tensor(1.0))
        assert cli._model_failure(info.value), type(net)


def test_sigterm_with_tracebacks_on_still_exits_143(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LD3_TRACEBACK", "1")

    def terminated(args):
        raise cli.Terminated()
    monkeypatch.setattr(cli, "cmd_sample", terminated)
    assert _exit_status(["sample", "--model", "gmm:ring2d", "--out", str(tmp_path / "o")]) == 143
    err = capsys.readouterr().err
    assert "Traceback" in err and "ld3 sample: terminated (SIGTERM)" in err


@pytest.mark.parametrize("argv", [["sample", "--model", ""], ["eval", "--model", " "], ["eval", "--schedule", ""],
                                  ["sample", "--model="], ["train", "--model", ""],
                                  ["export-diffusers", "schedule.json", "--scheduler-config", ""]])
def test_an_empty_flag_value_is_a_usage_error(argv, tmp_path, capsys):
    """`--model "$UNSET"` sampled the default model (exit 0); an empty --schedule fell back to OUT/schedule.json."""
    flag = next(a for a in argv if a.startswith("--")).split("=")[0]
    assert _exit_status([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} was given an empty value" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_guidance_scale_names_the_flag(value, tmp_path, capsys):
    assert _exit_status(["sample", "--model", "gmm:ring2d", f"--guidance-scale={value}", "--out",
                         str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"ld3 sample: error: --guidance-scale must be a finite number, got {float(value)}"


def test_eval_without_a_schedule_names_out_when_only_out_was_given(tmp_path, capsys):
    """It said "--schedule: no schedule file at OUT/schedule.json" to a user who gave only --out."""
    out = tmp_path / "o"
    assert _exit_status(["eval", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ld3 eval: error: --out: no schedule file at {out / 'schedule.json'}"), err
    assert _exit_status(["eval", "--schedule", str(tmp_path / "s.json"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("ld3 eval: error: --schedule: no schedule file at")


@pytest.mark.parametrize("cmd", ["sample", "eval", "export-diffusers", "info"])
def test_commands_other_than_teacher_and_train_run_on_rank_0_only(cmd, tmp_path, capsys, monkeypatch):
    """Under torchrun every rank ran the whole command and wrote the same files (distributed audit): ranks other
    than 0 now say so and stop; rank 0 (or a rank-0-only call from a user's distributed script) runs it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    argv = [cmd] if cmd == "info" else _argv(cmd, tmp_path / "o", [])
    assert _exit_status(argv) == 0
    assert f"ld3 {cmd}: rank 1: only teacher and train use several ranks; rank 0 runs this command" in \
        capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    monkeypatch.setenv("RANK", "0")
    if cmd == "info":
        assert _exit_status(argv) == 0 and "rank 0 runs" not in capsys.readouterr().err


@pytest.mark.parametrize("world", [None, "1", "x"])
def test_a_rank_without_a_distributed_launch_runs_the_command(world, capsys, monkeypatch):
    """RANK set by a job system without WORLD_SIZE > 1 is no torchrun launch: the command ran nothing and exited 0
    (diff review); it runs."""
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "3")
    assert _exit_status(["info"]) == 0
    captured = capsys.readouterr()
    assert "rank 0 runs" not in captured.err and captured.out.strip()


def test_a_sigint_the_parent_ignores_stays_ignored_during_the_imports():
    """A background job of a script starts with SIGINT ignored (POSIX); the import-time deferral put a handler in
    its place, so a Ctrl-C to the process group during the imports stopped the job (130) and one later did not
    (crash-safety audit)."""
    code = r"""
import os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.argv[0] = "ld3"   # the deferral is the console script's only
import torch          # the slow part first: the signals below land in ld3_ext's own imports
stop = False
def pester():
    while not stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.001)
th = threading.Thread(target=pester, daemon=True)
th.start()
import ld3_ext
stop = True
th.join()
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
print("still running")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LD3_TRACEBACK": ""})
    assert proc.returncode == 0 and "still running" in proc.stdout, proc.stdout + proc.stderr
