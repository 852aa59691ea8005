"""Teacher generation and its on-disk cache: reuse, mismatch, resume, size limit, integrity."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from ld3_ext import EDM, wrap_model
from ld3_ext.atomic_io import atomic_save_safetensors, load_safetensors_checked, CorruptFileError
from ld3_ext.solvers import DPMSolverPP
from ld3_ext.training import (LD3Trainer, TeacherCacheError, TeacherCacheMismatch, TeacherCacheTooLarge,
                              generate_teacher_data, make_teacher, model_identity)
from ld3_ext.training.teacher import LOCK_FILE, TeacherConfig, load_or_generate_teacher


class Counting:
    """A teacher that counts its calls and can fail on a given call."""

    def __init__(self, fn, fail_on=None):
        self.fn, self.calls, self.fail_on = fn, 0, fail_on

    def __call__(self, x, **kw):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return self.fn(x, **kw)


def _ls(d):
    """The folder's entries but the lock file (it stays: removing it would race another process's flock)."""
    return [f for f in os.listdir(d) if f != LOCK_FILE]


def _gen(model, teacher_fn, settings, cache, n=10, seed=0, chunk=4, **kw):
    return generate_teacher_data(model, teacher_fn, settings, n, (2,), seed=seed, dtype=torch.float64,
                                 batch_size=chunk, cache_dir=cache, identity={"name": "ring", "weights_hash": "x",
                                                                               "hash_source": "name"},
                                 progress=False, **kw)


def test_default_teacher_is_the_papers(ring):
    mix, s, model = ring
    fn, settings = make_teacher(model)
    assert settings["solver"]["name"] == "unipc" and settings["solver"]["order"] == 3
    assert settings["solver"]["variant"] == "bh1" and settings["nfe"] == 20 and settings["discretization"] == "logsnr"
    x = mix.prior_noise(s, 4, generator=torch.Generator().manual_seed(0))
    exact = mix.reference_solution(s, x)
    assert float((fn(x) - exact).abs().max()) < 5e-2
    fn2, settings2 = make_teacher(model, "exact", reference=mix)
    torch.testing.assert_close(fn2(x), exact)
    with pytest.raises(ValueError, match="reference"):
        make_teacher(model, "exact")


def test_cache_is_reused_and_bitwise_identical(ring, tmp_path):
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    t1 = Counting(fn)
    a = _gen(model, t1, settings, str(tmp_path))
    assert t1.calls == 3
    t2 = Counting(fn)
    b = _gen(model, t2, settings, str(tmp_path))
    assert t2.calls == 0
    for k in a:
        assert torch.equal(a[k], b[k])
    assert a["noise"].shape == (10, 2) and abs(float(a["noise"].std()) - 1) < 0.5  # unit-variance noise stored
    files = sorted(_ls(tmp_path))
    assert files == ["chunk_00000.safetensors", "chunk_00001.safetensors", "chunk_00002.safetensors", "meta.json"]
    for f in files[:-1]:
        # safetensors layout (not a pickle, not torch.save's zip): u64 little-endian header size, then JSON
        raw = open(tmp_path / f, "rb").read()
        assert raw[8:9] == b"{" and 8 + int.from_bytes(raw[:8], "little") <= len(raw), raw[:16]
        load_safetensors_checked(str(tmp_path / f))


@pytest.mark.parametrize("change", ["seed", "teacher", "n", "model"])
def test_mismatching_cache_is_refused_then_regenerated(ring, tmp_path, change):
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    _gen(model, fn, settings, str(tmp_path))
    kw = dict(n=10, seed=0)
    other_settings = settings
    if change == "seed":
        kw["seed"] = 1
    elif change == "n":
        kw["n"] = 12
    elif change == "teacher":
        fn, other_settings = make_teacher(model, "solver", solver=DPMSolverPP(3, backend="reference"), nfe=10)
    before = {f: open(tmp_path / f, "rb").read() for f in _ls(tmp_path)}
    if change == "model":
        with pytest.raises(TeacherCacheMismatch, match="model.weights_hash"):
            generate_teacher_data(model, fn, settings, 10, (2,), dtype=torch.float64, batch_size=4,
                                  cache_dir=str(tmp_path), identity={"name": "ring", "weights_hash": "y",
                                                                     "hash_source": "name"}, progress=False)
    else:
        with pytest.raises(TeacherCacheMismatch, match="different settings"):
            _gen(model, fn, other_settings, str(tmp_path), **kw)
    # nothing already saved was touched
    assert {f: open(tmp_path / f, "rb").read() for f in _ls(tmp_path)} == before
    if change != "model":
        out = _gen(model, fn, other_settings, str(tmp_path), regenerate=True, **kw)
        assert out["noise"].shape[0] == kw["n"]


def test_weights_hash_distinguishes_modules():
    net = torch.nn.Linear(2, 2)
    a = model_identity(net)
    with torch.no_grad():
        net.weight[0, 0] += 1e-3
    b = model_identity(net)
    assert a["hash_source"] == "state_dict" and a["weights_hash"] != b["weights_hash"]
    with pytest.warns(UserWarning, match="model_name"):
        c = model_identity(wrap_model(lambda x, t: x, EDM()))
    assert c["hash_source"] == "name"
    assert model_identity(wrap_model(lambda x, t: x, EDM()), "my-net@v1")["name"] == "my-net@v1"


def test_a_test_bed_is_identified_by_its_parameters_without_a_warning():
    """A GaussianMixture's model has no weights; without a model_name its parameters identify it (no warning
    asking for a name), so two mixtures of one name do not share a cache. A given name keeps the name hash
    (the CLI's, so caches made before stay valid)."""
    import warnings
    from ld3_ext import testbeds
    from ld3_ext.testbeds import GaussianMixture
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = model_identity(testbeds.ring2d().model(EDM()))
        b = model_identity(testbeds.ring2d().model(EDM()))
        c = model_identity(GaussianMixture([[0.0, 1.0]], [[1.0, 1.0]], name="ring2d").model(EDM()))
        d = model_identity(GaussianMixture([[0.0, 1.0]], [[1.0, 1.0]], event_shape=(1, 2), name="ring2d").model(EDM()))
    assert a == b and a["hash_source"] == "testbed" and a["name"] == "gmm:ring2d"
    assert len({a["weights_hash"], c["weights_hash"], d["weights_hash"]}) == 3
    named = model_identity(testbeds.ring2d().model(EDM()), "gmm:ring2d")
    assert named["hash_source"] == "name" and named["weights_hash"] == hashlib.sha256(b"gmm:ring2d").hexdigest()


def test_interrupted_generation_resumes(ring, tmp_path):
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    full = _gen(model, fn, settings, str(tmp_path / "full"))
    t1 = Counting(fn, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        _gen(model, t1, settings, str(tmp_path / "b"))
    assert sorted(f for f in _ls(tmp_path / "b") if f.startswith("chunk")) == \
        ["chunk_00000.safetensors", "chunk_00001.safetensors"]
    assert not [f for f in _ls(tmp_path / "b") if f.endswith(".tmp")]
    t2 = Counting(fn)
    resumed = _gen(model, t2, settings, str(tmp_path / "b"))
    assert t2.calls == 1
    for k in full:
        assert torch.equal(full[k], resumed[k])


def test_size_limit(ring, tmp_path):
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    with pytest.raises(TeacherCacheTooLarge, match="cache_max_bytes"):
        _gen(model, fn, settings, str(tmp_path / "c"), n=1000, max_bytes=10_000)
    assert not os.path.exists(tmp_path / "c" / "meta.json")
    _gen(model, fn, settings, str(tmp_path / "d"), n=10, max_bytes=10_000_000)


def test_damaged_chunk_is_regenerated_and_damaged_meta_is_an_error(ring, tmp_path):
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    full = _gen(model, fn, settings, str(tmp_path))
    p = tmp_path / "chunk_00001.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[:-5])
    t = Counting(fn)
    with pytest.warns(UserWarning, match="truncated"):
        again = _gen(model, t, settings, str(tmp_path))
    assert t.calls == 1 and torch.equal(again["target"], full["target"])
    m = tmp_path / "meta.json"
    m.write_text(m.read_text().replace('"seed": 0', '"seed": 7'))
    with pytest.raises(TeacherCacheError, match="checksum"):
        _gen(model, fn, settings, str(tmp_path))


def test_safetensors_checksum_covers_metadata(tmp_path):
    p = str(tmp_path / "x.safetensors")
    atomic_save_safetensors(p, {"a": torch.arange(4.0)}, {"k": "v"})
    t, m = load_safetensors_checked(p)
    assert m == {"k": "v"} and torch.equal(t["a"], torch.arange(4.0))
    raw = open(p, "rb").read().replace(b'\\"v\\"', b'\\"w\\"')
    open(p, "wb").write(raw)
    with pytest.raises(CorruptFileError, match="checksum"):
        load_safetensors_checked(p)


def test_trainer_reuses_its_teacher_cache(ring, tmp_path):
    mix, s, model = ring
    calls = {"n": 0}

    def ref(x):
        calls["n"] += 1
        return mix.reference_solution(s, x)

    kw = dict(teacher="exact", reference=ref, sample_shape=(2,), model_name="ring", n_train=6, n_valid=4,
              rounds_v1=1, rounds_v2=0, progress=False, teacher_cache=str(tmp_path))
    r1 = LD3Trainer(model, s, DPMSolverPP(2, backend="reference"), 4, **kw).fit()
    n1 = calls["n"]
    assert n1 >= 1
    r2 = LD3Trainer(model, s, DPMSolverPP(2, backend="reference"), 4, **kw).fit()
    assert calls["n"] == n1
    assert torch.equal(r1.timesteps, r2.timesteps)
    with pytest.raises(TeacherCacheMismatch):
        LD3Trainer(model, s, DPMSolverPP(2, backend="reference"), 4, **{**kw, "n_valid": 5}).fit()


def test_load_or_generate_teacher_api(ring, tmp_path):
    mix, s, model = ring
    model.testbed = mix
    try:
        data = load_or_generate_teacher(model, s, TeacherConfig(teacher="exact", n_train=4, n_valid=2),
                                        cache_dir=str(tmp_path), dtype=torch.float64, model_name="ring",
                                        progress=False)
    finally:
        del model.testbed
    assert data.train_noise.shape == (4, 2) and data.valid_target.shape == (2, 2)
    torch.testing.assert_close(data.train_target, mix.reference_solution(s, data.train_noise))


@pytest.mark.parametrize("change", ["time_input", "model_kwargs", "conditions_dtype"])
def test_cache_key_covers_how_the_network_is_called(ring, tmp_path, change):
    """The same weights called another way are another model: reading time differently, other fixed keyword
    arguments (e.g. text embeddings), or conditions with the same bytes in another dtype."""
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)

    def net(x, t, scale=1.0, cond=None):
        return scale * x
    first = {"time_input": dict(time_input="t"), "model_kwargs": dict(model_kwargs={"scale": 0.5}),
             "conditions_dtype": {}}[change]
    second = {"time_input": dict(time_input="edm_noise"), "model_kwargs": dict(model_kwargs={"scale": 2.0}),
              "conditions_dtype": {}}[change]
    cond = torch.arange(10, dtype=torch.int32)
    kw1 = dict(conditions=cond) if change == "conditions_dtype" else {}
    kw2 = dict(conditions=cond.view(torch.float32)) if change == "conditions_dtype" else {}
    _gen(wrap_model(net, s, prediction="x0", **first), fn, settings, str(tmp_path), **kw1)
    with pytest.raises(TeacherCacheMismatch, match="different settings"):
        _gen(wrap_model(net, s, prediction="x0", **second), fn, settings, str(tmp_path), **kw2)


def test_stale_temp_files_are_neither_counted_nor_kept(ring, tmp_path):
    """A write killed mid-way leaves .chunk_*.tmp behind: it does not count against cache_max_bytes, and an
    old one is removed when the cache is opened (files that are not the cache's are never touched)."""
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    d = tmp_path / "c"
    _gen(model, fn, settings, str(d))
    stale = d / ".chunk_00001.safetensors.abc123.tmp"
    stale.write_bytes(b"\0" * 200_000)
    os.utime(stale, (1, 1))  # long ago
    fresh = d / ".chunk_00002.safetensors.def456.tmp"  # maybe another process's write in progress
    fresh.write_bytes(b"\0" * 200_000)
    mine = d / "notes.txt"
    mine.write_text("user file")
    _gen(model, fn, settings, str(d), max_bytes=100_000)  # the temp files are not the cache's bytes
    assert not stale.exists() and fresh.exists() and mine.read_text() == "user file"


# ----------------------------------------------------------------------------------------------
# regenerate=True keeps the old set until the new one is complete
# ----------------------------------------------------------------------------------------------
def _snapshot(d):
    """Every file under d (relative path -> bytes)."""
    out = {}
    for base, _, files in os.walk(d):
        for f in files:
            if f == LOCK_FILE:
                continue
            p = os.path.join(base, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def test_interrupted_regeneration_keeps_the_old_set_then_resumes(ring, tmp_path):
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    old = _gen(model, fn, settings, str(tmp_path))  # n=10: three chunks of 4
    before = _snapshot(tmp_path)
    # the new set has 6 samples (two chunks) and another seed; Ctrl-C while making its second chunk
    t1 = Counting(fn, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        _gen(model, t1, settings, str(tmp_path), n=6, seed=3, regenerate=True)
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(".regenerating")} == before
    assert sorted(k for k in after if k.startswith(".regenerating")) == \
        [os.path.join(".regenerating", "chunk_00000.safetensors"), os.path.join(".regenerating", "meta.json")]
    # the old set is still the one in use for the old settings
    t2 = Counting(fn)
    again = _gen(model, t2, settings, str(tmp_path))
    assert t2.calls == 0 and all(torch.equal(old[k], again[k]) for k in old)
    # rerunning the regeneration resumes it (one chunk left) and then swaps the new set in
    t3 = Counting(fn)
    new = _gen(model, t3, settings, str(tmp_path), n=6, seed=3, regenerate=True)
    assert t3.calls == 1
    fresh = _gen(model, fn, settings, str(tmp_path / "fresh"), n=6, seed=3)
    assert all(torch.equal(fresh[k], new[k]) for k in fresh)
    assert sorted(f for f in _ls(tmp_path) if f != "fresh") == \
        ["chunk_00000.safetensors", "chunk_00001.safetensors", "meta.json"]  # old chunk 2 gone, no staging
    t4 = Counting(fn)
    reused = _gen(model, t4, settings, str(tmp_path), n=6, seed=3)
    assert t4.calls == 0 and all(torch.equal(fresh[k], reused[k]) for k in fresh)
    with pytest.raises(TeacherCacheMismatch):  # the old settings now mismatch
        _gen(model, fn, settings, str(tmp_path))


@pytest.mark.parametrize("moves_before_crash", [0, 1, 2])
def test_swap_cut_short_is_finished_by_the_next_open(ring, tmp_path, monkeypatch, moves_before_crash):
    """A crash (here: an OSError from os.replace) part-way through moving the complete new set in: the next
    open finishes the swap, and the new set is reused without another teacher call."""
    from ld3_ext.training import teacher as teacher_mod

    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    _gen(model, fn, settings, str(tmp_path))
    real_replace, moves = os.replace, {"n": 0}

    def crashing_replace(a, b):
        if ".regenerating" in str(a) and ".regenerating" not in str(b):  # a move out of the staged set
            if moves["n"] == moves_before_crash:
                raise OSError("simulated crash")
            moves["n"] += 1
        return real_replace(a, b)

    monkeypatch.setattr(teacher_mod.os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        _gen(model, fn, settings, str(tmp_path), n=6, seed=3, regenerate=True)
    monkeypatch.setattr(teacher_mod.os, "replace", real_replace)
    assert os.path.exists(tmp_path / ".regenerating" / "commit.json")
    assert not os.path.exists(tmp_path / "meta.json")  # the old metadata went first
    t = Counting(fn)
    new = _gen(model, t, settings, str(tmp_path), n=6, seed=3)  # no regenerate needed: the new set is complete
    assert t.calls == 0
    fresh = _gen(model, fn, settings, str(tmp_path / "fresh"), n=6, seed=3)
    assert all(torch.equal(fresh[k], new[k]) for k in fresh)
    assert sorted(f for f in _ls(tmp_path) if f != "fresh") == \
        ["chunk_00000.safetensors", "chunk_00001.safetensors", "meta.json"]


def test_regeneration_over_damaged_metadata_keeps_the_chunks_until_done(ring, tmp_path):
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    full = _gen(model, fn, settings, str(tmp_path))
    m = tmp_path / "meta.json"
    m.write_text(m.read_text().replace('"seed": 0', '"seed": 7'))
    before = _snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        _gen(model, Counting(fn, fail_on=1), settings, str(tmp_path), regenerate=True)
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(".regenerating")} == before
    again = _gen(model, fn, settings, str(tmp_path), regenerate=True)
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert sorted(_ls(tmp_path)) == ["chunk_00000.safetensors", "chunk_00001.safetensors",
                                            "chunk_00002.safetensors", "meta.json"]


@pytest.mark.parametrize("rank0", [True, False])
def test_commit_under_torch_distributed_is_decided_together_and_failures_stop_every_rank(monkeypatch, rank0):
    """Simulated 2-rank run (the collectives answered locally for this rank and a fake other rank): the commit
    is skipped only when no rank regenerates, rank 0 commits in the first round and the other rank in the
    second, and a failing commit raises on its rank while the other rank gets a TeacherCacheError naming the
    folder (instead of waiting at a barrier)."""
    from ld3_ext.training import teacher as teacher_mod

    other = {"regenerating": False, "fails": False}
    calls = []

    def any_rank(flag):
        # call 1: "is any rank regenerating?"; calls 2 and 3: "did a commit fail?" after rounds 1 (rank 0 commits)
        # and 2 (the other ranks commit); the other rank commits in round 2 if this is rank 0, else in round 1
        calls.append(flag)
        if len(calls) == 1:
            return bool(flag or other["regenerating"])
        other_commit_round = 3 if rank0 else 2
        return bool(flag or (other["fails"] and len(calls) == other_commit_round))

    monkeypatch.setattr(teacher_mod.D, "get_world_size", lambda: 2)
    monkeypatch.setattr(teacher_mod.D, "is_rank0", lambda: rank0)
    monkeypatch.setattr(teacher_mod.D, "any_rank", any_rank)

    class FakeCache:
        def __init__(self, regenerating, fail=False):
            self.regenerating, self.fail, self.commits = regenerating, fail, 0

        def commit(self):
            self.commits += 1
            if self.fail:
                raise OSError("disk full")

    c = FakeCache(False)
    teacher_mod._commit(c, "cache")  # no rank regenerates: no commit round at all
    assert c.commits == 0 and calls == [False]
    calls.clear()
    other["regenerating"] = True  # only the other rank regenerates: this one still takes part in both rounds
    c = FakeCache(False)
    teacher_mod._commit(c, "cache")
    assert c.commits == 1 and len(calls) == 3
    calls.clear()
    c = FakeCache(True, fail=True)  # this rank's commit fails: it raises its own error
    with pytest.raises(OSError, match="disk full"):
        teacher_mod._commit(c, "cache")
    assert c.commits == 1
    calls.clear()
    other["fails"] = True  # the other rank's commit fails: this rank stops too, naming the folder
    c = FakeCache(True)
    with pytest.raises(TeacherCacheError, match="another rank could not swap in the regenerated teacher set in cache"):
        teacher_mod._commit(c, "cache")
    assert c.commits == (1 if rank0 else 0)  # rank 0 committed in round 1; the other rank never got to round 2


def _old_set_and_staged_set(d, chunks):
    """A complete set with settings S1 (zeros) in d and a complete staged regeneration to S2 (ones), not yet
    committed; returns the staging cache."""
    from ld3_ext.training.teacher import TeacherCache
    for settings, regenerate, value in (("S1", False, 0.0), ("S2", True, 1.0)):
        c = TeacherCache(d, {"s": settings}, n=2 * chunks, chunk_size=2)
        c.open(regenerate=regenerate)
        for i in range(chunks):
            c.write_chunk(i, {"x": torch.full((2,), value)})
    return c


def _commit_in_a_process(d, barrier, queue):
    from ld3_ext.training.teacher import TeacherCache
    c = TeacherCache(d, {"s": "S2"}, n=40, chunk_size=2)
    c.open(regenerate=True)  # resumes the complete staged set
    barrier.wait()
    try:
        c.commit()
        queue.put("ok")
    except Exception as e:  # noqa: BLE001 -- reported to the test
        queue.put(f"{type(e).__name__}: {e}")


def test_processes_sharing_the_folder_commit_one_at_a_time(tmp_path):
    """Several torchrun ranks on one node with a node-local folder commit the same staged set at once: the
    folder lock makes one swap it in and the others find nothing left to do (without it, most trials had a
    rank fail with FileNotFoundError, some left the folder without meta.json)."""
    import multiprocessing as mp

    from ld3_ext.training.teacher import TeacherCache
    ctx = mp.get_context("fork")
    for trial in range(3):
        d = str(tmp_path / f"c{trial}")
        _old_set_and_staged_set(d, 20)
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_commit_in_a_process, args=(d, barrier, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [queue.get(timeout=10) for _ in procs] == ["ok"] * 4
        new = TeacherCache(d, {"s": "S2"}, n=40, chunk_size=2)
        new.open()  # the new set is in place, complete
        assert all(torch.equal(new.load_chunk(i)["x"], torch.ones(2)) for i in range(20))
        assert not os.path.exists(os.path.join(d, ".regenerating"))


def test_a_staged_set_restarted_by_another_run_is_never_swapped_in(ring, tmp_path):
    """Run A regenerates while run B restarts the staged set with other settings: A's commit leaves the old
    set in place (with a warning) instead of swapping in B's incomplete set."""
    from ld3_ext.training.teacher import TeacherCache
    d = str(tmp_path)
    a = _old_set_and_staged_set(d, 2)
    TeacherCache(d, {"s": "S3"}, n=4, chunk_size=2).open(regenerate=True)  # B restarts the staged set
    with pytest.warns(UserWarning, match="replaced by another run"):
        a.commit()
    kept = TeacherCache(d, {"s": "S1"}, n=4, chunk_size=2)
    kept.open()
    assert all(torch.equal(kept.load_chunk(i)["x"], torch.zeros(2)) for i in range(2))


@pytest.mark.parametrize("lock_file", ["present", "absent"])
def test_a_cache_that_may_only_be_read_is_reused(ring, tmp_path, monkeypatch, lock_file):
    """A complete cache in a read-only folder (or another user's) was refused: the lock file was opened for
    writing.  The lock now falls back to a read-only descriptor (flock works on one), or to no lock when the file
    cannot be opened at all; reading needs no write.  (Root ignores permissions, so the refusals are simulated.)"""
    mix, s, model = ring
    fn, settings = make_teacher(model, "exact", reference=mix)
    a = _gen(model, Counting(fn), settings, str(tmp_path))
    lock = os.path.realpath(os.path.join(str(tmp_path), LOCK_FILE))
    if lock_file == "absent":
        os.remove(lock)
    real_open = os.open

    def read_only(path, flags, *args):
        if os.path.realpath(path) == lock and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise PermissionError(13, "Permission denied", path)
        if os.path.realpath(path) == lock and lock_file == "absent":
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", read_only)
    again = Counting(fn)
    b = _gen(model, again, settings, str(tmp_path))
    assert again.calls == 0
    for k in a:
        assert torch.equal(a[k], b[k])


def test_a_changed_callable_teacher_does_not_reuse_the_cache(ring, tmp_path):
    """A callable teacher was keyed by its __qualname__ only: partial(f, scale=-5) reused the pairs made with
    partial(f, scale=1) ("partial" both times), as two different lambdas did.  The key is now a fingerprint of
    what it computes, so the second is refused as a mismatch (and regenerates on request)."""
    import functools
    from ld3_ext.training.callable_identity import describe_callable
    mix, s, model = ring
    exact, _ = make_teacher(model, "exact", reference=mix)

    def scaled(x, scale=1.0, **kw):
        return scale * exact(x, **kw)
    fn1, set1 = make_teacher(model, functools.partial(scaled, scale=1.0))
    fn2, set2 = make_teacher(model, functools.partial(scaled, scale=-5.0))
    assert set1 != set2 and set1["name"].startswith("partial#")
    a = _gen(model, fn1, set1, str(tmp_path))
    with pytest.raises(TeacherCacheMismatch):
        _gen(model, fn2, set2, str(tmp_path))
    b = _gen(model, fn2, set2, str(tmp_path), regenerate=True)
    torch.testing.assert_close(b["target"], -5.0 * a["target"])
    # the same callable built again has the same key (the cache is reused across runs)
    assert make_teacher(model, functools.partial(scaled, scale=1.0))[1] == set1
    assert describe_callable(lambda x: 2 * x)[0] != describe_callable(lambda x: 3 * x)[0]
    # captured mutable state (a call counter) is not part of the key: the same run must reuse what it wrote
    calls = {"n": 0}

    def counting(x, **kw):
        calls["n"] += 1
        return x
    before = describe_callable(counting)
    counting(torch.zeros(1))
    assert describe_callable(counting) == before and before[1]


def test_a_callable_that_cannot_be_fingerprinted_is_named_with_a_warning(ring):
    mix, s, model = ring

    import functools
    import threading

    def teach(x, lock=None, **kw):
        return x
    with pytest.warns(UserWarning, match="identified by its name only"):
        _, settings = make_teacher(model, functools.partial(teach, lock=threading.Lock()))  # no stable description
    assert settings["name"] == "partial"


def _user_module(src: str, **values):
    """Functions defined at the top level of a user's script (module 'user_script') with these globals."""
    ns = {"__name__": "user_script", **values}
    exec(src, ns)
    return ns


def test_a_callables_fingerprint_covers_the_module_constants_and_helpers_it_reads():
    """A loss or teacher reading a module-level constant (SCALE = 1.0) kept its fingerprint when the constant was
    edited: the old checkpoint and cached teacher pairs were reused for the new function without a word (an
    independent review).  Constants and same-module helpers now count; modules, classes, other packages' functions
    and mutable state do not (a function reading only those keeps the fingerprint earlier versions gave it)."""
    import torch.nn.functional as F
    from ld3_ext.training.callable_identity import describe_callable
    src = ("def helper(x):\n    return K * x\n"
           "def loss(p, t):\n    return SCALE * helper(p - t).abs().flatten(1).sum(1)\n"
           "def fact(n):\n    return 1 if n <= 1 else n * fact(n - 1)\n"
           "def ping(n):\n    return n if n <= 0 else pong(n - 1)\n"
           "def pong(n):\n    return ping(n)\n"
           "def counted(x):\n    CALLS['n'] += 1\n    return F.mse_loss(x, x) + mse_loss(x, x) + torch.zeros(())\n"
           "def plain(x):\n    return F.mse_loss(x, x) + mse_loss(x, x) + torch.zeros(())\n")
    base = dict(K=2.0, SCALE=1.0, CALLS={"n": 0}, F=F, mse_loss=F.mse_loss, torch=torch)
    ns = _user_module(src, **base)
    first = describe_callable(ns["loss"])
    assert first[1]
    assert describe_callable(_user_module(src, **base)["loss"]) == first  # the same script run again: same key
    for change in (dict(SCALE=-1.0), dict(K=3.0), dict(SCALE=(1.0, 2.0))):
        assert describe_callable(_user_module(src, **{**base, **change})["loss"])[0] != first[0], change
    for name in ("fact", "ping"):  # recursion and mutual recursion are described, not refused
        assert describe_callable(ns[name])[1]
    before = describe_callable(ns["counted"])
    ns["counted"](torch.zeros(2))
    assert describe_callable(ns["counted"]) == before and ns["CALLS"]["n"] == 1  # mutable state is no part of it
    # a function reading only modules, classes and other packages' functions: those add nothing to its key
    bare = _user_module(src, K=2.0, SCALE=1.0, CALLS={"n": 0})
    assert describe_callable(ns["plain"]) == describe_callable(bare["plain"])


def test_a_teacher_reading_an_edited_constant_does_not_reuse_the_cache(ring, tmp_path):
    mix, s, model = ring
    exact, _ = make_teacher(model, "exact", reference=mix)
    src = "def teach(x, **kw):\n    return SCALE * exact(x, **kw)\n"
    fn1, set1 = make_teacher(model, _user_module(src, SCALE=1.0, exact=exact)["teach"])
    fn2, set2 = make_teacher(model, _user_module(src, SCALE=-1.0, exact=exact)["teach"])
    assert set1 != set2
    _gen(model, fn1, set1, str(tmp_path))
    with pytest.raises(TeacherCacheMismatch):
        _gen(model, fn2, set2, str(tmp_path))


def test_load_or_generate_teacher_guides_with_uncond_and_names_a_model_without_guidance():
    """load_or_generate_teacher(conditions=, uncond=): the guided model's pairs (uncond reaches every call; another
    uncond makes other pairs); uncond for a model with no guidance_scale is named before any network call."""
    def net(x, sigma, y=None):
        return x / (1 + sigma.reshape(-1, 1) ** 2) + y.to(x.dtype).reshape(-1, 1)
    cfg = TeacherConfig(n_train=2, n_valid=2)
    kw = dict(sample_shape=(3,), progress=False, dtype=torch.float64, model_name="guided-uncond")
    guided = wrap_model(net, EDM(), prediction="x0", time_input="sigma", cond_key="y", guidance_scale=2.0)
    cond = torch.tensor([1.0, 2.0, 3.0, 4.0])
    a = load_or_generate_teacher(guided, guided.schedule, cfg, conditions=cond, uncond=torch.tensor([0.0]), **kw)
    b = load_or_generate_teacher(guided, guided.schedule, cfg, conditions=cond, uncond=torch.tensor([-5.0]), **kw)
    assert torch.equal(a.train_noise, b.train_noise) and not torch.equal(a.train_target, b.train_target)
    assert torch.equal(a.train_cond, cond[:2]) and torch.equal(a.valid_cond, cond[2:])
    plain = wrap_model(net, EDM(), prediction="x0", time_input="sigma", cond_key="y")
    with pytest.raises(ValueError, match="and the model has no guidance_scale"):
        load_or_generate_teacher(plain, plain.schedule, cfg, conditions=cond, uncond=torch.tensor([0.0]), **kw)
