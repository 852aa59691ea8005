"""Damaged and unusual files: a damaged safetensors header is a CorruptFileError (so a damaged teacher chunk is
regenerated and a damaged checkpoint names the way out), atomic writes without chmod and through symlinks."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from ld3_ext.atomic_io import (CorruptFileError, atomic_save_safetensors, atomic_write_json,
                               load_safetensors_checked, read_json_checked)
from ld3_ext.training import CheckpointMismatchError, make_teacher

from test_crash_safety import _trainer
from test_teacher_cache import Counting, _gen


def _flip_header_bit(raw: bytes, bit: int) -> bytes:
    bad = bytearray(raw)
    bad[8 + bit // 8] ^= 1 << (bit % 8)
    return bytes(bad)


def test_every_header_bit_flip_is_a_corrupt_file_error_or_an_identical_load(tmp_path):
    p = tmp_path / "x.safetensors"
    atomic_save_safetensors(str(p), {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, {"k": 1})
    good_t, good_m = load_safetensors_checked(str(p))
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    q = tmp_path / "bad.safetensors"
    for bit in range(8 * n):
        q.write_bytes(_flip_header_bit(raw, bit))
        try:
            t, m = load_safetensors_checked(str(q), what="test file")
        except CorruptFileError as e:
            assert str(q) in str(e)
            continue
        assert m == good_m and t.keys() == good_t.keys() and all(torch.equal(t[k], good_t[k]) for k in t), bit


@pytest.mark.parametrize("header, match", [
    (b"[]", "JSON object"),
    (b'{"a": 1}', "dtype"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}', "data_offsets"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}', "data_offsets"),
    (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "shape"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}', "data_offsets"),
    (b'{"__metadata__": [], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "__metadata__"),
])
def test_malformed_header_structure(tmp_path, header, match):
    p = tmp_path / "x.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(CorruptFileError, match=match):
        load_safetensors_checked(str(p))


def test_user_metadata_must_be_a_dict(tmp_path):
    from safetensors.torch import save
    import ld3_ext.atomic_io as aio

    t = {"a": torch.ones(2)}
    meta_json = "[1, 2]"
    digest = aio._file_digest(aio.tensors_sha256(t), meta_json)
    p = tmp_path / "x.safetensors"
    p.write_bytes(save(t, metadata={"ld3_sha256": digest, "ld3_meta": meta_json}))
    with pytest.raises(CorruptFileError, match="metadata"):
        load_safetensors_checked(str(p))


def _damage_key(path):
    raw = bytearray(path.read_bytes())
    i = raw.index(b"data_offsets")
    raw[i + 9] ^= 0x01  # "data_offsets" -> "data_offsdts": the header still parses as JSON
    path.write_bytes(bytes(raw))


def test_teacher_chunk_with_damaged_header_is_regenerated(ring, tmp_path):
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    full = _gen(model, fn, settings, str(tmp_path))
    _damage_key(tmp_path / "chunk_00001.safetensors")
    t = Counting(fn)
    with pytest.warns(UserWarning, match=r"chunk_00001.*damaged safetensors header.*regenerating"):
        again = _gen(model, t, settings, str(tmp_path))
    assert t.calls == 1 and all(torch.equal(again[k], full[k]) for k in full)
    load_safetensors_checked(str(tmp_path / "chunk_00001.safetensors"))  # rewritten whole


def test_checkpoint_with_damaged_header_names_the_way_out(ring, tmp_path):
    _trainer(ring, tmp_path).fit()
    _damage_key(tmp_path / "ld3_trainer_state.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)ld3_trainer_state.*damaged.*resume='never'"):
        _trainer(ring, tmp_path).fit()


@pytest.mark.parametrize("how", ["missing", "eperm"])
def test_atomic_write_without_chmod(tmp_path, monkeypatch, how):

    if how == "missing":  # Windows before Python 3.13
        monkeypatch.delattr(os, "fchmod", raising=False)
    else:  # a filesystem that refuses chmod
        def eperm(fd, mode):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "fchmod", eperm)
    p = tmp_path / "s.json"
    atomic_write_json(str(p), {"a": 1})
    assert read_json_checked(str(p))["a"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["s.json"]


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, where):
    """ENOSPC from the write or the fsync names the file being written (errno 28 alone named none: `ld3 teacher`
    on a full disk said only "No space left on device"); the old file and no temp file remain."""
    p = tmp_path / "s.json"
    atomic_write_json(str(p), {"a": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", full)
    else:
        real_fdopen = os.fdopen

        class FullFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def fileno(self):
                return self.f.fileno()

            write = flush = full

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullFile(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as info:
        atomic_write_json(str(p), {"a": 2})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(p)
    assert str(p) in str(info.value)
    assert [f.name for f in tmp_path.iterdir()] == ["s.json"]
    assert read_json_checked(str(p))["a"] == 1


def test_atomic_write_interrupted_at_chmod_closes_its_temp_file(tmp_path, monkeypatch):
    """A Ctrl-C between mkstemp and the write (here: in the mode lookup) leaves no temp file and no open
    descriptor, and the file being replaced keeps its old content."""
    from ld3_ext import atomic_io

    p = tmp_path / "s.json"
    atomic_write_json(str(p), {"a": 1})
    before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_io, "_target_mode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(str(p), {"a": 2})
    assert [f.name for f in tmp_path.iterdir()] == ["s.json"]
    assert read_json_checked(str(p))["a"] == 1
    if before is not None:
        assert set(os.listdir("/proc/self/fd")) <= before


def test_a_write_refused_by_a_read_only_folder_names_the_file_not_the_temp_file(tmp_path, monkeypatch):
    """A link into a read-only folder: the error named '.keep.json.wdu4me4g.tmp', a file that never existed
    (crash-safety audit); it names the file written and the link's target."""
    import tempfile
    ro, out = tmp_path / "ro", tmp_path / "out"
    ro.mkdir()
    out.mkdir()
    os.symlink(ro / "keep.json", out / "schedule.json")

    def refused(prefix, suffix, dir):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, prefix + "wdu4me4g" + suffix))
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(OSError) as info:
        atomic_write_json(str(out / "schedule.json"), {"a": 1})
    assert info.value.errno == errno.EROFS
    assert info.value.filename == str(out / "schedule.json")
    assert info.value.filename2 == os.path.realpath(ro / "keep.json")
    assert ".tmp" not in str(info.value) and "keep.json" in str(info.value)
    # an error naming another file (not the temp one) keeps its name
    monkeypatch.setattr(tempfile, "mkstemp", lambda prefix, suffix, dir: (_ for _ in ()).throw(
        OSError(errno.EACCES, os.strerror(errno.EACCES), "/elsewhere")))
    with pytest.raises(OSError) as info:
        atomic_write_json(str(tmp_path / "plain.json"), {"a": 1})
    assert info.value.filename == "/elsewhere"


def test_atomic_write_through_a_symlink_rewrites_its_target(tmp_path):

    real, link = tmp_path / "real.json", tmp_path / "link.json"
    atomic_write_json(str(real), {"a": 1})
    os.chmod(real, 0o640)
    os.symlink(real, link)
    atomic_write_json(str(link), {"a": 9})
    assert os.path.islink(link) and os.readlink(link) == str(real)
    assert read_json_checked(str(real))["a"] == 9 and read_json_checked(str(link))["a"] == 9
    assert os.stat(real).st_mode & 0o777 == 0o640
    # a relative link into another directory: the temp file goes next to the target
    sub = tmp_path / "sub"
    sub.mkdir()
    os.symlink(os.path.join("..", "real.json"), sub / "rel.json")
    atomic_save_safetensors(str(sub / "rel.json"), {"x": torch.ones(2)})
    assert os.path.islink(sub / "rel.json") and torch.equal(load_safetensors_checked(str(real))[0]["x"], torch.ones(2))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["link.json", "real.json", "sub"]
    assert [f.name for f in sub.iterdir()] == ["rel.json"]


# ----------------------------------------------------------------------------------------------
# the shipped weights are checked against their pinned sha256
# ----------------------------------------------------------------------------------------------
def _shipped():
    import hashlib

    from ld3_ext.models import _io, digits, digits_classifier

    out = []
    for mod, cls in ((digits, digits.DigitsDenoiser), (digits_classifier, digits_classifier.DigitsClassifier)):
        raw = _io.read_bytes(mod.WEIGHTS_FILE)
        assert hashlib.sha256(raw).hexdigest() == mod.WEIGHTS_SHA256 == mod._WEIGHTS.expected_sha256
        out.append((mod.WEIGHTS_FILE, cls, mod.WEIGHTS_SHA256, raw))
    return out


def _damaged(raw, how):
    n = int.from_bytes(raw[:8], "little")
    if how == "flip":  # one bit of a tensor: still decodes, different numbers
        bad = bytearray(raw)
        bad[8 + n + 1000] ^= 0x40
        return bytes(bad)
    if how == "header":
        return _flip_header_bit(raw, 8 * 5)
    return raw[: len(raw) // 2] if how == "half" else raw[:4]


@pytest.mark.parametrize("how", ["flip", "header", "half", "4 bytes"])
def test_damaged_shipped_weights_are_refused_naming_the_file(monkeypatch, how):
    from ld3_ext.models import _io

    for filename, cls, sha, raw in _shipped():
        monkeypatch.setattr(_io, "read_bytes", lambda f, bad=_damaged(raw, how): bad)
        w = _io.ShippedWeights(filename, cls, sha)
        for use in (w.load, w.sha256, w.metadata):
            with pytest.raises(CorruptFileError, match=rf"ld3_ext/data/{filename}.*reinstall ld3_ext"):
                use()
        # without a pin, a file that does not decode still names itself (no raw SafetensorError/JSONDecodeError)
        if how != "flip":
            with pytest.raises(CorruptFileError, match=rf"ld3_ext/data/{filename}.*reinstall ld3_ext"):
                _io.load_state(filename)
    monkeypatch.undo()
    for filename, cls, sha, raw in _shipped():  # the real files load
        assert _io.ShippedWeights(filename, cls, sha).sha256() == sha


# ----------------------------------------------------------------------------------------------
# schedule files
# ----------------------------------------------------------------------------------------------
def test_newer_schedule_file_with_another_checksum_scheme_says_it_is_newer(tmp_path):
    import json

    from ld3_ext.schedule_file import ScheduleFileError, load_schedule
    from test_schedule_file import _sched

    path = _sched().save(str(tmp_path / "s.json"))
    doc = json.load(open(path))
    doc.update(version=2, new_field={"x": 1}, checksum="sha512:abc")
    json.dump(doc, open(path, "w"))
    with pytest.raises(ScheduleFileError, match="format version 2 is newer.*upgrade ld3_ext") as e:
        load_schedule(path)
    assert "modified or corrupted" not in str(e.value)
    doc.update(version=1)  # the current version with a foreign checksum is damaged
    json.dump(doc, open(path, "w"))
    with pytest.raises(ScheduleFileError, match="fails its checksum.*modified or corrupted"):
        load_schedule(path)


def _learned(model_timesteps=None, **kw):
    from ld3_ext.schedule_file import LearnedSchedule
    from test_schedule_file import _sched

    s = _sched()
    return LearnedSchedule(s.timesteps, s.model_timesteps if model_timesteps is None else model_timesteps,
                           solver_config=s.solver_config, nfe=s.nfe, schedule_config=s.schedule_config, **kw)


@pytest.mark.parametrize("field, value, written", [
    ("metrics", {"loss": float("nan"), "best": float("-inf"), "ok": 0.25}, {"loss": None, "best": None, "ok": 0.25}),
    ("metrics", {"loss": __import__("numpy").float32(0.5), "n": __import__("numpy").int64(7),
                 "flag": __import__("numpy").bool_(True)}, {"loss": 0.5, "n": 7, "flag": True}),
    ("metrics", {1: 0.1, "a": 0.2}, {"1": 0.1, "a": 0.2}),
    ("training", {"curve": [(4, float("nan")), (6, 0.1)], "nested": {2: {"x": None}}},
     {"curve": [[4, None], [6, 0.1]], "nested": {"2": {"x": None}}}),
    ("model", {"name": "m", "size": __import__("numpy").float64(1.5)}, {"name": "m", "size": 1.5}),
])
def test_schedule_metadata_made_here_saves_and_loads_back(tmp_path, field, value, written):
    from ld3_ext.schedule_file import load_schedule

    s = _learned(**{field: value})
    assert getattr(s, field) == written
    back = load_schedule(s.save(str(tmp_path / "s.json")))
    assert getattr(back, field) == written and back.metadata == s.metadata


@pytest.mark.parametrize("field, value, match", [
    ("metrics", {"loss": torch.tensor(0.5)}, r"metrics\['loss'\]: a Tensor.*\.item\(\)"),
    ("metrics", {"a": [1, object()]}, r"metrics\['a'\]\[1\]: a object"),
    ("training", {1.5: 2}, r"training: key 1\.5"),
    ("training", {(1, 2): 2}, r"training: key \(1, 2\)"),
    ("metrics", {1: 0.1, "1": 0.2}, r"metrics: keys 1 and '1'"),
    ("model", {"x": __import__("numpy").zeros(2)}, r"model\['x'\]: a ndarray"),
])
def test_schedule_metadata_that_cannot_be_written_is_refused_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        _learned(**{field: value})


@pytest.mark.parametrize("end", [0, -1])
def test_model_timesteps_must_share_the_endpoints_of_timesteps(tmp_path, end):
    import json

    from ld3_ext.schedule_file import ScheduleFileError, load_schedule
    from test_schedule_file import _sched

    s = _sched()
    path = s.save(str(tmp_path / "s.json"))
    doc = json.load(open(path))
    span = doc["timesteps"][0] - doc["timesteps"][-1]
    doc["model_timesteps"][end] = doc["timesteps"][end] + (0.05 if end else -0.1) * span  # inside the range
    atomic_write_json(path, doc)  # a valid checksum: only the endpoint is wrong
    with pytest.raises(ScheduleFileError, match=r"schedule file .*model_timesteps must have the same endpoints"):
        load_schedule(path)
    tm = s.model_timesteps.clone()
    tm[end] = doc["model_timesteps"][end]
    with pytest.raises(ValueError, match="model_timesteps must have the same endpoints"):
        _learned(model_timesteps=tm)
    # within the solvers' tolerance (1e-3 of the time span, solvers.base.validate_model_timesteps): accepted
    doc["model_timesteps"][end] = doc["timesteps"][end] + (1 if end else -1) * 0.5e-3 * span
    atomic_write_json(path, doc)
    assert load_schedule(path).model_timesteps[end].item() == doc["model_timesteps"][end]


def test_check_writable_dir_makes_the_folder_proves_a_write_and_names_bad_input(tmp_path, monkeypatch):
    import tempfile
    from ld3_ext.atomic_io import check_writable_dir
    target = tmp_path / "a" / "b"
    check_writable_dir(str(target))
    assert target.is_dir() and list(target.iterdir()) == []  # the probe leaves nothing behind
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        check_writable_dir(str(tmp_path / "f" / "sub"))
    real = tempfile.TemporaryFile

    def refuse(*a, dir=None, **k):  # root ignores permissions: a read-only folder is simulated
        if dir is not None and str(dir) == str(target):
            raise PermissionError(13, "Permission denied", dir)
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(PermissionError):
        check_writable_dir(str(target))  # makedirs alone would have passed
    for bad in (None, 3):
        with pytest.raises(TypeError, match=r"check_writable_dir: path must be a str or os.PathLike, got"):
            check_writable_dir(bad)
