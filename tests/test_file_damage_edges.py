"""Damage the earlier file tests did not reach (numbers beyond float range, nesting too deep), concurrent
regeneration of one teacher cache, unchecked teacher-data arguments and non-finite history values in
checkpoints; each reproduced before its fix."""
import json
import os

import pytest
import torch

import ld3_ext
from ld3_ext.atomic_io import CorruptFileError, atomic_save_safetensors, load_safetensors_checked, read_json_checked
from ld3_ext.schedule_file import LearnedSchedule, ScheduleFileError, load_schedule
from ld3_ext.solvers import UniPC


def _schedule_file(path):
    s = ld3_ext.EDM()
    LearnedSchedule(torch.linspace(s.t_max, s.t_min, 5, dtype=torch.float64), solver_config=UniPC(order=2).config(),
                    nfe=4, schedule_config=s.config(), metrics={"v": 1.5e-05}).save(str(path))
    return str(path)


def test_a_number_beyond_float_range_is_a_damaged_schedule_file_naming_it(tmp_path):
    p = _schedule_file(tmp_path / "s.json")
    with open(p) as f:
        text = f.read()
    with open(p, "w") as f:
        f.write(text.replace("1.5e-05", "1.5e905"))  # one flipped byte
    with pytest.raises(ScheduleFileError, match="s.json"):
        load_schedule(p)


def test_nesting_too_deep_is_a_damaged_file_naming_it(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CorruptFileError, match="deep.json"):
        read_json_checked(str(p))
    with pytest.raises(ScheduleFileError, match="deep.json"):
        load_schedule(str(p))


def test_safetensors_metadata_beyond_float_range_is_damage(tmp_path):
    p = str(tmp_path / "c.safetensors")
    atomic_save_safetensors(p, {"a": torch.zeros(2)}, metadata={"x": 1.5e-05})
    raw = open(p, "rb").read()
    bad = raw.replace(b"1.5e-05", b"1.5e905")
    assert bad != raw
    with open(p, "wb") as f:
        f.write(bad)
    with pytest.raises(CorruptFileError, match="c.safetensors"):
        load_safetensors_checked(p)


def _teacher_cache(tmp_path, regenerate=False, n=4):
    from ld3_ext.training.teacher import generate_teacher_data, make_teacher
    torch.manual_seed(0)  # the same student weights in every call: the same cache key
    model = ld3_ext.wrap_model(torch.nn.Linear(2, 2).double(), ld3_ext.VPLinear(), prediction="eps")
    fn, st = make_teacher(model, lambda x: 2 * x)
    return generate_teacher_data(model, fn, st, n, (2,), dtype=torch.float64, cache_dir=str(tmp_path / "cache"),
                                 progress=False, regenerate=regenerate, batch_size=2)


def test_teacher_meta_with_a_number_beyond_float_range_is_damage_and_regenerates(tmp_path):
    from ld3_ext.training.teacher import TeacherCacheError
    first = _teacher_cache(tmp_path)
    meta = tmp_path / "cache" / "meta.json"
    doc = json.loads(meta.read_text())
    text = meta.read_text().replace(f'"n": {doc["n"]}', '"n": 1e999') if '"n"' in meta.read_text() else None
    assert text is not None and text != meta.read_text()
    meta.write_text(text)
    with pytest.raises(TeacherCacheError, match="meta.json"):
        _teacher_cache(tmp_path)
    again = _teacher_cache(tmp_path, regenerate=True)
    torch.testing.assert_close(again["target"], first["target"], rtol=0, atol=0)


def test_a_swap_keeps_the_temp_file_another_run_is_writing_into_the_staged_set(tmp_path):
    """Two runs regenerating one cache: the first to commit swapped the staged set in and deleted every temp file
    in it, the other run's chunk being written included, which then died on its os.replace."""
    import shutil
    import time
    from ld3_ext.training.teacher import COMMIT_FILE, META_FILE, STAGING_DIR
    first = _teacher_cache(tmp_path)
    root = tmp_path / "cache"
    staging = root / STAGING_DIR
    staging.mkdir()
    for f in os.listdir(root):  # a complete staged set with its commit marker (the first run's)
        if f.startswith("chunk_") or f == META_FILE:
            shutil.copy(root / f, staging / f)
    (staging / COMMIT_FILE).write_text("{}")
    in_flight = staging / ".chunk_00001.safetensors.x1y2z3.tmp"  # the other run's write, in progress
    in_flight.write_bytes(b"partial")
    killed = staging / ".chunk_00000.safetensors.a1b2c3.tmp"  # a write killed long ago
    killed.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(killed, (old, old))
    again = _teacher_cache(tmp_path)  # open() finishes the swap
    torch.testing.assert_close(again["target"], first["target"], rtol=0, atol=0)
    assert in_flight.exists() and not killed.exists() and not (staging / COMMIT_FILE).exists()


@pytest.mark.parametrize("kw,exc,name", [
    ({"batch_size": 0}, ValueError, "batch_size"), ({"batch_size": 2.5}, ValueError, "batch_size"),
    ({"max_bytes": "1000000"}, ValueError, "max_bytes"), ({"max_bytes": float("nan")}, ValueError, "max_bytes"),
    ({"cache_dir": 123}, TypeError, "cache_dir"), ({"seed": "a"}, ValueError, "seed"),
    ({"conditions": [1] * 4}, TypeError, "conditions"), ({"sample_shape": (2.5,)}, ValueError, "sample_shape"),
    ({"sample_shape": "2"}, TypeError, "sample_shape"), ({"dtype": torch.int64}, TypeError, "dtype"),
    ({"regenerate": "yes"}, TypeError, "regenerate"),
])
def test_generate_teacher_data_names_a_bad_argument(tmp_path, kw, exc, name):
    from ld3_ext.training.teacher import generate_teacher_data, make_teacher
    model = ld3_ext.wrap_model(torch.nn.Linear(2, 2).double(), ld3_ext.VPLinear(), prediction="eps")
    fn, st = make_teacher(model, lambda x: 2 * x)
    args = {"sample_shape": (2,), "dtype": torch.float64, "cache_dir": str(tmp_path / "c"), **kw}
    shape = args.pop("sample_shape")
    with pytest.raises(exc, match=name):
        generate_teacher_data(model, fn, st, 4, shape, progress=False, **args)


def test_a_non_finite_soft_validation_loss_does_not_stop_checkpoints(tmp_path, monkeypatch):
    """select_on="hard" checks only the hard loss; a non-finite soft one went into the history unchecked and
    every checkpoint write failed on it (a bare "Out of range float values are not JSON compliant")."""
    import math
    from ld3_ext.solvers import DPMSolverPP
    from ld3_ext.training import LD3Trainer
    mix, s = ld3_ext.testbeds.ring2d(), ld3_ext.EDM()
    real = LD3Trainer._eval_set

    def eval_set(self, z_all, *a, **k):
        v = real(self, z_all, *a, **k)
        st = getattr(self, "st", None)
        return math.inf if st is not None and z_all is st["z_valid_rel"] and st["iteration"] >= 2 else v
    monkeypatch.setattr(LD3Trainer, "_eval_set", eval_set)
    ck = tmp_path / "ck"
    kw = dict(teacher="exact", reference=mix, sample_shape=mix.event_shape, model_name=mix.name, n_train=6,
              n_valid=4, rounds_v1=1, rounds_v2=1, batch_size=2, progress=False, init="logsnr", time_mode="lambda")
    learned = LD3Trainer(mix.model(s), None, DPMSolverPP(2, backend="reference"), 4, checkpoint_dir=str(ck),
                         **kw).fit()
    assert any(f.endswith(".safetensors") for f in os.listdir(ck))
    assert learned.metrics["valid_loss_soft_last"] is None  # stored as JSON null, the hard loss as a number
    assert math.isfinite(learned.metrics["valid_loss_hard_last"])
    # and the run resumes from that checkpoint to the same schedule
    again = LD3Trainer(mix.model(s), None, DPMSolverPP(2, backend="reference"), 4, checkpoint_dir=str(ck), **kw).fit()
    assert torch.equal(again.timesteps, learned.timesteps)
