"""``torchrun --nproc_per_node=2 -m ld3_ext.cli teacher|train`` (gloo, CPU) reproduces the single-process run.

Three launches of the real CLI on the float64 ring2d mixture (30 teacher pairs = two cache chunks of 25 + 5):

* A: ``teacher`` under torchrun with 2 ranks (each rank generates one chunk), then ``train`` in ONE process
  on the same --out: it must reuse the 2-rank cache unchanged (the cache layout does not depend on the world
  size);
* B: ``train`` under torchrun with 2 ranks from scratch: sharded teacher generation, each rank solving its half
  of every global batch, all-reduced schedule gradients, gathered relaxed noises, rank 0 writing the files.

The two schedules (and the trainers' final states) must agree to float64 round-off: with batch size B and W
ranks each rank takes B/W samples of the same global batch, so only the order of the reductions differs.
Finally a 2-rank run against a cache made with other settings must stop both ranks with a clear error.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from ld3_ext.atomic_io import load_safetensors_checked
from ld3_ext.schedule_file import load_schedule
from ld3_ext.training.teacher import LOCK_FILE

SETTINGS = ["--model", "gmm:ring2d", "--n-train", "26", "--n-valid", "4", "--threads", "1", "--no-progress"]
# a fixed init: with init="auto" this tiny run may start at a grid it cannot improve on in two rounds,
# and the test must compare two runs that actually learned
TRAIN = ["--nfe", "4", "--rounds-v1", "1", "--rounds-v2", "1", "--init", "logsnr", "--time-mode", "lambda"]
TOL = 1e-10


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, nproc=1, ok=True):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "-m", "ld3_ext.cli", *args]
    else:
        cmd = [sys.executable, "-m", "ld3_ext.cli", *args]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    if not ok:
        assert p.returncode != 0, f"{' '.join(cmd)} should have failed"
        return p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _mtimes(d):
    return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in sorted(os.listdir(d))}


def test_torchrun_two_ranks_match_single_process(tmp_path):
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    # A: teacher on 2 ranks, training on 1
    out = _run(["teacher", *SETTINGS, "--out", a], nproc=2)
    assert out.count("teacher pairs ready") == 1  # rank 0 alone prints
    cache = os.path.join(a, "teacher")
    assert sorted(f for f in os.listdir(cache) if f != LOCK_FILE) == ["chunk_00000.safetensors", "chunk_00001.safetensors",
                                                                   "meta.json"]
    before = _mtimes(cache)
    _run(["train", *SETTINGS, *TRAIN, "--out", a])
    assert _mtimes(cache) == before, "the 1-process run must reuse the cache written by 2 ranks"
    # B: everything on 2 ranks
    out = _run(["train", *SETTINGS, *TRAIN, "--out", b], nproc=2)
    assert out.count("wrote ") == 1  # rank 0 alone writes/prints

    # the teacher caches made by 1 and 2 ranks are identical
    for f in ("chunk_00000.safetensors", "chunk_00001.safetensors"):
        ta, _ = load_safetensors_checked(os.path.join(a, "teacher", f))
        tb, _ = load_safetensors_checked(os.path.join(b, "teacher", f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    sa, sb = load_schedule(os.path.join(a, "schedule.json")), load_schedule(os.path.join(b, "schedule.json"))
    assert sa.timesteps.dtype == torch.float64
    torch.testing.assert_close(sb.timesteps, sa.timesteps, rtol=0, atol=TOL)
    torch.testing.assert_close(sb.model_timesteps, sa.model_timesteps, rtol=0, atol=TOL)
    assert sa.metrics["best_iteration"] == sb.metrics["best_iteration"]
    assert abs(sa.metrics["valid_loss_best"] - sb.metrics["valid_loss_best"]) <= TOL
    # learning happened (the comparison is not between two untouched initial grids)
    assert sa.metrics["relative_improvement"] > 0

    # the whole final training state agrees: current parameters (phase 2 moved xi^c), optimizer state,
    # relaxed noises (gathered from both ranks), shuffling
    ca, ma = load_safetensors_checked(os.path.join(a, "checkpoint", "ld3_trainer_state.safetensors"))
    cb, mb = load_safetensors_checked(os.path.join(b, "checkpoint", "ld3_trainer_state.safetensors"))
    assert ca.keys() == cb.keys()
    assert ca["xi_c"].abs().max() > 0
    noise = torch.cat([load_safetensors_checked(os.path.join(a, "teacher", f))[0]["noise"]
                       for f in ("chunk_00000.safetensors", "chunk_00001.safetensors")])
    assert (ca["z_train_rel"] - noise[:26]).abs().max() > 0  # the relaxed noises moved (and are compared below)
    for k in ca:
        if ca[k].is_floating_point():
            torch.testing.assert_close(cb[k], ca[k], rtol=0, atol=TOL, msg=k)
        else:
            assert torch.equal(ca[k], cb[k]), k
    la = [h.get("valid_hard") for h in ma["history"]]
    lb = [h.get("valid_hard") for h in mb["history"]]
    assert len(la) == len(lb) and all(abs(x - y) <= TOL for x, y in zip(la, lb))
    ta_ = [h["train_loss"] for h in ma["history"]]
    tb_ = [h["train_loss"] for h in mb["history"]]  # the global-batch loss, reduced over the ranks
    assert all(abs(x - y) <= TOL for x, y in zip(ta_, tb_))

    # bad input under torchrun: a cache made with other settings stops every rank with a clear error (no hang)
    err = _run(["train", *SETTINGS[:2], "--n-train", "20", *SETTINGS[4:], *TRAIN, "--out", a], nproc=2, ok=False)
    assert "TeacherCacheMismatch" in err and "another rank could not open the teacher cache" in err
    assert _mtimes(cache) == before


def test_torchrun_auto_time_mode_matches_single_process(tmp_path):
    """time_mode="auto" (the CLI default) under 2 ranks: same trials, same choice, same schedule."""
    train = [a for a in TRAIN if a not in ("--time-mode", "lambda")] + ["--time-mode", "auto"]
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    _run(["train", *SETTINGS, *train, "--out", a])
    _run(["train", *SETTINGS, *train, "--out", b], nproc=2)
    sa, sb = load_schedule(os.path.join(a, "schedule.json")), load_schedule(os.path.join(b, "schedule.json"))
    assert sa.training["time_mode_chosen"] == sb.training["time_mode_chosen"]
    assert set(sa.metrics["time_mode_candidates_valid_loss"]) == {"lambda", "time"}
    torch.testing.assert_close(sb.timesteps, sa.timesteps, rtol=0, atol=TOL)
    torch.testing.assert_close(sb.model_timesteps, sa.model_timesteps, rtol=0, atol=TOL)


def _train_two_ranks_on_factory(tmp_path, factory: str, *extra: str) -> subprocess.CompletedProcess:
    """`ld3 train` under torchrun with 2 gloo ranks on a tiny `package.module:factory` model written in tmp_path,
    out in tmp_path/o."""
    env = _env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "ld3_ext.cli", "train", "--model", factory, "--device", "cpu", "--nfe", "3",
           "--solver", "dpmpp", "--order", "2", "--n-train", "4", "--n-valid", "2", "--rounds-v1", "1",
           "--rounds-v2", "0", "--no-progress", *extra, "--out", str(tmp_path / "o")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_ranks_with_different_weights_are_refused(tmp_path):
    """An unseeded network gives each rank other weights: the job stops with a clear error (it trained on
    teacher pairs from two different networks, silently)."""
    (tmp_path / "ld3_rank_factory.py").write_text(
        "import os, torch, ld3_ext\n"
        "def make():\n"
        "    torch.manual_seed(int(os.environ.get('RANK', '0')))  # a different network per rank\n"
        "    net = torch.nn.Linear(2, 2).double()\n"
        "    m = ld3_ext.wrap_model(lambda x, t: net(x), ld3_ext.EDM(), prediction='x0')\n"
        "    m.net = net\n"
        "    m.sample_shape = (2,)\n"
        "    return m, m.schedule\n")
    p = _train_two_ranks_on_factory(tmp_path, "ld3_rank_factory:make")
    assert p.returncode != 0
    assert "ranks under torch.distributed differ in model (rank" in p.stdout + p.stderr
    assert not os.path.exists(tmp_path / "o" / "teacher" / "chunk_00000.safetensors")


def _two_ranks_rank1_extra(tmp_path, args, extra: str):
    """``ld3 ARGS`` under torchrun with 2 ranks, rank 1 given ``extra`` flags besides."""
    (tmp_path / "rank_args.py").write_text(
        "import os, sys\n"
        "from ld3_ext.cli import main\n"
        "extra = os.environ.get('LD3_TEST_RANK%sARGS' % os.environ['RANK'], '').split()\n"
        "sys.exit(main(sys.argv[1:] + extra))\n")
    env = _env()
    env["LD3_TEST_RANK1ARGS"] = extra
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(tmp_path / "rank_args.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("cmd,flag,value,field", [
    ("train", "--rounds-v2", "3", "differ in rounds_v2"), ("train", "--loss", "l2", "differ in loss"),
    ("train", "--teacher-nfe", "30", "differ in teacher_nfe"), ("teacher", "--seed", "1", "differ in the teacher's seed"),
    ("teacher", "--n-train", "20", "differ in the teacher's n ")])
def test_ranks_with_different_settings_are_refused_before_any_work(tmp_path, cmd, flag, value, field):
    """Rank 1 run with another setting: other round counts made the ranks wait in different collectives (a hang
    until gloo's 10-minute timeout), another loss trained on the average of two losses' gradients without a word.
    Every setting is compared before any work, and the differing one is named."""
    p = _two_ranks_rank1_extra(tmp_path, [cmd, *SETTINGS, *(TRAIN if cmd == "train" else []),
                                          "--out", str(tmp_path / "o")], f"{flag} {value}")
    out = p.stdout + p.stderr
    assert p.returncode != 0 and f"ranks under torch.distributed {field}" in out, out[-3000:]
    assert not os.path.exists(tmp_path / "o" / "teacher" / "chunk_00000.safetensors")


def test_torchrun_regeneration_swaps_in_the_new_set_once(tmp_path):
    """--regenerate-teacher on 2 ranks: both ranks build their shares of the new set beside the old one, rank 0
    swaps it in after both are done; a 1-process run with the new settings then reuses it unchanged."""
    a = str(tmp_path / "A")
    _run(["teacher", *SETTINGS, "--out", a])  # 30 pairs: chunks of 25 + 5
    cache = os.path.join(a, "teacher")
    new = [*SETTINGS[:2], "--n-train", "40", *SETTINGS[4:]]  # 44 pairs: 25 + 19
    _run(["teacher", *new, "--regenerate-teacher", "--out", a], nproc=2)
    assert sorted(f for f in os.listdir(cache) if f != LOCK_FILE) == ["chunk_00000.safetensors", "chunk_00001.safetensors",
                                                                   "meta.json"]
    before = _mtimes(cache)
    _run(["teacher", *new, "--out", a])
    assert _mtimes(cache) == before, "the 1-process run must reuse the set the 2 ranks regenerated"
    b = str(tmp_path / "B")
    _run(["teacher", *new, "--out", b])
    for f in ("chunk_00000.safetensors", "chunk_00001.safetensors"):
        ta, _ = load_safetensors_checked(os.path.join(cache, f))
        tb, _ = load_safetensors_checked(os.path.join(b, "teacher", f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("when", ["step", "validation"])
def test_a_model_failure_on_one_rank_stops_every_rank_with_the_last_good_schedule_saved(tmp_path, when):
    """A NaN from the network on rank 1 (not rank 0) during a training step: that rank named a last-good schedule
    file that only rank 0 would write, while rank 0 died in the next collective with a gloo traceback.  The
    failure now rides in the step's flags: every rank stops with the same error and rank 0 writes the file."""
    (tmp_path / "ld3_nan_factory.py").write_text(
        "import os, torch, ld3_ext\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    net = torch.nn.Linear(2, 2)\n"
        "    bad = os.environ.get('RANK') == '1'\n"
        "    seen = []\n"
        "    def fn(x, t):\n"
        "        out = torch.tanh(net(x))\n"
        "        # training steps differentiate through the network; the teacher and validation do not\n"
        "        grad = torch.is_grad_enabled() and x.requires_grad\n"
        "        seen.append(grad)\n"
        f"        fail = grad if {when!r} == 'step' else (not grad and any(seen))  # validation: after a step\n"
        "        return out * float('nan') if bad and fail else out\n"
        "    m = ld3_ext.wrap_model(fn, ld3_ext.EDM(), prediction='x0')\n"
        "    m.net = net\n"
        "    m.sample_shape = (2,)\n"
        "    return m, m.schedule\n")
    out = tmp_path / "o"
    p = _train_two_ranks_on_factory(tmp_path, "ld3_nan_factory:make", "--init", "logsnr", "--time-mode", "lambda")
    text = p.stdout + p.stderr
    assert p.returncode != 0
    # (torchrun's own launcher prints a traceback of its ChildFailedError: not a rank's)
    assert "Connection closed" not in text and "]: Traceback" not in text, text[-3000:]
    assert "the model failed: model returned NaN/Inf" in text and "the model failed on another rank" in text, \
        text[-3000:]
    assert (out / "checkpoint" / "last_good_schedule.json").is_file()


def test_a_checkpoint_held_by_only_some_ranks_is_refused_before_any_collective(tmp_path):
    """Rank 1 run with --fresh (or a node-local --out without the checkpoint) under the default --init auto: the
    rank without it evaluated auto's candidate grids, collectives the resuming rank never joined -- a hang until
    gloo's 10-minute timeout (distributed audit).  Now both ranks stop at once, naming the checkpoint."""
    out = str(tmp_path / "o")
    args = ["train", *SETTINGS, "--nfe", "4", "--rounds-v1", "1", "--rounds-v2", "1", "--out", out]
    _run(args)  # one process: leaves o/checkpoint
    p = _two_ranks_rank1_extra(tmp_path, args, "--fresh")
    text = p.stdout + p.stderr
    assert p.returncode != 0 and "the ranks do not hold the same training checkpoint" in text, text[-3000:]
