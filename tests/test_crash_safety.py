"""Crash safety: `ld3 train` killed with SIGKILL at (seeded) random points and restarted with the same
command resumes from its last checkpoint and ends on exactly the schedule of an uninterrupted run;
truncated or tampered checkpoints / teacher chunks are detected by their checksums with a clear
message; nothing in the package unpickles files."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from ld3_ext import wrap_model
from ld3_ext.atomic_io import CorruptFileError, load_safetensors_checked
from ld3_ext.schedule_file import load_schedule
from ld3_ext.solvers import DPMSolverPP
from ld3_ext.training import CheckpointMismatchError, LD3Trainer

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ["--model", "gmm:ring2d", "--nfe", "4", "--order", "2", "--n-train", "8", "--n-valid", "4",
              "--rounds-v1", "1", "--rounds-v2", "3", "--teacher-nfe", "6", "--seed", "5", "--threads", "1",
              "--no-progress"]


def _cmd(out):
    return [sys.executable, "-m", "ld3_ext.cli", "train", *TRAIN_ARGS, "--out", str(out)]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run(out, timeout=240):
    r = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _run_and_kill(out, trigger, delay, timeout=240):
    """Start training, wait until ``trigger()`` holds, sleep ``delay`` s, SIGKILL. True if it was killed."""
    p = subprocess.Popen(_cmd(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while p.poll() is None and not trigger():
            if time.monotonic() - t0 > timeout:
                raise AssertionError("training never reached the kill point")
            time.sleep(0.02)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=timeout)
        if p.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(p.stderr.read().decode()[-3000:])
        return p.returncode == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()


def _ckpt(out):
    return os.path.join(str(out), "checkpoint", "ld3_trainer_state.safetensors")


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def test_sigkill_and_restart_reaches_the_uninterrupted_schedule(tmp_path):
    _run(tmp_path / "full")
    full = load_schedule(str(tmp_path / "full" / "schedule.json"))

    rng = random.Random(1234)  # seeded kill points
    out = tmp_path / "killed"
    kills = 0
    # 1) somewhere during teacher generation / the first round
    kills += _run_and_kill(out, lambda: os.path.exists(out / "teacher"), rng.uniform(0.0, 1.0))
    # 2) shortly after a checkpoint was (re)written, i.e. mid-training with a checkpoint on disk
    before = _mtime(_ckpt(out))
    kills += _run_and_kill(out, lambda: _mtime(_ckpt(out)) not in (None, before), rng.uniform(0.0, 0.3))
    assert kills >= 1, "no run was actually killed: make the training run longer"
    # stray temp files of an interrupted atomic write are harmless; the restart finishes the job
    _run(out)
    resumed = load_schedule(str(out / "schedule.json"))
    assert resumed.timesteps.tolist() == full.timesteps.tolist()
    assert torch.equal(resumed.timesteps, full.timesteps)
    assert torch.equal(resumed.model_timesteps, full.model_timesteps)


# ---------------------------------------------------------------------------------------------
# truncated / tampered files (in-process: fast)
# ---------------------------------------------------------------------------------------------
def _trainer(ring, ckdir, **kw):
    mix, s, model = ring
    args = dict(teacher="exact", reference=mix, sample_shape=mix.event_shape, model_name=mix.name, n_train=6,
                n_valid=4, rounds_v1=1, rounds_v2=1, batch_size=2, progress=False, checkpoint_dir=str(ckdir))
    args.update(kw)
    return LD3Trainer(model, None, DPMSolverPP(2, backend="reference"), 4, **args)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_checkpoint_is_detected(ring, tmp_path, damage):
    _trainer(ring, tmp_path).fit()
    p = tmp_path / "ld3_trainer_state.safetensors"
    raw = bytearray(p.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[-3] ^= 0xFF  # a tensor byte: the header still parses, the checksum does not match
    else:
        raw = bytearray()
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="training checkpoint.*(truncated|checksum)"):
        load_safetensors_checked(str(p), what="training checkpoint")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)ld3_trainer_state.*(truncated|checksum).*resume='never'"):
        _trainer(ring, tmp_path).fit()
    _trainer(ring, tmp_path, resume="never").fit()  # the documented way out works


def test_damaged_teacher_chunk_is_detected_and_regenerated(ring, tmp_path):
    first = _trainer(ring, tmp_path, teacher_cache=str(tmp_path / "teacher"), resume="never").fit()
    chunks = sorted((tmp_path / "teacher").glob("chunk_*.safetensors"))
    assert chunks
    raw = bytearray(chunks[0].read_bytes())
    raw[-1] ^= 0x55  # tamper (same length)
    chunks[0].write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_safetensors_checked(str(chunks[0]), what="teacher chunk")
    chunks[0].write_bytes(bytes(raw[:-7]))  # truncate
    with pytest.raises(CorruptFileError, match="truncated"):
        load_safetensors_checked(str(chunks[0]), what="teacher chunk")
    with pytest.warns(UserWarning, match=r"chunk_\d+.*(truncated|checksum)|(truncated|checksum).*chunk"):
        again = _trainer(ring, tmp_path, teacher_cache=str(tmp_path / "teacher"), resume="never").fit()
    assert torch.equal(again.timesteps, first.timesteps)  # regenerated pairs are bitwise the same


def test_no_pickle_on_user_files():
    """`grep -rn "torch.load\\|pickle" ld3_ext`: at most torch.load(weights_only=True)."""
    pkg = os.path.join(ROOT, "ld3_ext")
    bad = []
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            with open(path, encoding="utf-8") as fh:
                for no, line in enumerate(fh, 1):
                    code = line.split("#", 1)[0]
                    if re.search(r"\bimport pickle\b|\bpickle\.|\bcloudpickle\b|\bdill\b", code):
                        bad.append(f"{path}:{no}: {line.strip()}")
                    if "torch.load(" in code and "weights_only=True" not in code:
                        bad.append(f"{path}:{no}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_sigterm_stops_cleanly_with_the_resume_hint_and_the_rerun_resumes(tmp_path):
    """SIGTERM (a job scheduler's stop) is handled like Ctrl-C: exit status 128 + 15, one line with the resume
    hint, no temp file left behind; the same command then resumes to the uninterrupted run's schedule."""
    _run(tmp_path / "full")
    full = load_schedule(str(tmp_path / "full" / "schedule.json"))
    out = tmp_path / "term"
    p = subprocess.Popen(_cmd(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while p.poll() is None and _mtime(_ckpt(out)) is None:  # mid-training, a checkpoint on disk
            assert time.monotonic() - t0 < 240, "training never wrote its first checkpoint"
            time.sleep(0.01)
        assert p.poll() is None, "training ended before the signal: make the run longer"
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=240)[1].decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == ("ld3 train: terminated (SIGTERM) (rerun the same command to resume from "
                                            "the last checkpoint)"), err[-3000:]
    # the lock files stay by design (removing one would race another process's flock)
    leftovers = [f for _, _, files in os.walk(out) for f in files
                 if (".tmp" in f or f.startswith(".")) and f not in (".ld3_teacher.lock", ".ld3_train.lock")]
    assert leftovers == []
    _run(out)
    resumed = load_schedule(str(out / "schedule.json"))
    assert torch.equal(resumed.timesteps, full.timesteps)
    assert torch.equal(resumed.model_timesteps, full.model_timesteps)


def test_sigterm_handler_is_only_installed_for_the_command_and_restored(tmp_path, monkeypatch, capsys):
    from ld3_ext import cli

    def stopped(args):  # the signal arrives while the command works
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # never reached: the handler raises in this frame
        raise AssertionError("SIGTERM was not handled")
    monkeypatch.setattr(cli, "_train", stopped)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a fresh process
    try:
        rc = cli.main(["train", "--model", "gmm:ring2d", "--out", str(tmp_path / "o")])
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
    finally:
        signal.signal(signal.SIGTERM, before)
    assert rc == 143
    assert capsys.readouterr().err.strip() == ("ld3 train: terminated (SIGTERM) (rerun the same command to resume "
                                               "from the last checkpoint)")


def test_ctrl_c_anywhere_leaves_whole_files_and_the_rerun_resumes(ring, tmp_path, monkeypatch):
    """KeyboardInterrupt raised inside the model (teacher generation, init="auto", the lambda and time trials, the
    last round) or inside a file replace (a checkpoint / teacher chunk / schedule write): every file left is whole
    (its checksum holds, no temp file) and the rerun of the same fit() ends on the uninterrupted schedule."""
    mix, s, base = ring
    calls = {"model": 0, "replace": 0, "stop": None}

    def counted(x, t):
        calls["model"] += 1
        if calls["stop"] == ("model", calls["model"]):
            raise KeyboardInterrupt
        return base.fn(x, t)

    real_replace = os.replace

    def replace(a, b):
        calls["replace"] += 1
        if calls["stop"] == ("replace", calls["replace"]):
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    model = wrap_model(counted, s, prediction="x0", time_input="t", name="gmm:ring2d-counted")
    model.testbed = mix

    def fit(ckdir):  # the defaults init="auto", time_mode="auto"; the model is the teacher too
        return _trainer((mix, s, model), ckdir, teacher="solver", teacher_nfe=6, init="auto", n_train=8,
                        rounds_v2=2, checkpoint_every=3, model_name="ring-counted").fit()

    full = fit(tmp_path / "full")
    n_model, n_replace = calls["model"], calls["replace"]
    stops = [("model", k) for k in (3, 15, n_model // 3, 2 * n_model // 3, n_model - 1)]
    stops += [("replace", k) for k in (2, n_replace // 2, n_replace)]
    for i, stop in enumerate(stops):
        ckdir = tmp_path / f"stop{i}"
        calls.update(model=0, replace=0, stop=stop)
        with pytest.raises(KeyboardInterrupt):
            fit(ckdir)
        calls["stop"] = None
        for dirpath, _, files in os.walk(ckdir):
            for f in files:
                path = os.path.join(dirpath, f)
                assert not f.endswith(".tmp"), path
                if f.endswith(".safetensors"):
                    load_safetensors_checked(path)
                elif f == "schedule.json":
                    load_schedule(path)
        again = fit(ckdir)
        assert torch.equal(again.timesteps, full.timesteps), stop
        assert torch.equal(again.model_timesteps, full.model_timesteps), stop
        assert again.metrics["valid_loss_best"] == full.metrics["valid_loss_best"], stop
