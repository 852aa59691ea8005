"""Schedule files: round trip, corruption/tampering detection, atomic writes, exports."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ld3_ext import EDM, VPDiscrete, discretizations, testbeds
from ld3_ext.atomic_io import atomic_write_json, read_json_checked
from ld3_ext.schedule_file import LearnedSchedule, ScheduleFileError, load_schedule
from ld3_ext.solvers import DPMSolverPP, Heun


def _sched(schedule=None, n=5, solver=None):
    schedule = schedule or EDM()
    solver = solver or DPMSolverPP(3, backend="reference")
    t = discretizations.edm(schedule, n)
    lam = schedule.lambda_(t)
    lam_m = lam.clone()
    lam_m[1:-1] += 0.01 * torch.arange(1, n, dtype=torch.float64)
    tm = schedule.inverse_lambda(lam_m)
    tm[0], tm[-1] = t[0], t[-1]
    return LearnedSchedule(t, tm, solver_config=solver.config(), nfe=solver.nfe(n), schedule_config=schedule.config(),
                           guidance_scale=None, model={"name": "m", "weights_hash": "ab" * 32, "hash_source": "name"},
                           time_mode="lambda", decoupled=True, training={"lr_xi": 0.005, "init": "logsnr"},
                           metrics={"valid_loss_best": 0.0123})


def test_round_trip_is_exact(tmp_path):
    s = _sched()
    path = s.save(str(tmp_path / "s.json"))
    r = load_schedule(path)
    assert torch.equal(r.timesteps, s.timesteps) and torch.equal(r.model_timesteps, s.model_timesteps)
    assert r.timesteps.dtype == torch.float64
    assert r.metadata == s.metadata
    md = r.metadata
    assert md["nfe"] == 5 and md["solver"]["name"] == "dpmpp" and md["schedule"]["type"] == "EDM"
    assert md["model"]["weights_hash"] == "ab" * 32 and md["training"]["lr_xi"] == 0.005
    assert md["library_version"] and md["metrics"]["valid_loss_best"] == 0.0123
    doc = json.load(open(path))
    assert doc["format"] == "ld3_ext.schedule" and doc["version"] == 1 and doc["checksum"].startswith("sha256:")


def test_metadata_is_a_copy_down_to_its_nested_dicts():
    """Editing what metadata returned (e.g. to log it with extra fields) leaves the schedule, its exports and
    its saved file as they were."""
    s = _sched()
    before = s.to_dict()
    md = s.metadata
    md["solver"]["order"] = 99
    md["model"]["weights_hash"] = "0" * 64
    md["training"]["lr_xi"] = 1.0
    md["metrics"].clear()
    assert s.to_dict() == before
    assert s.solver_config["order"] == before["solver"]["order"] and s.metrics == {"valid_loss_best": 0.0123}


def test_sampling_uses_both_grids(tmp_path):
    mix = testbeds.ring2d()
    sch = EDM()
    model = mix.model(sch)
    s = load_schedule(_sched(sch).save(str(tmp_path / "s.json")))
    x = mix.prior_noise(sch, 3, generator=torch.Generator().manual_seed(0))
    solver = s.solver(backend="reference")
    want = solver.sample(model, x, s.timesteps, model_timesteps=s.model_timesteps)
    torch.testing.assert_close(s.sample(model, x, solver=solver), want, rtol=0, atol=0)


def _rewrite(path, fn, fix_checksum):
    doc = json.load(open(path))
    fn(doc)
    if fix_checksum:
        atomic_write_json(path, doc)
    else:
        json.dump(doc, open(path, "w"))


@pytest.mark.parametrize("case,match", [
    ("truncated", "truncated|not valid JSON"),
    ("empty", "empty"),
    ("garbage", "not valid JSON"),
    ("tampered", "checksum"),
    ("no_checksum", "no checksum"),
    ("non_monotone", "strictly decreasing"),
    ("length", "needs 6 timesteps"),
    ("newer", "newer"),
    ("format", "not an ld3_ext schedule"),
    ("endpoint", "t_max"),
    ("nfe", "does not match"),
    ("nested", "must be a list of numbers"),
])
def test_corrupt_files_are_detected(tmp_path, case, match):
    path = _sched().save(str(tmp_path / "s.json"))
    raw = open(path, "rb").read()
    if case == "truncated":
        open(path, "wb").write(raw[: len(raw) // 2])
    elif case == "empty":
        open(path, "wb").write(b"")
    elif case == "garbage":
        open(path, "wb").write(b"\x00\xff" * 40)
    elif case == "tampered":
        _rewrite(path, lambda d: d["timesteps"].__setitem__(2, d["timesteps"][2] * 1.001), fix_checksum=False)
    elif case == "no_checksum":
        _rewrite(path, lambda d: d.pop("checksum"), fix_checksum=False)
    elif case == "non_monotone":
        _rewrite(path, lambda d: d["timesteps"].__setitem__(2, d["timesteps"][1] * 2), fix_checksum=True)
    elif case == "length":
        _rewrite(path, lambda d: d["model_timesteps"].pop(2), fix_checksum=True)
    elif case == "newer":
        _rewrite(path, lambda d: d.__setitem__("version", 99), fix_checksum=True)
    elif case == "format":
        _rewrite(path, lambda d: d.__setitem__("format", "something"), fix_checksum=True)
    elif case == "endpoint":
        _rewrite(path, lambda d: d["timesteps"].__setitem__(0, 70.0), fix_checksum=True)
    elif case == "nfe":
        _rewrite(path, lambda d: d.__setitem__("nfe", 7), fix_checksum=True)
    elif case == "nested":  # [[t0..t2], [t3..t5]] would flatten into a valid-looking grid
        _rewrite(path, lambda d: d.__setitem__("timesteps", [d["timesteps"][:3], d["timesteps"][3:]]),
                 fix_checksum=True)
    with pytest.raises(ScheduleFileError, match=match):
        load_schedule(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_schedule(str(tmp_path / "nope.json"))


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "s.json")
    old = _sched()
    old.save(path)
    before = open(path, "rb").read()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    new = _sched(n=6)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert [f for f in os.listdir(tmp_path) if f != "s.json"] == []  # no temp files left behind
    load_schedule(path)


def test_saving_onto_a_folder_names_the_folder_and_writes_nothing(tmp_path):
    """save() to a folder's name: a clear IsADirectoryError naming it (it was os.replace's error, naming a temp
    file of ours too), before any temp file is made; the folder and its contents are untouched."""
    t = discretizations.time_uniform(EDM(), 2)
    ls = LearnedSchedule(t, solver_config={"name": "euler"}, nfe=2, schedule_config=EDM().config())
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(IsADirectoryError, match=r"is a folder; give the name of a file") as info:
        ls.save(str(target))
    assert os.path.realpath(info.value.filename) == os.path.realpath(target) and ".tmp" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["out"] and (target / "keep.txt").read_text() == "mine"


def test_saving_to_a_name_ending_in_a_slash_writes_no_file(tmp_path):
    """save("new/") wrote a file named "new" (realpath drops the slash) and returned "new/", a path that
    load_schedule (open) then refused; open() itself refuses such a name."""
    path = os.path.join(str(tmp_path), "new/")  # a string: pathlib drops the trailing slash itself
    with pytest.raises(IsADirectoryError, match="ends with a path separator") as info:
        _sched().save(path)
    assert info.value.filename == path and os.listdir(tmp_path) == []


def test_atomic_write_keeps_the_file_mode(tmp_path):
    """A new file gets the mode a plain open() gives (0666 less the umask), not mkstemp's 0600, and a
    rewrite keeps the mode of the file it replaces (a shared schedule never turns private)."""
    path = str(tmp_path / "s.json")
    old_umask = os.umask(0o027)
    try:
        _sched().save(path)
    finally:
        os.umask(old_umask)
    assert os.stat(path).st_mode & 0o777 == 0o640
    os.chmod(path, 0o644)
    _sched(n=6).save(path)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert load_schedule(path).nfe == _sched(n=6).nfe


def test_atomic_write_removes_the_temps_of_killed_writes(tmp_path):
    """A SIGKILL between the temp file and the rename leaves .NAME.<random>.tmp: the next successful write of NAME
    removes it (once it is a minute old: another process may be writing it), and nobody else's files."""
    from ld3_ext.atomic_io import atomic_write_text
    target = tmp_path / "schedule.json"
    old = tmp_path / ".schedule.json.k1ll3d.tmp"
    young = tmp_path / ".schedule.json.writing.tmp"
    other = tmp_path / ".other.json.k1ll3d.tmp"
    mine = tmp_path / "notes.tmp"
    for f in (old, young, other, mine):
        f.write_text("x")
    for f in (old, other, mine):
        os.utime(f, (1, 1))  # long ago
    atomic_write_text(str(target), "{}")
    assert target.read_text() == "{}"
    assert not old.exists() and young.exists() and other.exists() and mine.exists()


def test_exports_edm():
    s = _sched(EDM(), n=5)
    with pytest.warns(UserWarning, match="decoupled model times"):  # _sched is decoupled
        kd = s.to_k_diffusion(dtype=torch.float64)
    torch.testing.assert_close(kd, s.timesteps)  # EDM: sigma = t
    assert kd.dtype == torch.float64 and bool((kd[1:] < kd[:-1]).all())
    with pytest.warns(UserWarning, match="decoupled model times"):
        kz = s.to_k_diffusion(append_zero=True)
    assert kz.shape == (7,) and kz[-1] == 0.0
    d = s.to_diffusers()
    assert len(d["sigmas"]) == 6 and d["sigmas"][-1] == pytest.approx(0.002)
    assert d["timestep_units"] == "t" and d["decoupled"] is True and d["num_inference_steps"] == 5
    assert d["final_sigmas_type"] == "sigma_min"
    assert "flow_sigmas" not in d and "flow_model_sigmas" not in d  # only flow schedules have flow units


def test_exports_vp_discrete_index_units():
    sch = VPDiscrete.linear()
    s = _sched(sch, n=4)
    d = s.to_diffusers()
    assert d["timestep_units"] == "index"
    torch.testing.assert_close(torch.tensor(d["timesteps"], dtype=torch.float64), s.timesteps * 1000 - 1)
    assert d["timesteps"][0] == pytest.approx(999.0) and d["timesteps"][-1] == pytest.approx(0.0, abs=1e-9)
    sig = torch.tensor(d["sigmas"], dtype=torch.float64)
    ac = sch.alphas_cumprod
    assert float(sig[0]) == pytest.approx(float(((1 - ac[-1]) / ac[-1]).sqrt()), rel=1e-9)
    assert float(sig[-1]) == pytest.approx(float(((1 - ac[0]) / ac[0]).sqrt()), rel=1e-9)  # diffusers' sigma_min
    assert bool((sig[1:] < sig[:-1]).all())


def test_heun_nfe_is_checked(tmp_path):
    s = _sched(solver=Heun(backend="reference"), n=3)
    assert s.nfe == 6
    load_schedule(s.save(str(tmp_path / "h.json")))


def test_constructor_rejects_bad_grids():
    with pytest.raises(ValueError, match="strictly decreasing"):
        LearnedSchedule([1.0, 2.0], solver_config={"name": "euler"}, nfe=1, schedule_config=EDM().config())
    with pytest.raises(ValueError, match="same length"):
        LearnedSchedule([2.0, 1.0], [2.0, 1.5, 1.0], solver_config={"name": "euler"}, nfe=1,
                        schedule_config=EDM().config())


def test_read_json_checked_detects_edits(tmp_path):
    p = str(tmp_path / "x.json")
    atomic_write_json(p, {"a": 1, "b": [1.5, 2.5]})
    assert read_json_checked(p)["b"] == [1.5, 2.5]
    txt = open(p).read().replace("2.5", "2.6")
    open(p, "w").write(txt)
    with pytest.raises(ValueError, match="checksum"):
        read_json_checked(p)


def test_guidance_scale_mismatch_warns():
    import warnings as _w
    import pytest as _pytest
    from ld3_ext.schedule_file import LearnedSchedule
    ls = LearnedSchedule(torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64), solver_config={"name": "euler", "order": 1},
                         nfe=2, schedule_config={"type": "EDM", "sigma_min": 0.002, "sigma_max": 80.0},
                         guidance_scale=7.5)
    with _pytest.warns(UserWarning, match="guidance scale 7.5"):
        assert not ls.check_guidance(3.0)
    with _pytest.warns(UserWarning, match="learned at guidance scale 7.5, and is being used without guidance"):
        assert not ls.check_guidance(None)
    with _w.catch_warnings():
        _w.simplefilter("error")
        assert ls.check_guidance(7.5)
    unguided = LearnedSchedule(ls.timesteps, solver_config=ls.solver_config, nfe=2, schedule_config=ls.schedule_config)
    with _pytest.warns(UserWarning, match="learned without guidance, and is being used at 3.0"):
        assert not unguided.check_guidance(3.0)
    for bad in ("7.5", True, [7.5]):
        with _pytest.raises(TypeError, match="guidance_scale must be a number or None"):
            ls.check_guidance(bad)
    with _w.catch_warnings():
        _w.simplefilter("error")
        assert ls.check_guidance(torch.tensor(7.5))  # a 0-d tensor is a number (as wrap_model takes it)


def test_save_names_a_bad_path(tmp_path):
    from ld3_ext.schedule_file import LearnedSchedule
    ls = LearnedSchedule(torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64), solver_config={"name": "euler", "order": 1},
                         nfe=2, schedule_config={"type": "EDM", "sigma_min": 0.002, "sigma_max": 80.0})
    for bad in (3, None, ["a.json"]):
        with pytest.raises(TypeError, match="path must be a str, bytes or os.PathLike"):
            ls.save(bad)
    assert ls.save(tmp_path / "s.json") == str(tmp_path / "s.json")
    # a bytes path, as load_schedule takes (it was a TypeError; serialization audit)
    assert ls.save(os.fsencode(tmp_path / "b.json")) == str(tmp_path / "b.json")
    assert load_schedule(os.fsencode(tmp_path / "b.json")).timesteps.equal(ls.timesteps)


def test_sample_refuses_another_noise_schedule_and_warns_for_another_solver():
    import warnings
    from ld3_ext import VPLinear
    vp = VPDiscrete.linear(0.00085, 0.012)
    learned = _sched(vp, n=4)
    mix = testbeds.ring2d()
    other = VPLinear(t_min=vp.t_min, t_max=vp.t_max)  # the same time range, other noise levels
    x = mix.prior_noise(vp, 3)
    with pytest.raises(ValueError, match="model: this schedule was learned on the noise schedule"):
        learned.sample(mix.model(other), x)
    with pytest.warns(UserWarning, match=r"solver: this grid was learned for .*DPMSolverPP.* at NFE 4; sampling with "
                                         r"Heun.* \(NFE 8\)"):
        learned.sample(mix.model(vp), x, solver=Heun())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file's own solver (another backend is the same solver): silent
        a = learned.sample(mix.model(vp), x)
        b = learned.sample(mix.model(vp), x, solver=DPMSolverPP(3, backend="fused"))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", [EDM(), VPDiscrete.linear(0.00085, 0.012)], ids=["edm", "vp"])
def test_k_diffusion_export_reproduces_the_schedules_sample(schedule):
    """to_k_diffusion() sigmas in k-diffusion's sample_dpmpp_2m give the schedule's own sample (same solver) when
    it is not decoupled, silently; a decoupled schedule warns (k-diffusion cannot carry its model times: ~3e-2
    off, dropped without a word before), and ld3_ext.sample with to_diffusers()["model_sigmas"] reproduces it."""
    import warnings
    from _oracles import load_kdiffusion_sampling
    from ld3_ext import functional as F
    K = load_kdiffusion_sampling()
    mix = testbeds.ring2d()
    model = mix.model(schedule)
    solver = DPMSolverPP(2, solver_type="midpoint", lower_order_final=False)
    decoupled = _sched(schedule, n=6, solver=solver)
    plain = LearnedSchedule(decoupled.timesteps, solver_config=solver.config(), nfe=6,
                            schedule_config=schedule.config())
    x_T = mix.prior_noise(schedule, 4).double()
    a0, a_end = schedule.alpha(plain.timesteps[[0, -1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sig = plain.to_k_diffusion(dtype=torch.float64)
    ref = plain.sample(model, x_T)
    out = K.sample_dpmpp_2m(F.to_denoiser(model), x_T / a0, sig, disable=True) * a_end
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    with pytest.warns(UserWarning, match="decoupled model times"):
        sig = decoupled.to_k_diffusion(dtype=torch.float64)
    ref = decoupled.sample(model, x_T)
    msig = torch.tensor(decoupled.to_diffusers()["model_sigmas"], dtype=torch.float64)
    out = F.sample(model, x_T / a0, sig, solver=solver, model_sigmas=msig) * a_end
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    kd = K.sample_dpmpp_2m(F.to_denoiser(model), x_T / a0, sig, disable=True) * a_end
    assert float((kd - ref).norm() / ref.norm()) > 1e-3  # what the warning is about


def _edm_grid(cfg_edits):
    sched = EDM()
    so, sc = DPMSolverPP(2, backend="reference").config(), sched.config()
    for (where, key), v in cfg_edits.items():
        (so if where == "solver" else sc)[key] = v
    return dict(timesteps=discretizations.edm(sched, 4), solver_config=so, nfe=4, schedule_config=sc)


def test_numpy_scalars_in_the_configs_are_stored_as_plain_json_values(tmp_path):
    """An np.int64 solver order (as from an array of settings) passed construction, then save() crashed with
    `TypeError: Object of type int64 is not JSON serializable` -- at the end of a training run."""
    np = pytest.importorskip("numpy")
    kw = _edm_grid({("solver", "order"): np.int64(2), ("schedule", "sigma_max"): np.float32(80.0)})
    s = LearnedSchedule(kw.pop("timesteps"), **kw)
    assert type(s.solver_config["order"]) is int and type(s.schedule_config["sigma_max"]) is float
    r = load_schedule(s.save(str(tmp_path / "s.json")))
    assert r.solver_config == DPMSolverPP(2, backend="reference").config() and r.schedule_config == EDM().config()


@pytest.mark.parametrize("where, key, value, match", [
    ("schedule", "sigma_min", torch.tensor(0.002), r"schedule_config\['sigma_min'\]: a Tensor"),
    ("schedule", "sigma_max", torch.tensor(80.0, dtype=torch.float64), r"schedule_config\['sigma_max'\]: a Tensor"),
    # not turned into None (json_safe's NaN), which a config would read as "the default"
    ("schedule", "sigma_min", float("nan"), r"schedule_config\['sigma_min'\]: nan"),
])
def test_a_config_value_json_cannot_hold_is_refused_at_construction_naming_the_key(tmp_path, where, key, value, match):
    kw = _edm_grid({(where, key): value})
    with pytest.raises(ValueError, match=match):
        LearnedSchedule(kw.pop("timesteps"), **kw)


def test_a_value_added_after_construction_is_refused_by_save_with_nothing_written(tmp_path):
    s = _sched()
    path = tmp_path / "s.json"
    path.write_text("the user's earlier file")
    s.training["lr"] = torch.tensor(0.1)  # a tensor put in after construction
    with pytest.raises(ValueError, match=r"training\['lr'\]: a Tensor"):
        s.save(str(path))
    assert path.read_text() == "the user's earlier file" and os.listdir(tmp_path) == ["s.json"]
    s.training["lr"] = 0.1
    assert load_schedule(s.save(str(path))).training["lr"] == 0.1


def test_to_k_diffusion_append_zero_must_be_a_bool():
    """append_zero='no' is truthy: it appended the 0."""
    from ld3_ext.schedule_file import LearnedSchedule
    ls = LearnedSchedule(torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64), solver_config={"name": "euler", "order": 1},
                         nfe=2, schedule_config={"type": "EDM", "sigma_min": 0.002, "sigma_max": 80.0})
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="append_zero must be a bool"):
            ls.to_k_diffusion(append_zero=bad)
    assert ls.to_k_diffusion(append_zero=True)[-1] == 0 and ls.to_k_diffusion().numel() == 3


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.timesteps.__setitem__(2, float("nan")), "timesteps"),
    (lambda s: s.timesteps.__setitem__(2, float(s.timesteps[1]) + 1.0), "strictly decreasing"),
    (lambda s: setattr(s, "nfe", 99), "nfe=99"),
])
def test_save_refuses_what_load_would_refuse_and_keeps_the_file(tmp_path, edit, field):
    """A schedule edited in place was written (atomically, over the good file) and then refused by load_schedule:
    the user's file was lost.  save() now runs the load's checks first."""
    s = _sched(EDM(), n=5)
    path = tmp_path / "s.json"
    s.save(str(path))
    good = path.read_bytes()
    loaded = load_schedule(str(path))
    edit(loaded)
    with pytest.raises(ValueError, match=f"save: this schedule would not load back.*{field}.*was not written"):
        loaded.save(str(path))
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temp file left


def test_save_refusal_names_the_reason_whole_when_the_path_holds_a_colon(tmp_path):
    """The reason was cut at the first ": " of the message, which the path may hold (diff review: "(1.json: nfe=99
    does not match ...)" for "run: 1.json")."""
    s = _sched(EDM(), n=5)
    s.nfe = 99
    path = tmp_path / "run: 1.json"
    with pytest.raises(ValueError) as info:
        s.save(str(path))
    msg = str(info.value)
    assert msg.startswith("save: this schedule would not load back (nfe=99") and "1.json:" not in msg, msg
    assert not path.exists()


@pytest.mark.parametrize("shape", [(1, 6), (2, 3)])
def test_a_grid_that_is_not_1d_is_refused(shape):
    """LearnedSchedule flattened a [1, N+1] or [2, k] grid silently (init= of LD3Trainer refuses it alike)."""
    t = discretizations.edm(EDM(), 5)
    with pytest.raises(ValueError, match=r"timesteps must be 1-D \(a grid of times\), got shape"):
        LearnedSchedule(t.reshape(shape), solver_config=DPMSolverPP(3).config(), nfe=5, schedule_config=EDM().config())


def test_a_file_far_too_large_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A wrong file given as the schedule (a checkpoint, a 1 GiB blob) was read whole, in several copies, before
    the JSON error (schedule-file audit: 2.3 GB of memory and 39 s for 1 GiB)."""
    import ld3_ext.schedule_file as sf
    path = _sched().save(str(tmp_path / "s.json"))
    monkeypatch.setattr(sf, "MAX_SCHEDULE_BYTES", os.path.getsize(path) - 1)
    monkeypatch.setattr(sf, "read_json_checked", lambda *a, **k: pytest.fail("the file was read"))
    with pytest.raises(ScheduleFileError, match="a schedule file is a few KiB"):
        load_schedule(path)
    monkeypatch.undo()  # at the limit and below: read as before
    assert load_schedule(path).nfe == _sched().nfe


@pytest.mark.parametrize("tail", [".", ".."])
def test_saving_to_a_name_ending_in_a_dot_component_writes_no_file(tmp_path, tail):
    """save("new/.") wrote a file named "new" (realpath folds the dot) and returned "new/.", which load_schedule
    (open) then refused; "a/new/.." wrote a file named "a"."""
    path = os.path.join(str(tmp_path), "a", "new", tail)
    with pytest.raises(IsADirectoryError, match="names a folder") as info:
        _sched().save(path)
    assert info.value.filename == path and os.listdir(tmp_path) == []
