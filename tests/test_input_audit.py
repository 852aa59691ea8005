"""Input-validation audit of the public API: a table of wrong inputs (type, shape, dtype, device via
"meta", range, ordering, NaN/Inf, missing/damaged files) for schedules, wrap_model, solvers,
discretizations, the fused ops, LD3Trainer, load_schedule, teacher caches and the CLI.  Every entry
must raise a Python exception (never crash, never pass silently) whose message names the argument."""
from __future__ import annotations

import math

import pytest
import torch

import ld3_ext
from ld3_ext import EDM, FlowMatching, VPCosine, VPLinear, discretizations as D, testbeds
from ld3_ext.coefficients import SolverSpec
from ld3_ext.schedule_file import load_schedule
from ld3_ext.solvers import DPMSolverPP, IPNDM, UniPC
from ld3_ext.training import LD3Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

NAN, INF = math.nan, math.inf
F64 = torch.float64


def _ring():
    g = testbeds.ring2d()
    s = EDM()
    return g, s, g.model(s)


MIX, SCHED, MODEL = _ring()
GRID = D.edm(SCHED, 5)
_BUF = torch.arange(16.0)  # out=_BUF[4:] overlaps x=_BUF[:-4] partly: refused, never a silently wrong result
X = torch.randn(3, 2, dtype=F64)
_BUF64 = torch.arange(8.0, dtype=F64)  # coef=_BUF64[:2] and out=x=_BUF64[2:]: one storage


def _sample(**kw):
    args = dict(model=MODEL, x_T=X, timesteps=GRID)
    args.update(kw)
    solver = args.pop("solver", DPMSolverPP(2, backend="reference"))
    return lambda: solver.sample(args.pop("model"), args.pop("x_T"), args.pop("timesteps"), **args)


def _ksample(**kw):
    """ld3_ext.sample, the k-diffusion-style entry: a denoiser D(x, sigma) -> x0 and a sigma grid."""
    args = dict(model=lambda x, sigma: x / (1 + sigma.reshape(-1, 1) ** 2), x=X, sigmas=torch.tensor([10.0, 1.0, 0.0]))
    args.update(kw)
    return lambda: ld3_ext.sample(args.pop("model"), args.pop("x"), args.pop("sigmas"), **args)


def _trainer(**kw):
    args = dict(teacher="exact", reference=MIX, sample_shape=MIX.event_shape, model_name="ring", n_train=4,
                n_valid=2, rounds_v1=1, rounds_v2=1, batch_size=2, progress=False)
    args.update(kw)
    model = args.pop("model", MODEL)
    solver = args.pop("solver", DPMSolverPP(2, backend="reference"))
    nfe = args.pop("nfe", 4)
    # construct and fit: some settings are only checked when training starts
    return lambda: LD3Trainer(model, None, solver, nfe, **args).fit()


def _fit(**kw):
    args = dict(teacher="exact", reference=MIX, sample_shape=MIX.event_shape, model_name="ring", n_train=4,
                n_valid=2, rounds_v1=1, rounds_v2=1, batch_size=2, progress=False)
    return lambda: LD3Trainer(MODEL, None, DPMSolverPP(2, backend="reference"), 4, **args).fit(**kw)


def _fused_update(*a, **kw):
    from ld3_ext import fused
    return lambda: fused.multistep_update(*a, **kw)


def _fused_table(*a):
    from ld3_ext import fused
    return lambda: fused.coefficient_table(*a)


def _meta(t):
    return t.to("meta")


# (id, thunk, exception types, regex that names the argument)
CASES = [
    # ---- schedules -------------------------------------------------------------------------
    ("EDM sigma_min<0", lambda: EDM(-1.0, 80.0), ValueError, "sigma_min"),
    ("EDM sigma_min>sigma_max", lambda: EDM(10.0, 1.0), ValueError, "sigma_max"),
    ("EDM sigma_max inf", lambda: EDM(0.002, INF), ValueError, "sigma_max"),
    ("EDM sigma_min nan", lambda: EDM(NAN, 80.0), ValueError, "sigma_min"),
    ("EDM sigma_min str", lambda: EDM("a", 80.0), (TypeError, ValueError), "sigma_min"),
    ("VPLinear beta order", lambda: VPLinear(beta_min=20.0, beta_max=0.1), ValueError, "beta_m"),
    ("VPLinear beta nan", lambda: VPLinear(beta_min=NAN), ValueError, "beta_min"),
    ("VPLinear t_min<=0", lambda: VPLinear(t_min=0.0), ValueError, "t_min"),
    ("VPLinear t range", lambda: VPLinear(t_min=0.5, t_max=0.1), ValueError, "t_m"),
    ("VPCosine t_max>=1", lambda: VPCosine(t_max=1.0), ValueError, "t_max"),
    ("VPCosine s<0", lambda: VPCosine(s=-0.5), ValueError, r"\bs\b"),
    ("FlowMatching shift<=0", lambda: FlowMatching(shift=0.0), ValueError, "shift"),
    ("FlowMatching shift nan", lambda: FlowMatching(shift=NAN), ValueError, "shift"),
    ("FlowMatching t_max=1", lambda: FlowMatching(t_max=1.0), ValueError, "t_max"),
    ("VPDiscrete both", lambda: ld3_ext.VPDiscrete(betas=[0.1, 0.2], alphas_cumprod=[0.9, 0.8]), ValueError,
     "betas|alphas_cumprod"),
    ("VPDiscrete betas out of range", lambda: ld3_ext.VPDiscrete(betas=[0.1, 1.5]), ValueError, "betas"),
    ("VPDiscrete acp increasing", lambda: ld3_ext.VPDiscrete(alphas_cumprod=[0.5, 0.9]), ValueError,
     "alphas_cumprod"),
    ("schedule_from_config bad", lambda: ld3_ext.schedules.schedule_from_config({"type": "nope"}), ValueError,
     "schedule type"),
    # ---- wrap_model ------------------------------------------------------------------------
    ("wrap fn not callable", lambda: ld3_ext.wrap_model(3, SCHED), TypeError, r"\bfn\b"),
    ("wrap schedule type", lambda: ld3_ext.wrap_model(lambda x, t: x, "edm"), TypeError, "schedule"),
    ("wrap prediction", lambda: ld3_ext.wrap_model(lambda x, t: x, SCHED, prediction="noise"), ValueError,
     "prediction"),
    ("wrap velocity on EDM", lambda: ld3_ext.wrap_model(lambda x, t: x, SCHED, prediction="velocity"), ValueError,
     "velocity"),
    ("wrap time_input", lambda: ld3_ext.wrap_model(lambda x, t: x, SCHED, time_input="tau"), ValueError,
     "time_input"),
    ("wrap index on EDM", lambda: ld3_ext.wrap_model(lambda x, t: x, SCHED, time_input="index"), ValueError,
     "time_input"),
    ("wrap guidance nan", lambda: ld3_ext.wrap_model(lambda x, t: x, SCHED, guidance_scale=NAN), ValueError,
     "guidance_scale"),
    ("wrap guidance str", lambda: ld3_ext.wrap_model(lambda x, t: x, SCHED, guidance_scale="big"),
     (TypeError, ValueError), "guidance_scale"),
    # ---- solvers ---------------------------------------------------------------------------
    ("solver order float", lambda: DPMSolverPP(2.0), TypeError, "order"),
    ("solver order range", lambda: DPMSolverPP(4), ValueError, "order"),
    ("ipndm order 0", lambda: IPNDM(0), ValueError, "order"),
    ("solver backend", lambda: UniPC(2, backend="cuda"), ValueError, "backend"),
    ("unipc variant", lambda: UniPC(2, variant="bh3"), ValueError, "variant"),
    ("dpmpp solver_type", lambda: DPMSolverPP(2, solver_type="rk4"), ValueError, "solver_type"),
    ("sample model raw fn", _sample(model=lambda x, t: x), TypeError, "model"),
    ("sample x_T list", _sample(x_T=[[0.0, 1.0]]), TypeError, "x_T"),
    ("sample x_T int", _sample(x_T=torch.ones(3, 2, dtype=torch.int64)), TypeError, "x_T"),
    ("sample x_T 0-d", _sample(x_T=torch.tensor(1.0, dtype=F64)), ValueError, "x_T"),
    ("sample x_T empty batch", _sample(x_T=torch.empty(0, 2, dtype=F64)), ValueError, "x_T"),
    ("sample x_T meta", _sample(x_T=_meta(X)), (ValueError, RuntimeError), "x_T|timesteps"),
    ("sample timesteps list", _sample(timesteps=GRID.tolist()), TypeError, "timesteps"),
    ("sample timesteps 2-D", _sample(timesteps=GRID[None]), ValueError, "timesteps"),
    ("sample timesteps int", _sample(timesteps=torch.tensor([80, 10, 1])), ValueError, "timesteps"),
    ("sample timesteps 1 entry", _sample(timesteps=GRID[:1]), ValueError, "timesteps"),
    ("sample timesteps increasing", _sample(timesteps=GRID.flip(0)), ValueError, "timesteps"),
    ("sample timesteps repeated", _sample(timesteps=torch.tensor([80.0, 10.0, 10.0, 0.002], dtype=F64)),
     ValueError, "timesteps"),
    ("sample timesteps nan", _sample(timesteps=torch.tensor([80.0, NAN, 0.002], dtype=F64)), ValueError,
     "timesteps"),
    ("sample timesteps inf", _sample(timesteps=torch.tensor([INF, 1.0, 0.002], dtype=F64)), ValueError,
     "timesteps"),
    ("sample timesteps out of range", _sample(timesteps=torch.tensor([500.0, 1.0, 0.002], dtype=F64)), ValueError,
     "timesteps"),
    ("sample timesteps meta", _sample(timesteps=_meta(GRID)), ValueError, "timesteps"),
    ("sample model_timesteps length", _sample(model_timesteps=GRID[:-1]), ValueError, "model_timesteps"),
    ("sample model_timesteps nan", _sample(model_timesteps=torch.full_like(GRID, NAN)), ValueError,
     "model_timesteps"),
    ("sample model_timesteps list", _sample(model_timesteps=GRID.tolist()), TypeError, "model_timesteps"),
    ("k-sample extra_args list", _ksample(extra_args=[1]), TypeError, "extra_args"),
    ("k-sample denoiser int", _ksample(model=3), TypeError, "model_or_denoiser"),
    ("k-sample x int", _ksample(x=torch.ones(3, 2, dtype=torch.int64)), TypeError, r"\bx\b"),
    ("k-sample sigmas 1 entry", _ksample(sigmas=torch.tensor([10.0])), ValueError, "sigmas"),
    ("k-sample sigmas increasing", _ksample(sigmas=torch.tensor([1.0, 10.0, 0.0])), ValueError, "sigmas"),
    ("k-sample sigmas negative", _ksample(sigmas=torch.tensor([5.0, -1.0])), ValueError, "sigmas"),
    ("k-sample sigmas nan", _ksample(sigmas=torch.tensor([5.0, NAN, 0.0])), ValueError, "sigmas"),
    ("k-sample solver unknown", _ksample(solver="nope"), ValueError, "solver"),
    ("k-sample model_sigmas length", _ksample(model_sigmas=torch.tensor([10.0, 0.0])), ValueError, "model_sigmas"),
    ("sample model_timesteps integer", _sample(model_timesteps=GRID.long()), ValueError,
     "model_timesteps: must be a floating tensor"),
    ("sample too few steps dpmpp3", _sample(solver=DPMSolverPP(3, backend="reference"), timesteps=GRID[[0, -1]]),
     None, lambda y: torch.equal(y, _sample(solver=DPMSolverPP(1, backend="reference"), timesteps=GRID[[0, -1]])())),
    # 1 step is allowed (the order drops): it is DPM-Solver++(1)'s step
    # ---- discretizations -------------------------------------------------------------------
    ("edm nfe 0", lambda: D.edm(SCHED, 0), ValueError, "nfe"),
    ("edm nfe float", lambda: D.edm(SCHED, 2.5), ValueError, "nfe"),
    ("edm rho neg", lambda: D.edm(SCHED, 4, rho=-1.0), ValueError, "rho"),
    ("discretization name", lambda: D.get_discretization("nope", SCHED, 4), ValueError, "discretization"),
    ("discretization schedule", lambda: D.logsnr_uniform("edm", 4), TypeError, "schedule"),
    # ---- SolverSpec / coefficient table / fused ops ----------------------------------------
    ("SolverSpec kind", lambda: SolverSpec("rk4"), ValueError, "kind"),
    ("SolverSpec order bool", lambda: SolverSpec("dpmpp", True), TypeError, "order"),
    ("ops backend", lambda: ld3_ext.ops.coefficient_table(SCHED, GRID, SolverSpec("dpmpp", 2), backend="gpu"),
     ValueError, "backend"),
    ("update x list", _fused_update([1.0], torch.ones(1, dtype=F64), []), TypeError, r"\bx\b"),
    ("update x int", _fused_update(torch.ones(3, dtype=torch.int32), torch.ones(1, dtype=F64), []), TypeError,
     r"\bx\b"),
    ("update history dtype", _fused_update(torch.ones(3), torch.ones(2, dtype=F64), [torch.ones(3, dtype=F64)]),
     TypeError, r"history\[0\]"),
    ("update history shape", _fused_update(torch.ones(3), torch.ones(2, dtype=F64), [torch.ones(4)]), ValueError,
     r"history\[0\]"),
    ("update history 5", _fused_update(torch.ones(3), torch.ones(5, dtype=F64), [torch.ones(3)] * 5), ValueError,
     "history"),
    ("update history meta", _fused_update(torch.ones(3), torch.ones(2, dtype=F64), [_meta(torch.ones(3))]),
     ValueError, r"history\[0\]"),
    ("update coef short", _fused_update(torch.ones(3), torch.ones(1, dtype=F64), [torch.ones(3)]), ValueError,
     "coef"),
    ("update coef 2-D", _fused_update(torch.ones(3), torch.ones(1, 2, dtype=F64), []), ValueError, "coef"),
    ("update coef int", _fused_update(torch.ones(3), torch.ones(2, dtype=torch.int64), []), TypeError, "coef"),
    ("update coef meta", _fused_update(torch.ones(3), _meta(torch.ones(2, dtype=F64)), []), ValueError, "coef"),
    ("update out shape", _fused_update(torch.ones(3), torch.ones(1, dtype=F64), [], out=torch.ones(4)), ValueError,
     r"\bout\b"),
    ("update out dtype", _fused_update(torch.ones(3), torch.ones(1, dtype=F64), [], out=torch.ones(3, dtype=F64)),
     ValueError, r"\bout\b"),
    ("update out not a tensor", _fused_update(torch.ones(3), torch.ones(1, dtype=F64), [], out=[0.0, 0.0, 0.0]),
     TypeError, r"\bout\b.*Tensor"),
    ("update out expanded", _fused_update(torch.ones(3), torch.ones(1, dtype=F64), [],
                                          out=torch.ones(1).expand(3)), RuntimeError, "overlap|memory location"),
    ("update out overlaps x", _fused_update(_BUF[:-4], torch.ones(1, dtype=F64), [], out=_BUF[4:]), RuntimeError,
     "overlap|memory location"),
    ("update out overlaps history", _fused_update(torch.ones(12), torch.ones(2, dtype=F64), [_BUF[:-4]],
                                                  out=_BUF[4:]), RuntimeError, "overlap|memory location"),
    ("update out shares coef", _fused_update(_BUF64[2:], _BUF64[:2], [], out=_BUF64[2:]), RuntimeError,
     r"\bout\b.*coef"),
    ("table timesteps 2-D", _fused_table(SCHED, GRID[None], SolverSpec("dpmpp", 2)), ValueError, "timesteps"),
    ("table timesteps 1 entry", _fused_table(SCHED, GRID[:1], SolverSpec("dpmpp", 2)), ValueError, "timesteps"),
    ("table timesteps list", _fused_table(SCHED, [1.0, 0.5], SolverSpec("dpmpp", 2)), ValueError, "timesteps"),
    ("table VPDiscrete", _fused_table(ld3_ext.VPDiscrete.linear(num_train_timesteps=20),
                                      torch.linspace(1, 0.1, 4, dtype=F64), SolverSpec("dpmpp", 2)),
     ValueError, "schedule"),
    # ---- LD3Trainer ------------------------------------------------------------------------
    ("trainer model raw fn", _trainer(model=lambda x, t: x), TypeError, "model"),
    ("trainer solver type", _trainer(solver=3), TypeError, "solver"),
    ("trainer solver name", _trainer(solver="rk45"), ValueError, "solver"),
    ("trainer nfe float", _trainer(nfe=4.0), TypeError, "nfe"),
    ("trainer nfe 1", _trainer(nfe=1), ValueError, "nfe"),
    ("trainer nfe bool", _trainer(nfe=True), TypeError, "nfe"),
    ("trainer time_mode", _trainer(time_mode="sigma"), ValueError, "time_mode"),
    ("trainer select_on", _trainer(select_on="best"), ValueError, "select_on"),
    ("trainer resume", _trainer(resume="yes"), ValueError, "resume"),
    ("trainer batch_size 0", _trainer(batch_size=0), ValueError, "batch_size"),
    ("trainer n_train 0", _trainer(n_train=0), ValueError, "n_train"),
    ("trainer rounds 0", _trainer(rounds_v1=0, rounds_v2=0), ValueError, "rounds"),
    ("trainer valid_every 0", _trainer(valid_every=0), ValueError, "valid_every"),
    ("trainer checkpoint_every -1", _trainer(checkpoint_every=-1), ValueError, "checkpoint_every"),
    ("trainer lr_xi nan", _trainer(lr_xi=NAN), ValueError, "lr_xi"),
    ("trainer lr_xi negative", _trainer(lr_xi=-1.0), ValueError, "lr_xi"),
    ("trainer loss name", _trainer(loss="l7"), ValueError, "loss"),
    ("trainer init name", _trainer(init="random"), ValueError, "init"),
    ("trainer teacher_dir+teacher_cache", _trainer(teacher_dir="a", teacher_cache="b"), ValueError,
     "teacher_dir|teacher_cache"),
    ("trainer cache_max_bytes negative", _trainer(cache_max_bytes=-5), ValueError, "cache_max_bytes"),
    ("trainer dtype int", _trainer(dtype=torch.int64), (TypeError, ValueError), "dtype"),
    ("trainer device meta", _trainer(device="meta"), (ValueError, RuntimeError), "device"),
    ("fit noise without target", _fit(noise=torch.randn(4, 2, dtype=F64)), ValueError, "noise|target"),
    ("fit noise list", _fit(noise=[[0.0, 0.0]] * 4, target=[[0.0, 0.0]] * 4), TypeError, "noise"),
    ("fit noise/target count", _fit(noise=torch.randn(4, 2, dtype=F64), target=torch.randn(3, 2, dtype=F64)),
     ValueError, "noise|target"),
    ("fit target nan", _fit(noise=torch.randn(4, 2, dtype=F64), target=torch.full((4, 2), NAN, dtype=F64)),
     ValueError, "target"),
    ("fit noise inf", _fit(noise=torch.full((4, 2), INF, dtype=F64), target=torch.randn(4, 2, dtype=F64)),
     ValueError, "noise"),
    ("fit noise shape", _fit(noise=torch.randn(4, 3, dtype=F64), target=torch.randn(4, 3, dtype=F64)),
     ValueError, "noise|sample_shape|shape"),
    ("fit single pair", _fit(noise=torch.randn(1, 2, dtype=F64), target=torch.randn(1, 2, dtype=F64)), ValueError,
     "pairs|noise"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_public_api_rejects_bad_input(case):
    name, thunk, exc, pattern = case
    if exc is None:  # accepted: `pattern` is then the check of the result
        assert pattern(thunk()), name
        return
    with pytest.raises(exc) as ei:
        thunk()
    msg = str(ei.value)
    import re
    assert re.search(pattern, msg), f"{name}: message does not name the argument ({pattern!r}): {msg!r}"


# ---- files -----------------------------------------------------------------------------------
def test_load_schedule_bad_files(tmp_path):
    from ld3_ext.schedule_file import ScheduleFileError
    with pytest.raises(FileNotFoundError, match="no_such"):
        load_schedule(str(tmp_path / "no_such.json"))
    with pytest.raises(TypeError, match="path"):
        load_schedule(12345)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(IsADirectoryError, match=r"schedule file .*dir\.json is a folder; give the name of the file"):
        load_schedule(str(tmp_path / "dir.json"))
    p = tmp_path / "bin.json"
    p.write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(ScheduleFileError, match="bin.json"):
        load_schedule(str(p))


def test_teacher_cache_bad_inputs(tmp_path):
    from ld3_ext.training.teacher import TeacherCacheError, TeacherConfig, load_or_generate_teacher
    with pytest.raises((TypeError, ValueError), match="model"):
        load_or_generate_teacher(lambda x, t: x, SCHED, TeacherConfig(n_train=2, n_valid=2))
    d = tmp_path / "t"
    d.mkdir()
    (d / "meta.json").write_text("{not json")
    with pytest.raises(TeacherCacheError, match="meta.json"):
        load_or_generate_teacher(MODEL, SCHED, TeacherConfig(solver="unipc", order=2, nfe=6, n_train=2, n_valid=2),
                                 cache_dir=str(d), progress=False, model_name="ring", sample_shape=(2,))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises((TeacherCacheError, OSError, ValueError), match="file"):
        load_or_generate_teacher(MODEL, SCHED, TeacherConfig(solver="unipc", order=2, nfe=6, n_train=2, n_valid=2),
                                 cache_dir=str(f), progress=False, model_name="ring", sample_shape=(2,))


CLI_CASES = [
    (["train", "--model", "gmm:nope"], "model"),
    (["train", "--model", "gmm:ring2d", "--nfe", "0"], "nfe"),
    (["train", "--model", "gmm:ring2d", "--order", "9"], "order"),
    (["train", "--model", "gmm:ring2d", "--threads", "0"], "threads"),
    (["train", "--model", "gmm:ring2d", "--n-train", "0"], "n.train"),
    (["eval", "--model", "gmm:ring2d", "--schedule", "/nonexistent/s.json"], "schedule"),
]


@pytest.mark.parametrize("argv,name", CLI_CASES, ids=[" ".join(a[:4]) for a, _ in CLI_CASES])
def test_cli_rejects_bad_arguments(argv, name, tmp_path, capsys):
    from ld3_ext import cli
    import re
    # the CLI either exits 2 through argparse/SystemExit or prints one "ld3 CMD: error: ..." line and returns 2
    try:
        rc, extra = cli.main(argv + ["--out", str(tmp_path / "o"), "--no-progress"]), ""
    except SystemExit as exc:
        rc, extra = exc.code, str(exc)
    err = capsys.readouterr().err + extra
    if rc in (0, None):
        pytest.fail("CLI accepted bad input")
    assert re.search(name, err), f"{argv}: message does not name the argument: {err!r}"


def test_case_count():
    """The report quotes this number."""
    assert len(CASES) + len(CLI_CASES) + 4 + 3 >= 100
