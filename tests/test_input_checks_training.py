"""Input checks of schedule files, LearnedSchedule, LD3Trainer's settings and the training losses: bad input
raises a clear exception naming the argument (or, for files, a ScheduleFileError naming the field and path)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from ld3_ext import EDM, discretizations, testbeds, wrap_model
from ld3_ext.atomic_io import atomic_write_json
from ld3_ext.schedule_file import LearnedSchedule, ScheduleFileError, load_schedule, validate_schedule_dict
from ld3_ext.solvers import DPMSolverPP
from ld3_ext.training import LD3Trainer, PseudoHuberLoss, get_loss

NAN = math.nan
SCHED = EDM()
SOLVER = DPMSolverPP(3, backend="reference")
GRID = discretizations.logsnr_uniform(SCHED, 5)
KW = dict(solver_config=SOLVER.config(), schedule_config=SCHED.config())


def _doc():
    return LearnedSchedule(GRID, nfe=5, **KW).to_dict()


# ---- schedule files ----------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("guidance_scale", "abc"), ("guidance_scale", True), ("model", [1, 2]), ("training", "abc"), ("metrics", [1]),
    ("metrics", "abc"), ("time_mode", 3), ("decoupled", "no"), ("library_version", 1), ("created", 5),
])
def test_load_schedule_rejects_malformed_optional_fields(tmp_path, field, value):
    path = str(tmp_path / "s.json")
    atomic_write_json(path, {**_doc(), field: value})  # a valid checksum: only the field is wrong
    with pytest.raises(ScheduleFileError, match=rf"s\.json.*{field}"):
        load_schedule(path)


def test_load_schedule_rejects_an_integer_beyond_float64(tmp_path):
    path = str(tmp_path / "s.json")
    d = _doc()
    atomic_write_json(path, {**d, "model_timesteps": [10 ** 400] + d["model_timesteps"][1:]})
    with pytest.raises(ScheduleFileError, match=r"s\.json.*model_timesteps"):
        load_schedule(path)


@pytest.mark.parametrize("d", [None, [1, 2], "abc"])
def test_validate_schedule_dict_rejects_a_non_dict(d):
    with pytest.raises(ScheduleFileError, match="must be a JSON object"):
        validate_schedule_dict(d)


def test_valid_file_still_loads(tmp_path):
    s = LearnedSchedule(GRID, nfe=5, guidance_scale=7, model={"name": "m"}, time_mode="lambda", decoupled=False,
                        training={"lr_xi": 0.005}, metrics={"valid": 0.1}, **KW)
    r = load_schedule(s.save(str(tmp_path / "s.json")))
    assert r.guidance_scale == 7.0 and torch.equal(r.timesteps, s.timesteps)


# ---- LearnedSchedule: the file's rules at construction --------------------------------------------
@pytest.mark.parametrize("args,exc,match", [
    (dict(nfe=-3), ValueError, "nfe"),
    (dict(nfe=2.9), TypeError, "nfe"),
    (dict(nfe="x"), TypeError, "nfe"),
    (dict(nfe=True), TypeError, "nfe"),
    (dict(nfe=17), ValueError, "nfe=17 does not match"),
    (dict(nfe=5, timesteps=GRID * 100), ValueError, "timesteps must run from t_max"),
    (dict(nfe=5, timesteps=GRID + 3j), TypeError, "timesteps"),
    (dict(nfe=5, timesteps=GRID.numpy() + 3j), TypeError, "timesteps"),
    (dict(nfe=5, timesteps=["a", "b"]), TypeError, "timesteps"),
    (dict(nfe=5, model_timesteps=GRID * 2), ValueError, "model_timesteps"),
    (dict(nfe=5, guidance_scale="a"), TypeError, "guidance_scale"),
    (dict(nfe=5, guidance_scale=math.inf), ValueError, "guidance_scale"),
    (dict(nfe=5, decoupled="no"), TypeError, "decoupled"),
    (dict(nfe=5, metrics=[("a", 1)]), TypeError, "metrics"),
    (dict(nfe=5, solver_config={"order": 3}), ValueError, "solver_config"),
    (dict(nfe=5, schedule_config={"type": "Nope"}), ValueError, "schedule_config"),
])
def test_learned_schedule_constructor_applies_the_file_rules(args, exc, match):
    kw = {**KW, **args}
    t = kw.pop("timesteps", GRID)
    with pytest.raises(exc, match=match):
        LearnedSchedule(t, kw.pop("model_timesteps", None), **kw)


def test_learned_schedule_sample_takes_a_solver_name():
    mix = testbeds.ring2d()
    model = mix.model(SCHED)
    ls = LearnedSchedule(GRID, nfe=5, **KW)
    x = mix.prior_noise(SCHED, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # make_solver("dpmpp") is the file's DPM-Solver++(3): no warning
        out = ls.sample(model, x, solver="dpmpp")
    assert torch.allclose(out, ls.sample(model, x))
    with pytest.raises(TypeError, match="solver"):
        ls.sample(model, x, solver=5)
    with pytest.raises(ValueError, match="solver"):
        ls.sample(model, x, solver="rk45")
    with pytest.raises(TypeError, match="x_T"):
        ls.sample(model, [1.0, 2.0])


# ---- LD3Trainer settings -----------------------------------------------------------------------
RING = testbeds.ring2d()
RING_MODEL = RING.model(SCHED)


def _trainer(**kw):
    args = dict(nfe=3, n_train=2, n_valid=2, rounds_v1=1, rounds_v2=0, progress=False, init="logsnr", model_name="ring",
                time_mode="lambda", teacher="exact", solver=DPMSolverPP(order=2), batch_size=1, valid_batch_size=2)
    args.update(kw)
    return LD3Trainer(RING_MODEL, **args)


@pytest.mark.parametrize("name,value,exc", [
    ("lr_decay", 2.0, ValueError), ("lr_decay", 0.0, ValueError), ("lr_decay", "a", TypeError),
    ("momentum", -5.0, ValueError), ("momentum", NAN, ValueError), ("momentum", 1.0, ValueError),
    ("clip_norm", -1.0, ValueError), ("clip_norm", NAN, ValueError), ("clip_norm", None, TypeError),
    ("lr_xi_min", -1.0, ValueError), ("lr_xi_c_min", NAN, ValueError), ("lr_xi", [1.0], TypeError),
    ("lr_xi", None, TypeError),  # failed in float() with a message naming nothing
    ("lr2_patience", "x", TypeError), ("lr2_patience", 0, ValueError),
    ("early_stop_patience", 2.5, TypeError), ("early_stop_patience", -1, ValueError),
    ("rounds_v1", 1.5, TypeError), ("rounds_v1", "1", TypeError), ("rounds_v2", True, TypeError),
    ("valid_every", True, ValueError), ("checkpoint_every", True, ValueError),
    ("sample_shape", (-2,), ValueError), ("sample_shape", (2.0,), ValueError), ("sample_shape", "ab", ValueError),
    ("sample_shape", 2, ValueError),
    ("callback", 5, TypeError), ("decoder", 5, TypeError),
    ("conditions", [1, 2], TypeError), ("conditions", torch.tensor(1.0), ValueError), ("uncond", [0.0], TypeError),
    ("uncond", torch.zeros(2, 1), ValueError),
    # a floor above the starting rate: the plateau "decay" raised the rate to it
    ("lr_xi_min", 1.0, ValueError), ("lr_xi_c_min", 5.0, ValueError),
    # failed inside os.path.join / string encoding, or ("") wrote into the working folder
    ("checkpoint_dir", 123, TypeError), ("checkpoint_dir", "", TypeError), ("checkpoint_dir", b"ck", TypeError),
    ("teacher_cache", 123, TypeError), ("model_name", 123, TypeError), ("model_name", " ", TypeError),
    # a string went through float(); a [[...]] grid was flattened
    ("win_rate", "0.3", TypeError), ("init", [[80.0, 5.0, 0.1, 0.002]], ValueError),
])
def test_trainer_rejects_bad_settings_in_the_constructor(name, value, exc):
    with pytest.raises(exc, match=name):
        _trainer(**{name: value})


@pytest.mark.parametrize("kw,match", [
    (dict(teacher="exakt"), r"teacher must be 'solver', 'exact' or a callable, got 'exakt'"),
    (dict(teacher="solver", teacher_discretization="logsnrr"), r"teacher_discretization: .*got 'logsnrr'"),
])
def test_trainer_names_a_bad_teacher_setting_in_the_constructor(kw, match):
    # refused by fit() before, the discretization as "discretization must be one of ..." (not the argument's name)
    with pytest.raises(ValueError, match=match):
        _trainer(**kw)


@pytest.mark.parametrize("noise,target,match", [
    (torch.randn(6, 2, dtype=torch.complex128), torch.randn(6, 2, dtype=torch.float64),
     "noise must be a real floating tensor"),
    (torch.ones(6, 2, dtype=torch.bool), torch.randn(6, 2, dtype=torch.float64), "noise must be a real floating"),
    (torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64),
     r"target has per-sample shape \(3,\) but noise \(2,\)"),
])
def test_fit_refuses_pairs_it_cannot_train_on(noise, target, match):
    """Complex noise lost its imaginary part to a cast (a warning only), bool noise became 0/1 noise, and a target
    of another shape failed at the first loss without naming target."""
    with pytest.raises((TypeError, ValueError), match=match):
        _trainer().fit(noise, target)


def test_trainer_accepts_valid_edge_settings():
    tr = _trainer(momentum=0.0, lr_decay=1.0, lr_xi_min=0.0, lr_xi_c_min=0, clip_norm=1e6, lr2_patience=1,
                  early_stop_patience=1, rounds_v1=0, rounds_v2=1, valid_every=1, sample_shape=torch.Size([2]),
                  callback=lambda trainer, info: None, decoder=lambda x: x, conditions=torch.zeros(4, 1))
    assert tr.sample_shape == (2,) and tr.momentum == 0.0


def test_uncond_needs_a_guided_model():
    """uncond without the model's guidance_scale was passed to the network (a **kwargs network swallowed it):
    an unguided schedule learned silently.  Refused at construction, naming uncond; a guided model takes it."""
    with pytest.raises(ValueError, match="uncond is the unconditional input of classifier-free guidance.*guidance_scale"):
        _trainer(conditions=torch.zeros(4, 1), uncond=torch.zeros(1, 1))
    guided = wrap_model(lambda x, t, cond: 0.5 * x, EDM(), prediction="x0", guidance_scale=2.0)
    tr = LD3Trainer(guided, nfe=3, n_train=2, n_valid=2, progress=False, model_name="ring-guided",
                    solver=DPMSolverPP(order=2), teacher="solver", conditions=torch.zeros(4, 1), uncond=torch.zeros(1, 1))
    assert tr.uncond.shape == (1, 1)


# ---- losses ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["l2", "l1", "pseudo_huber"])
def test_losses_refuse_to_broadcast(name):
    with pytest.raises(ValueError, match="pred and target"):
        get_loss(name)(torch.randn(2, 3), torch.randn(1, 3))
    assert get_loss(name)(torch.randn(2, 3), torch.randn(2, 3)).shape == (2,)


@pytest.mark.parametrize("name", ["l2", "l1", "pseudo_huber"])
def test_losses_need_a_batch_dimension(name):
    with pytest.raises(ValueError, match="pred and target"):
        get_loss(name)(torch.tensor(1.0), torch.tensor(2.0))


@pytest.mark.parametrize("c,exc", [(-1.0, ValueError), (NAN, ValueError), (0.0, ValueError), (math.inf, ValueError),
                                   ("a", TypeError), (True, TypeError)])
def test_pseudo_huber_c_is_checked(c, exc):
    with pytest.raises(exc, match="c must"):
        PseudoHuberLoss(c)


def test_pseudo_huber_valid_c():
    p = torch.zeros(2, 3)
    assert torch.allclose(PseudoHuberLoss(1)(p, p + 1), torch.full((2,), 1.0))


def test_trainer_rates_take_a_0d_tensor_as_before():
    """A 0-d tensor is a number (float() reads it), as before the setting checks; a 1-element list is not."""
    import ld3_ext
    from ld3_ext.training import LD3Trainer
    model = ld3_ext.testbeds.ring2d().model(ld3_ext.EDM())
    tr = LD3Trainer(model, None, ld3_ext.DPMSolverPP(order=2), 4, lr_xi=torch.tensor(0.1), gamma=torch.tensor(0.1),
                    model_name="ring", progress=False)
    assert float(tr.lr_xi) == pytest.approx(0.1)
    with pytest.raises(TypeError, match="lr_xi"):
        LD3Trainer(model, None, ld3_ext.DPMSolverPP(order=2), 4, lr_xi=[0.1], model_name="ring", progress=False)


# ---- LD3Trainer flags are real bools ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["decoupled", "checkpoint_model", "progress", "regenerate_teacher",
                                  "checkpoint_decoder"])
@pytest.mark.parametrize("value", ["False", 0, 1, None])
def test_trainer_flags_must_be_bools(name, value):
    """bool("False") is True: a string (or a number) given for a flag is refused, not read as True."""
    with pytest.raises(TypeError, match=rf"^{name} must be a bool \(True or False\)"):
        _trainer(**{name: value})


def test_trainer_flags_take_bools_and_numpy_bools():
    import numpy as np
    tr = _trainer(decoupled=np.False_, checkpoint_model=np.True_, progress=False)
    assert tr.decoupled is False and tr.solver.checkpoint_model is True and tr.progress is False


# ---- the training teacher spends exactly its NFE -----------------------------------------------------------
def _heun():
    from ld3_ext.solvers import Heun
    return Heun(backend="reference")


def test_trainer_refuses_an_odd_heun_teacher_nfe_before_any_work():
    """Heun spends 2 evaluations a step: teacher_nfe=21 used to run 20, silently; it is refused naming the setting."""
    for ts in ("heun", _heun()):
        with pytest.raises(ValueError, match=r"cannot use exactly teacher_nfe=21 .*; use teacher_nfe=20 or "
                                             r"teacher_nfe=22"):
            _trainer(teacher="solver", teacher_solver=ts, teacher_nfe=21)
    assert _trainer(teacher="solver", teacher_solver="heun", teacher_nfe=20).teacher_nfe == 20
    assert _trainer(teacher="exact", teacher_solver="heun", teacher_nfe=21).teacher == "exact"  # not used
    with pytest.raises(ValueError, match=r"^teacher_nfe must be an int >= 1"):
        _trainer(teacher="solver", teacher_nfe=0)
    with pytest.raises(TypeError, match="teacher_solver"):  # found now, not when the teacher set is made
        _trainer(teacher="solver", teacher_solver=5)


def test_make_teacher_spends_exactly_the_nfe(tmp_path):
    from ld3_ext.training.teacher import TeacherConfig, load_or_generate_teacher, make_teacher
    calls = []
    model = wrap_model(lambda x, t: (calls.append(1), 0.5 * x)[1], SCHED, prediction="x0")
    fn, settings = make_teacher(model, "solver", _heun(), 20)
    fn(torch.randn(2, 2, dtype=torch.float64))
    assert len(calls) == 20 and settings["nfe"] == 20
    with pytest.raises(ValueError, match=r"cannot use exactly nfe=21"):
        make_teacher(model, "solver", _heun(), 21)
    with pytest.raises(ValueError, match=r"cannot use exactly teacher_nfe=21"):
        make_teacher(model, "solver", _heun(), 21, nfe_name="teacher_nfe")
    cache = tmp_path / "teacher"
    with pytest.raises(ValueError, match=r"cannot use exactly TeacherConfig\.nfe=21"):
        load_or_generate_teacher(RING_MODEL, SCHED, TeacherConfig(solver="heun", nfe=21, n_train=2, n_valid=2),
                                 cache_dir=str(cache), progress=False, model_name="ring")
    assert not cache.exists()  # refused before the cache was made


# ---- load_schedule applies the content rules once -----------------------------------------------------------
def test_load_schedule_checks_the_contents_once(tmp_path, monkeypatch):
    from ld3_ext import schedule_file
    calls = []
    real = schedule_file._check_contents
    monkeypatch.setattr(schedule_file, "_check_contents", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    path = LearnedSchedule(GRID, nfe=5, **KW).save(str(tmp_path / "s.json"))
    calls.clear()
    loaded = load_schedule(path)
    assert calls == [1] and torch.equal(loaded.timesteps, GRID)
    LearnedSchedule(GRID, nfe=5, **KW)  # a schedule made in Python is still checked
    assert calls == [1, 1]


@pytest.mark.parametrize("field, value, match", [
    ("nfe", 17, "nfe=17 does not match 5 steps of dpmpp"),
    ("decoupled", "no", "decoupled must be None or a bool"),
    ("solver", {"name": "rk45"}, "solver: invalid solver config"),
    ("timesteps", "reversed", "timesteps must be strictly decreasing"),
])
def test_a_bad_schedule_file_gives_the_same_error(tmp_path, field, value, match):
    d = _doc()
    d[field] = d["timesteps"][::-1] if value == "reversed" else value
    path = str(tmp_path / "s.json")
    atomic_write_json(path, d)
    with pytest.raises(ScheduleFileError, match=rf"^schedule file .*s\.json: {match}"):
        load_schedule(path)


def test_trainer_methods_that_need_the_teacher_data_say_to_call_fit_first():
    """radius(), settings() and current_schedule() failed with a bare AttributeError before fit()."""
    tr = _trainer()
    for name in ("radius", "settings", "current_schedule"):
        with pytest.raises(RuntimeError, match=r"call fit\(\) first"):
            getattr(tr, name)()
    assert _trainer(radius=0.5).radius() == 0.5  # a given radius needs no data


@pytest.mark.parametrize("which", ["noise", "target", "valid_noise", "valid_target"])
def test_fit_names_a_meta_tensor(which):
    """The meta device (a stand-in for a tensor holding no values) failed in the finite check's item(), naming
    nothing."""
    pairs = {"noise": torch.randn(4, 2), "target": torch.randn(4, 2), "valid_noise": torch.randn(2, 2),
             "valid_target": torch.randn(2, 2)}
    pairs[which] = pairs[which].to("meta")
    with pytest.raises(ValueError, match=f"^{which} is on the meta device"):
        _trainer().fit(**pairs)


def test_reference_solution_names_a_meta_x_T():
    with pytest.raises(ValueError, match="x_T is on the meta device"):
        testbeds.ring2d().reference_solution(EDM(), torch.randn(3, 2).to("meta"))


@pytest.mark.parametrize("name", ["checkpoint_dir", "teacher_cache"])
def test_fit_names_a_folder_it_cannot_create_before_any_work(tmp_path, name, monkeypatch):
    """A checkpoint_dir (or teacher cache) under a file failed inside fit() with os.makedirs' OSError, which names
    a path but not the argument; now fit() checks both folders first (no teacher made, no round trained)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    bad = str(afile / "sub")
    made = []
    monkeypatch.setattr(LD3Trainer, "_fit", lambda self, *a, **k: made.append(1))
    with pytest.raises(NotADirectoryError, match=rf"^\[Errno \d+\] {name} '.*afile/sub': cannot create it or write there"):
        _trainer(**{name: bad}).fit()
    assert made == []


def test_fit_with_given_pairs_does_not_create_the_teacher_cache(tmp_path, monkeypatch):
    """The teacher cache is checked (and so created) only when fit() will generate the teacher."""
    monkeypatch.setattr(LD3Trainer, "_fit", lambda self, *a, **k: None)
    tr = _trainer(checkpoint_dir=str(tmp_path / "ck"))
    tr.fit(torch.randn(4, 2), torch.randn(4, 2))
    assert (tmp_path / "ck").is_dir() and not (tmp_path / "ck" / "teacher").exists()
    tr.fit()
    assert (tmp_path / "ck" / "teacher").is_dir()


def test_a_complete_teacher_cache_in_a_read_only_folder_is_still_reused(tmp_path, monkeypatch):
    """The folder check must not refuse what the cache supports: a complete cache that may only be read (found by a
    diff review: the write probe refused it before the cache could open it read-only)."""
    import os
    import tempfile
    cache = str(tmp_path / "teacher")
    _trainer(teacher_cache=cache).fit()  # makes the cache
    real_tf, real_open = tempfile.TemporaryFile, os.open

    def ro_tf(*a, dir=None, **k):  # root ignores permissions: creating a file in the folder is made to fail
        if dir is not None and os.path.realpath(dir) == os.path.realpath(cache):
            raise PermissionError(13, "Permission denied", dir)
        return real_tf(*a, dir=dir, **k)

    def ro_open(path, flags, *a):
        if os.path.dirname(os.path.realpath(path)) == os.path.realpath(cache) and \
                flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *a)
    monkeypatch.setattr(tempfile, "TemporaryFile", ro_tf)
    monkeypatch.setattr(os, "open", ro_open)
    assert _trainer(teacher_cache=cache).fit() is not None
    # an empty read-only folder is still refused before any work, naming the argument
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    cache = empty
    with pytest.raises(PermissionError, match=r"teacher_cache '.*empty': cannot create it or write there"):
        _trainer(teacher_cache=empty).fit()


def test_an_incomplete_teacher_cache_in_a_read_only_folder_is_refused_first(tmp_path, monkeypatch):
    """Only a complete cache may sit in a read-only folder: one with its metadata and some chunks needs writing and is
    refused before any work (the metadata alone let the check pass, and the run failed with EROFS after generating
    the next chunk).  A complete one passes, also with regenerate_teacher (a cache of the same settings is kept
    as it is; one of other settings fails at once, making its staging folder)."""
    import os
    import tempfile

    from ld3_ext.training.teacher import cache_is_complete
    cache = str(tmp_path / "teacher")
    _trainer(teacher_cache=cache, n_train=8, n_valid=4).fit()
    chunks = sorted(f for f in os.listdir(cache) if f.startswith("chunk_"))
    assert cache_is_complete(cache) and not cache_is_complete(str(tmp_path / "nothing"))
    real_tf = tempfile.TemporaryFile

    def ro_tf(*a, dir=None, **k):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(cache):
            raise PermissionError(13, "Permission denied", dir)
        return real_tf(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "TemporaryFile", ro_tf)
    made = []
    monkeypatch.setattr(LD3Trainer, "_fit", lambda self, *a, **k: made.append(1))
    _trainer(teacher_cache=cache, n_train=8, n_valid=4, regenerate_teacher=True).fit()
    assert made == [1]
    made.clear()
    os.remove(os.path.join(cache, chunks[-1]))
    assert not cache_is_complete(cache)
    with pytest.raises(PermissionError, match=r"teacher_cache '.*teacher': cannot create it or write there"):
        _trainer(teacher_cache=cache, n_train=8, n_valid=4).fit()
    assert made == []


@pytest.mark.parametrize("name", ["schedule.json", "ld3_trainer_state.safetensors", "last_good_schedule.json"])
def test_a_folder_where_a_checkpoint_file_goes_is_refused_before_any_work(tmp_path, monkeypatch, name):
    """checkpoint_dir/schedule.json as a folder failed after the whole training (and every rerun trained again)."""
    ck = tmp_path / "ck"
    (ck / name).mkdir(parents=True)
    made = []
    monkeypatch.setattr(LD3Trainer, "_fit", lambda self, *a, **k: made.append(1))
    with pytest.raises(IsADirectoryError, match=rf"checkpoint_dir '.*ck': {name} there is a folder"):
        _trainer(checkpoint_dir=str(ck)).fit()
    assert made == []


def test_cache_is_complete_names_a_bad_directory(tmp_path):
    from ld3_ext.training.teacher import cache_is_complete
    with pytest.raises(TypeError, match="cache_is_complete: directory must be a str or os.PathLike, got int"):
        cache_is_complete(3)
    assert not cache_is_complete(tmp_path) and not cache_is_complete(str(tmp_path / "none"))


@pytest.mark.parametrize("teacher,teacher_nfe,warned", [("solver", 5, True), ("solver", 6, True), ("solver", 7, False),
                                                        ("exact", 2, False)])
def test_trainer_warns_about_a_teacher_no_finer_than_the_student(teacher, teacher_nfe, warned):
    """LD3Trainer(teacher_nfe=3, nfe=6) trained without a word (`ld3 train` warned; API audit): the student is fitted
    to a solve no finer than its own.  An exact teacher uses no teacher_nfe."""
    bed = testbeds.ring2d()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LD3Trainer(bed.model(SCHED), SCHED, SOLVER, nfe=6, teacher=teacher, teacher_nfe=teacher_nfe, reference=bed,
                   progress=False)
    said = [str(w.message) for w in caught if "is not above" in str(w.message)]
    assert said == ([f"teacher_nfe={teacher_nfe} is not above the student's nfe=6: the teacher should be a much finer "
                     "solve (e.g. teacher_nfe=24)"] if warned else []), said


def test_ld3_train_says_it_once_naming_the_flags(tmp_path, capsys, monkeypatch):
    from ld3_ext import cli
    from ld3_ext.training import trainer

    def stop(self, *a, **k):
        raise RuntimeError("stopped after construction")
    monkeypatch.setattr(trainer.LD3Trainer, "fit", stop)
    monkeypatch.delenv("LD3_TRACEBACK", raising=False)
    with pytest.raises(RuntimeError, match="stopped after construction"):
        cli.main(["train", "--model", "digits", "--nfe", "6", "--teacher-nfe", "5", "--no-progress",
                  "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert err.count("is not above") == 1 and "--teacher-nfe 5 is not above the student's --nfe 6" in err, err


@pytest.mark.parametrize("scale,warned", [(1.0, True), (80.0, False), (30.0, True), (170.0, True)])
def test_fit_says_when_the_noise_is_not_at_the_prior_scale(scale, warned):
    """fit(noise, target) takes noise in model space (prior_std * randn): unit noise on EDM (prior 80) trained on a
    start 80x too close to the data without a word (API audit).  Off by 2x or more is said; the prior's own is not."""
    g = torch.Generator().manual_seed(0)
    bed = testbeds.GaussianMixture(means=torch.randn(3, 16, generator=g, dtype=torch.float64),
                                   stds=torch.full((3, 16), 0.3, dtype=torch.float64))
    tr = LD3Trainer(bed.model(SCHED), SCHED, SOLVER, nfe=3, rounds_v1=1, rounds_v2=0, progress=False,
                    init="logsnr", time_mode="lambda")
    noise = scale * torch.randn(40, 16, generator=g, dtype=torch.float64)  # 20 training pairs: 320 values
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(noise, torch.zeros_like(noise))
    said = [str(w.message) for w in caught if "prior std" in str(w.message)]
    assert len(said) == warned, said
    if warned:
        assert said[0].startswith("noise has RMS ")
        assert "but the schedule's prior std is 80: fit(noise, target) takes the noise in model space" in said[0]
        assert caught[[str(w.message) for w in caught].index(said[0])].filename == __file__  # the caller's line
