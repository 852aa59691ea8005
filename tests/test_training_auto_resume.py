"""time_mode="auto" (the default) meeting explicit-mode checkpoints, and the files a failed auto trial leaves."""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from ld3_ext.atomic_io import atomic_save_safetensors, load_safetensors_checked
from ld3_ext.schedule_file import load_schedule
from ld3_ext.solvers import DPMSolverPP
from ld3_ext.training import CheckpointMismatchError, LD3Trainer, NonFiniteLossError
from ld3_ext.training.trainer import CHECKPOINT_FILE, LAST_GOOD_FILE, SCHEDULE_FILE, TRIAL_LAST_GOOD_FILE


def _fast(model, mix, **kw):
    # as tests/test_training.py: 8 + 4 pairs, 3 rounds of 4 iterations, a fixed init grid (init="auto" runs DMN)
    args = dict(teacher="exact", reference=mix, sample_shape=mix.event_shape, model_name=mix.name, n_train=8,
                n_valid=4, rounds_v1=1, rounds_v2=2, batch_size=2, progress=False, init="logsnr")
    args.update(kw)
    return LD3Trainer(model, None, DPMSolverPP(2, backend="reference"), 4, **args)


class _Stop(Exception):
    pass


def _stop_at(it):
    def boom(tr, info):
        if info["iteration"] == it:
            raise _Stop()
    return boom


# ----------------------------------------------------------------------------------------------
# an explicit-mode checkpoint resumed with time_mode="auto"
# ----------------------------------------------------------------------------------------------
# with this solver/NFE, auto's own trials pick "time" (tests/test_training.py): "lambda" shows that the checkpoint's
# mode is taken, not the one the trials would choose
@pytest.mark.parametrize("mode", ["lambda", "time"])
def test_auto_resumes_an_explicit_checkpoint_in_its_mode(ring, tmp_path, mode):
    mix, s, model = ring
    full = _fast(model, mix, time_mode=mode, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=3).fit()
    d = str(tmp_path / "b")
    with pytest.raises(_Stop):  # an explicit run (e.g. from before "auto" was the default), interrupted mid round 2
        _fast(model, mix, time_mode=mode, checkpoint_dir=d, checkpoint_every=3, callback=_stop_at(6)).fit()
    tr = _fast(model, mix, checkpoint_dir=d, checkpoint_every=3)  # the same command after the upgrade
    assert tr.time_mode_request == "auto"
    seen = []
    tr.callback = lambda t, info: seen.append((t.time_mode, info["iteration"]))
    with pytest.warns(UserWarning, match=f"time_mode={mode!r} run; resuming it in {mode!r}"):
        res = tr.fit()
    # no trials: only the checkpoint's run goes on, from where it stopped
    assert seen == [(mode, i) for i in range(7, 13)]
    assert torch.equal(res.timesteps, full.timesteps)
    assert torch.equal(res.model_timesteps, full.model_timesteps)
    assert res.metrics["valid_loss_best"] == full.metrics["valid_loss_best"]
    assert res.metrics["iterations"] == full.metrics["iterations"] == 12
    assert res.time_mode == mode
    # recorded as taken from the checkpoint; the explicit run's settings are kept as they were
    assert res.metrics["time_mode_choice"] == mode and res.metrics["time_mode_source"] == "checkpoint"
    assert res.training["time_mode"] == mode and res.training["time_mode_chosen"] == mode
    assert res.training["time_mode_requested"] == "auto" and res.training["time_mode_source"] == "checkpoint"
    assert "time_mode_candidates_valid_loss" not in res.metrics and "time_mode_trial_rounds" not in res.training
    assert {k: v for k, v in res.training.items() if not k.startswith("time_mode_")} == full.training
    on_disk = load_schedule(os.path.join(d, SCHEDULE_FILE))
    assert on_disk.timesteps.tolist() == full.timesteps.tolist()
    assert on_disk.metrics["time_mode_source"] == "checkpoint" and on_disk.training["time_mode_chosen"] == mode
    # the checkpoint stays the explicit run's (layout and settings): both auto and the explicit mode resume it
    tensors, meta = load_safetensors_checked(os.path.join(d, CHECKPOINT_FILE))
    assert "auto" not in meta and meta["settings"]["time_mode"] == mode and not any("/" in k for k in tensors)
    again = _fast(model, mix, time_mode=mode, checkpoint_dir=d).fit()
    assert torch.equal(again.timesteps, full.timesteps) and "time_mode_source" not in again.metrics
    with pytest.warns(UserWarning, match="taken from the checkpoint"):
        again = _fast(model, mix, checkpoint_dir=d).fit()
    assert torch.equal(again.timesteps, full.timesteps) and again.metrics["time_mode_source"] == "checkpoint"


def test_time_mode_mismatches_are_still_refused(ring, tmp_path):
    mix, s, model = ring
    lam = str(tmp_path / "lambda")
    _fast(model, mix, time_mode="lambda", checkpoint_dir=lam, rounds_v2=0).fit()
    # the other explicit mode: refused, naming both modes
    with pytest.raises(CheckpointMismatchError, match=r"differs in: time_mode\).*time_mode='lambda'.*"
                                                      r"time_mode='time'"):
        _fast(model, mix, time_mode="time", checkpoint_dir=lam, rounds_v2=0).fit()
    # auto, but another setting differs too: refused, naming that setting (time_mode alone would be taken over)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "taken from the checkpoint" warning before the refusal
        with pytest.raises(CheckpointMismatchError, match=r"differs in: lr_xi\)") as ei:
            _fast(model, mix, checkpoint_dir=lam, rounds_v2=0, lr_xi=0.01).fit()
    assert "time_mode" not in str(ei.value).split("was written", 1)[1]  # (the tmp path names the test)
    # an explicit mode meeting an auto checkpoint: refused (its trials are not an explicit run), saying how to resume it
    auto = str(tmp_path / "auto")
    _fast(model, mix, checkpoint_dir=auto, rounds_v2=0).fit()
    for mode in ("lambda", "time"):
        with pytest.raises(CheckpointMismatchError, match=r"time_mode='auto', this run asks for "
                                                          rf"time_mode='{mode}' \(pass time_mode='auto' to resume it\)"):
            _fast(model, mix, time_mode=mode, checkpoint_dir=auto, rounds_v2=0).fit()
    # ... but not when another setting differs too: time_mode='auto' alone would be refused again
    with pytest.raises(CheckpointMismatchError, match=r"differs in: lr_xi, time_mode") as ei:
        _fast(model, mix, time_mode="time", checkpoint_dir=auto, rounds_v2=0, lr_xi=0.01).fit()
    assert "pass time_mode='auto'" not in str(ei.value)


# ----------------------------------------------------------------------------------------------
# a failed auto trial's last good schedule
# ----------------------------------------------------------------------------------------------
def _nan_in(holder, modes):
    def loss(pred, target):
        out = (pred - target).pow(2).flatten(1).mean(1)
        tr = holder["tr"]
        st = getattr(tr, "st", None)
        return out * float("nan") if st is not None and tr.time_mode in modes and st["iteration"] >= 2 else out
    return loss


def test_failed_auto_trial_leaves_no_last_good_file(ring, tmp_path):
    mix, s, model = ring
    d = tmp_path / "run"
    d.mkdir()
    mine = b'{"written": "by the user, or by an earlier run"}'
    (d / LAST_GOOD_FILE).write_bytes(mine)
    trial_file = d / TRIAL_LAST_GOOD_FILE.format(mode="lambda")
    holder, during = {}, []

    def watch(tr, info):
        if tr.time_mode == "time":
            during.append((trial_file.exists(), (d / LAST_GOOD_FILE).read_bytes() == mine))

    tr = holder["tr"] = _fast(model, mix, loss=_nan_in(holder, {"lambda"}), checkpoint_dir=str(d), callback=watch)
    with pytest.warns(UserWarning, match="'lambda' trial failed"):
        res = tr.fit()
    assert res.metrics["time_mode_choice"] == "time"
    assert res.metrics["time_mode_candidates_valid_loss"]["lambda"] is None
    # the trial (2 rounds x 4 iterations) with the failed trial's file kept apart, then the winner's last round
    # with it removed; the user's file untouched throughout
    assert during == [(True, True)] * 8 + [(False, True)] * 4
    # once "time" won: the trial's file is gone, the run's own files are there, the user's file is untouched
    assert sorted(os.listdir(d)) == sorted([LAST_GOOD_FILE, SCHEDULE_FILE, CHECKPOINT_FILE, "teacher"])
    assert (d / LAST_GOOD_FILE).read_bytes() == mine
    assert load_schedule(str(d / SCHEDULE_FILE)).timesteps.tolist() == res.timesteps.tolist()
    assert res.metrics["time_mode_source"] == "validation"


def test_failed_auto_trial_file_survives_an_interruption_then_goes(ring, tmp_path):
    mix, s, model = ring
    d = tmp_path / "run"
    holder = {}
    trial_file = d / TRIAL_LAST_GOOD_FILE.format(mode="lambda")

    def stop_in_time_trial(tr, info):
        if tr.time_mode == "time" and info["iteration"] == 5:
            raise _Stop()

    tr = holder["tr"] = _fast(model, mix, loss=_nan_in(holder, {"lambda"}), checkpoint_dir=str(d),
                              checkpoint_every=3, callback=stop_in_time_trial)
    with pytest.warns(UserWarning, match="'lambda' trial failed"), pytest.raises(_Stop):
        tr.fit()
    assert trial_file.exists() and not (d / LAST_GOOD_FILE).exists()
    _, meta = load_safetensors_checked(str(d / CHECKPOINT_FILE))
    assert meta["auto"]["scores"] == {"lambda": None} and meta["auto"]["active"] == "time"
    tr = holder["tr"] = _fast(model, mix, loss=_nan_in(holder, {"lambda"}), checkpoint_dir=str(d), checkpoint_every=3)
    res = tr.fit()  # the time trial goes on from its checkpoint, wins, and the stale trial file is removed
    assert res.metrics["time_mode_choice"] == "time"
    assert not trial_file.exists() and not (d / LAST_GOOD_FILE).exists()
    # bitwise the explicit "time" run (the lambda failure does not touch it)
    ref = holder["tr"] = _fast(model, mix, loss=_nan_in(holder, {"lambda"}), time_mode="time")
    assert torch.equal(ref.fit().timesteps, res.timesteps)


def test_every_auto_trial_failing_saves_the_first_as_the_runs_last_good(ring, tmp_path):
    mix, s, model = ring
    holder = {}
    tr = holder["tr"] = _fast(model, mix, loss=_nan_in(holder, {"lambda", "time"}), checkpoint_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="'lambda' trial failed"), pytest.raises(NonFiniteLossError, match="iteration 3") as ei:
        tr.fit()
    err = ei.value
    assert err.saved_to == str(tmp_path / LAST_GOOD_FILE) and err.saved_to in str(err)
    assert not any(f.endswith("-trial.json") for f in os.listdir(tmp_path))
    on_disk = load_schedule(err.saved_to)
    assert on_disk.time_mode == "lambda" and torch.equal(on_disk.timesteps, err.schedule.timesteps)
    assert math.isfinite(on_disk.metrics["valid_loss_best"])


# ----------------------------------------------------------------------------------------------
# a mismatching checkpoint is refused before init="auto" evaluates its candidate grids
# ----------------------------------------------------------------------------------------------
def test_mismatch_is_refused_before_the_auto_init(ring, tmp_path, monkeypatch):
    mix, s, model = ring
    ck = str(tmp_path / "ck")
    _fast(model, mix, checkpoint_dir=ck, rounds_v2=0, init="auto").fit()
    calls = []
    real = LD3Trainer._auto_init
    monkeypatch.setattr(LD3Trainer, "_auto_init", lambda self: calls.append(1) or real(self))
    with pytest.raises(CheckpointMismatchError, match=r"differs in: lr_xi\)"):
        _fast(model, mix, checkpoint_dir=ck, rounds_v2=0, init="auto", lr_xi=0.01).fit()
    assert calls == []  # refused before the candidate grids were tried
    # a matching checkpoint still resumes, from the init grid it stored (no candidate grid is tried again)
    again = _fast(model, mix, checkpoint_dir=ck, rounds_v2=0, init="auto").fit()
    assert calls == []
    assert torch.equal(again.timesteps, load_schedule(os.path.join(ck, SCHEDULE_FILE)).timesteps)


# ----------------------------------------------------------------------------------------------
# a resume keeps the init grid the run started from
# ----------------------------------------------------------------------------------------------
def test_resume_keeps_the_stored_init_grid_and_old_checkpoints_still_resume(ring, tmp_path, monkeypatch):
    """Interrupted at the start of the "time" trial, which then starts from the init grid: init="auto" recomputed on
    resume could pick another grid (here: the chosen candidate is gone, as after a change of library default) and
    silently mix two runs.  The checkpoint stores the grid; one without it (older versions) recomputes it."""
    mix, s, model = ring
    full = _fast(model, mix, init="auto", checkpoint_dir=str(tmp_path / "a")).fit()

    def interrupted(ck):
        def boom(tr, info):
            if tr.time_mode == "time" and info["iteration"] == 1:
                raise _Stop()
        with pytest.raises(_Stop):
            _fast(model, mix, init="auto", checkpoint_dir=ck, callback=boom).fit()

    ck = str(tmp_path / "b")
    interrupted(ck)
    with monkeypatch.context() as m:
        m.setattr(LD3Trainer, "AUTO_INIT_CANDIDATES",
                  tuple(c for c in LD3Trainer.AUTO_INIT_CANDIDATES if c != full.metrics["init_choice"]))
        resumed = _fast(model, mix, init="auto", checkpoint_dir=ck).fit()
    assert torch.equal(resumed.timesteps, full.timesteps)
    assert torch.equal(resumed.model_timesteps, full.model_timesteps)
    for k in ("init_choice", "init_candidates_valid_loss", "time_mode_candidates_valid_loss", "valid_loss_best"):
        assert resumed.metrics[k] == full.metrics[k]
    assert load_safetensors_checked(os.path.join(ck, CHECKPOINT_FILE))[1]["init"]["choice"] == full.metrics["init_choice"]
    # a checkpoint written before the grid was stored: the init is recomputed, and the run still resumes
    ck = str(tmp_path / "c")
    interrupted(ck)
    path = os.path.join(ck, CHECKPOINT_FILE)
    tensors, meta = load_safetensors_checked(path)
    del tensors["init_grid"], meta["init"]
    atomic_save_safetensors(path, tensors, meta)
    old = _fast(model, mix, init="auto", checkpoint_dir=ck).fit()
    assert torch.equal(old.timesteps, full.timesteps)
    assert old.metrics["init_choice"] == full.metrics["init_choice"]
