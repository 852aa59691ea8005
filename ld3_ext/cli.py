"""The ``ld3`` command: sample, teacher, train, eval, export-diffusers.

    ld3 sample  --model gmm:ring2d --solver dpmpp --order 3 --nfe 6 --out runs/ring
    ld3 train   --model digits --solver dpmpp --order 3 --nfe 6 --out runs/digits
    ld3 eval    --out runs/digits
    ld3 teacher --model digits --out runs/digits
    ld3 export-diffusers runs/sd/schedule.json --scheduler-config MODEL/scheduler --out runs/sd/scheduler

``--model`` takes a built-in name, ``diffusers:PATH`` or ``package.module:factory`` (see
``ld3_ext.models.registry``).  Runs under ``torchrun`` too (``python -m ld3_ext.cli ...``).  Exit statuses: 0 done,
1 the run failed, 2 a usage error (bad flag, unusable input file or --out), 130 Ctrl-C (``EXIT_CODES``).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
import time
import traceback
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from ._checks import seed as check_seed
from .atomic_io import atomic_write_text, json_safe
from .discretizations import DISCRETIZATIONS
from .training.losses import LOSSES
from .training.trainer import MAX_NFE
from .solvers import ORDERLESS, SOLVERS, as_solver, solver_from_config

BASELINES = ["time_uniform", "time_quadratic", "logsnr", "edm"]
SOLVER_CHOICES = list(SOLVERS)
MODEL_BASELINES = ["dmn", "gits"]
GITS_SAMPLES = 64  # GITS' teacher batch (its default)
SAMPLE_MODEL = "gmm:ring2d"  # `ld3 sample` without --model or a schedule file

EXIT_CODES = """exit status:
  0    success
  1    the run failed (training diverged, the model gave non-finite output, out of memory, disk full, ...)
  2    usage error: a bad flag value, or an input file or --out path that cannot be used (argparse's code too)
  130  interrupted (Ctrl-C); 143 on SIGTERM.  Files are written whole or not at all: an interrupt keeps the
       earlier file, and train/teacher resume from their last checkpoint when rerun
set LD3_TRACEBACK=1 to see the full traceback of an error."""


class UsageError(SystemExit):
    """A flag value or input the command cannot use: ``ld3 CMD: error: MESSAGE`` and exit status 2, like argparse's
    own errors (a SystemExit with code 2, so embedding code sees what argparse would raise)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def _add_common(p: argparse.ArgumentParser, solver_defaults: bool = True, model: Optional[str] = "digits",
                out: str = "runs/ld3", sample: bool = False):
    p.add_argument("--model", default=model, help="built-in name (digits, gmm:ring2d, gmm:digits64, "
                   "gmm:random3072; a gmm model takes @edm, @vp_linear, @vp_cosine or @flow for another noise "
                   "schedule), diffusers:PATH or package.module:factory (a conditional model's factory sets "
                   "model.draw_conditions = fn(n, generator) -> tensor [n, ...]; README) (default: "
                   + (model or "the one the schedule file records" + (f", else {SAMPLE_MODEL}" if sample else "")) + ")")
    p.add_argument("--out", default=out, help=f"output directory (default: {out})")
    p.add_argument("--seed", type=int, default=0, help="noise seed (0 <= seed < 2**63; sample and eval draw their "
                   "noises from streams of their own, never the teacher's training or validation noises; default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--no-progress", action="store_true",
                   help="disable progress bars (they are off anyway when stderr is not a terminal: logs, CI)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads, 1 to 1024 (default: 1 for the small built-in models, whose tiny ops run "
                        "fastest on one thread and are not slowed by other processes; torch's default otherwise)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (diffusers models)")
    p.add_argument("--dtype", default="auto", choices=sorted(STATE_DTYPES) + ["auto"],
                   help="precision of the solver states; auto: the network's weights' dtype, float64 for the gmm test "
                        "beds, float32 for other models without weights (a network that casts its input to its half "
                        "weights itself may run on float32 states) (default: auto)")
    if solver_defaults:
        p.add_argument("--solver", default="dpmpp", choices=SOLVER_CHOICES, help="default: dpmpp")
        p.add_argument("--order", type=int, default=None,
                       help="solver order (default 3; dpmpp 1-3, unipc 1-3, ipndm 1-4; euler and heun have none)")
        p.add_argument("--variant", default=None, choices=["bh1", "bh2"], help="UniPC B(h) (default: bh1)")
        p.add_argument("--nfe", type=int, default=6, help="network evaluations per sample (default: 6)")
    p.add_argument("--teacher-solver", default=None, choices=SOLVER_CHOICES,
                   help="solver of the high-NFE teacher (default: unipc; not used for the analytic gmm models; "
                        "sample and eval with a schedule file use the teacher it records unless a --teacher-* flag "
                        "is given)")
    p.add_argument("--teacher-order", type=int, default=None, help="default: 3")
    p.add_argument("--teacher-nfe", type=int, default=None, help="default: 20")


STATE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
TEACHER_DEFAULTS = {"teacher_solver": "unipc", "teacher_order": 3, "teacher_nfe": 20}
MAX_TEACHER_NFE = 10_000  # a reference solve of the digits model at 10,000 evaluations already takes minutes
# beyond these torch failed with a C++ backtrace naming no flag (a count past int64) or OpenMP segfaulted
# (--threads 100000); no run can hold 10**9 samples or use more than 1024 threads
MAX_COUNT = 10 ** 9
MAX_THREADS = 1024


def _fill_teacher_defaults(args) -> None:
    """The --teacher-* flags not given take their defaults; ``args.teacher_given`` says whether any was given
    (then they name the teacher; else a schedule file's recorded teacher does, see :func:`_use_recorded_teacher`)."""
    args.teacher_given = any(getattr(args, k, None) is not None for k in TEACHER_DEFAULTS)
    if getattr(args, "teacher_order", None) is not None and getattr(args, "teacher_solver", None) in ORDERLESS:
        raise UsageError(f"--teacher-order: {args.teacher_solver} has no order setting")  # as --order: not ignored
    for k, v in TEACHER_DEFAULTS.items():
        if hasattr(args, k) and getattr(args, k) is None:
            setattr(args, k, v)


def _use_recorded_teacher(args, learned) -> None:
    """Score against the teacher the schedule was fitted to (its file records it) when no --teacher-* flag says
    otherwise: a schedule trained with --teacher-nfe 40 is not judged against a 20-NFE solve."""
    from .discretizations import DISCRETIZATIONS
    rec = (learned.training or {}).get("teacher") if learned is not None else None
    if args.teacher_given or rec is None:
        return
    if not isinstance(rec, dict) or rec.get("kind") not in ("solver", "exact", "callable", "given"):
        # a record no trainer writes (damaged or hand-edited): said, as for a solver record that cannot be rebuilt
        print(f"note: the teacher this schedule records ({rec!r}) is not one ld3 can read; scoring against the "
              "default teacher (or pass --teacher-solver/--teacher-order/--teacher-nfe)", file=sys.stderr)
        return
    if rec.get("kind") != "solver":  # the exact solution of a test bed, a Python callable or given pairs
        return
    cfg, nfe, grid = rec.get("solver"), rec.get("nfe"), rec.get("discretization")
    usable = isinstance(cfg, dict) and cfg.get("name") in SOLVER_CHOICES and isinstance(nfe, int) \
        and isinstance(grid, str) and grid in DISCRETIZATIONS
    if usable:
        try:
            solver_from_config(cfg).exact_steps(nfe, "nfe")  # a damaged record must not be blamed on --teacher-nfe
        except (TypeError, ValueError):
            usable = False
    if not usable:  # said, not silent: the schedule is then scored against another teacher than its own
        print(f"note: the teacher this schedule records ({rec}) cannot be rebuilt here; scoring against the "
              "default teacher (or pass --teacher-solver/--teacher-order/--teacher-nfe)", file=sys.stderr)
        return
    args.teacher_config, args.teacher_solver, args.teacher_nfe = cfg, cfg["name"], nfe
    args.teacher_order = cfg.get("order")
    args.teacher_discretization = grid  # ld3 train's teachers are on logSNR; the Python API may use another


def _make_solver(args):
    """--solver/--order/--variant as a Solver; a flag the solver has no use for is refused, not ignored."""
    name = args.solver
    if name in ORDERLESS and args.order is not None:
        raise UsageError(f"--order: {name} has no order setting")
    if name != "unipc" and args.variant is not None:
        raise UsageError(f"--variant: only unipc has variants (bh1, bh2), not {name}")
    order = 3 if args.order is None else args.order
    try:
        return as_solver(name, order=order, variant=args.variant or "bh1")
    except ValueError as exc:
        raise UsageError(f"--solver {name} --order {order}: {exc}")


def _make_teacher_solver(args):
    cfg = getattr(args, "teacher_config", None)
    if cfg is not None:  # the teacher a schedule file records (checked by _use_recorded_teacher)
        return solver_from_config(cfg)
    if not hasattr(args, "teacher_given"):  # parsed without main() (tests, embedding code)
        _fill_teacher_defaults(args)
    try:
        return as_solver(args.teacher_solver, order=args.teacher_order)
    except ValueError as exc:
        raise UsageError(f"--teacher-solver {args.teacher_solver} --teacher-order {args.teacher_order}: {exc}")


def _exact_steps(solver, nfe: int, flag: str) -> int:
    """The solver's steps for exactly ``nfe`` evaluations (Heun spends two a step), or an error naming ``flag``."""
    try:
        return solver.exact_steps(nfe, flag)
    except ValueError as exc:
        raise UsageError(f"{exc}")


def _teacher_steps(args):
    """The teacher solver and its steps for --teacher-nfe (the NFE it names, as the training teacher spends it)."""
    solver = _make_teacher_solver(args)
    return solver, _exact_steps(solver, args.teacher_nfe, "--teacher-nfe")


def _teacher_kind(model) -> str:
    """The teacher that `ld3 train`, `ld3 teacher`, `ld3 sample` and `ld3 eval` all use: the exact ODE solution where
    the model has one (the analytic test beds), else a high-NFE solver: the --teacher-* flags', or, for sample and
    eval with a schedule file and no such flag, the one the file records (:func:`_use_recorded_teacher`)."""
    return "exact" if getattr(model, "testbed", None) is not None else "solver"


def _teacher_desc(model, args) -> str:
    if _teacher_kind(model) == "exact":
        return "exact ODE solution"
    grid = _teacher_grid(args)
    return f"{_make_teacher_solver(args)!r} {args.teacher_nfe} NFE {'logSNR' if grid == 'logsnr' else grid}"


def _teacher(model, schedule, x_T, args, kw=None):
    """Exact ODE solution for analytic test beds, else a high-NFE solve (no grad); ``kw``: the per-sample
    conditions of a conditional model (:func:`_condition_kwargs`)."""
    if _teacher_kind(model) == "exact":
        return model.testbed.reference_solution(schedule, x_T, rtol=1e-7, atol=1e-7)
    from .discretizations import get_discretization
    solver, steps = _teacher_steps(args)
    grid = get_discretization(_teacher_grid(args), schedule, steps)
    with torch.no_grad():
        return solver.sample(model, x_T, grid.to(x_T.device), **(kw or {}))


def _teacher_grid(args) -> str:
    """The teacher's discretization: logSNR (ld3 train's), or the one a schedule file's teacher records."""
    return getattr(args, "teacher_discretization", None) or "logsnr"


def _stream_seed(purpose: str, seed: int) -> int:
    """A generator seed for ``purpose``'s noises: the teacher draws its training and validation noises with the
    plain --seed, so sample and eval draw from hashed streams that cannot reproduce them (an LD3 schedule
    scored on its own training noises would look better than it is)."""
    import hashlib
    digest = hashlib.sha256(f"ld3 {purpose} noises, seed {seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _prior(model, schedule, n, seed, device, purpose: str):
    g = torch.Generator().manual_seed(_stream_seed(purpose, seed))
    shape = _sample_shape(model)
    return (schedule.prior_std() * torch.randn(n, *shape, generator=g, dtype=torch.float64)).to(device)


def _conditions(model, n: int, seed: int, purpose: str) -> Optional[torch.Tensor]:
    """A conditional model's per-sample conditions for ``n`` samples, or None for an unconditional one.

    A factory makes its model conditional for the CLI by setting ``model.draw_conditions = fn`` with
    ``fn(n, generator) -> tensor [n, ...]`` (class labels: ``torch.randint(0, 10, (n,), generator=generator)``);
    they reach the network under ``model.cond_key``.  Each purpose draws from a stream of its own (the teacher
    pairs' conditions, `ld3 teacher`'s and `ld3 train`'s, are the same; eval's and sample's are others), seeded
    by --seed, so runs repeat and an LD3 schedule is not scored on its training conditions."""
    draw = getattr(model, "draw_conditions", None)
    if draw is None:
        return None
    if not callable(draw):
        raise UsageError(f"--model: the model's draw_conditions must be a callable (n, generator) -> tensor [n, ...], "
                         f"got {type(draw).__name__}")
    g = torch.Generator().manual_seed(_stream_seed(f"{purpose} conditions", seed))
    try:
        cond = draw(n, g)
    except Exception as exc:  # the factory's function: one line naming it (LD3_TRACEBACK=1 shows the rest)
        raise UsageError(f"--model: the model's draw_conditions({n}, generator) raised {type(exc).__name__}: "
                         f"{exc}") from exc
    if not isinstance(cond, torch.Tensor) or cond.dim() < 1 or cond.shape[0] != n:
        got = f"shape {tuple(cond.shape)}" if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise UsageError(f"--model: the model's draw_conditions({n}, generator) must return a tensor [{n}, ...] "
                         f"(one condition per sample), got {got}")
    if cond.is_floating_point() and not bool(torch.isfinite(cond).all()):
        raise UsageError(f"--model: the model's draw_conditions({n}, generator) returned NaN or Inf")
    return cond.detach()


def _condition_kwargs(model, cond: Optional[torch.Tensor], device) -> Dict[str, Any]:
    """The model kwargs carrying ``cond`` (none for an unconditional model)."""
    return {} if cond is None else {model.cond_key: cond.to(device)}


def _sample_shape(model):
    tb = getattr(model, "testbed", None)
    if tb is not None:
        return tb.event_shape
    shape = getattr(model, "sample_shape", None)
    if shape is None:
        raise UsageError("--model: the model does not say its sample shape; set `model.sample_shape = (C, H, W)` "
                         "in your factory")
    return tuple(shape)


def _rmse(a, b):
    # at least float32: in float16 the squares of errors below ~2e-4 are subnormal or zero (a half model's states)
    from .ops import _opmath
    return (a.to(_opmath(a.dtype)) - b.to(_opmath(b.dtype))).flatten(1).pow(2).mean(1).sqrt()


def _median(x: torch.Tensor) -> float:
    """The median (the mean of the two middle values for an even count; torch.median returns the lower one)."""
    return float(torch.quantile(x.double(), 0.5))


def _say(*parts) -> None:
    """print() to stdout, flushed; a reader that left (`ld3 sample | head -1`) must not stop the run before its
    files are written: the rest of the output then goes nowhere."""
    try:
        print(*parts, flush=True)
    except BrokenPipeError:
        try:  # the exit-time flush of what is still buffered must not raise again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stdout without a file descriptor (a notebook's, pytest's)
            pass


def _fmt(x):
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _table(rows: List[Dict], cols: List[str]) -> str:
    """Rows keep full-precision numbers (eval.json records them); only the printed table rounds."""
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    for row in cells:
        out.append("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    return "\n".join(out)


def _load(args):
    from .models import ModelSpecError, canonical_spec, is_builtin, load_model
    args.model = canonical_spec(args.model)  # a bare mixture name means gmm:NAME; one spelling in files
    threads = args.threads if args.threads is not None else (1 if is_builtin(args.model) else None)
    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(threads)
    try:
        model, schedule = load_model(args.model, device=args.device,
                                     guidance_scale=getattr(args, "guidance_scale", None))
    except ModelSpecError as exc:
        raise UsageError(f"{exc}")
    # the states in the network's precision, as LD3Trainer's default: a float32 state for a factory model with
    # float16/bfloat16 (or float64) weights failed inside the network ("mat1 and mat2 must have the same dtype")
    from .wrappers import default_state_dtype
    asked = getattr(args, "dtype", "auto")
    return model, schedule, default_state_dtype(model) if asked == "auto" else STATE_DTYPES[asked]


def _weightless_name(model, args) -> Optional[str]:
    """A model without weights to hash (the analytic test beds, weightless factories) is identified by its
    --model string (the library would warn, a warning meant for Python callers, and use the function's name)."""
    if isinstance(model, torch.nn.Module) and any(isinstance(v, torch.Tensor) for v in model.state_dict().values()):
        return None  # identified by the hash of its weights (not computed here: that can take seconds)
    # the --model string, not the wrapped function's name: two factories may wrap functions of one name
    return args.model


def _baseline_grids(names, schedule, nfe, model=None, solver=None, seed=0, dtype=None):
    from .discretizations import get_discretization
    grids = {}
    for name in names:
        if name in MODEL_BASELINES:
            try:
                from .baselines import baseline_timesteps
                if name == "dmn":  # the bound of the solver's order, as the trainer's DMN start
                    from .baselines.dmn import order_for
                    grids[name] = baseline_timesteps(name, schedule, nfe,
                                                     **({} if solver is None else {"order": order_for(solver)}))
                else:  # GITS searches with its own one-step (Euler) cost, as in the paper
                    # the fine grid must hold at least nfe intervals (60 by default: an NFE-61 schedule failed)
                    # in the states' dtype (the weights' dtype, as GITS' own default; it moves its start to the model's
                    # device)
                    # a conditional model: conditions of GITS' own teacher batch, from a stream of their own
                    kw = _condition_kwargs(model, _conditions(model, GITS_SAMPLES, seed, "gits"),
                                           next((p.device for p in model.parameters()), "cpu"))
                    grids[name] = baseline_timesteps(name, schedule, nfe, model=model,
                                                     sample_shape=_sample_shape(model), seed=seed,
                                                     dtype=dtype, fine_steps=max(60, nfe),
                                                     n_samples=GITS_SAMPLES, model_kwargs=kw)
            except ImportError:
                continue
        else:
            grids[name] = get_discretization(name, schedule, nfe)
    return grids


# ------------------------------------------------------------------------------------------------
def _check_schedule_fits(learned, path: str, model, schedule, spec: str) -> None:
    """A schedule learned on another noise schedule means other noise levels: refused.  One learned for another
    model may still help (a schedule transfers between related models): a warning."""
    if not schedule.same_as(learned.schedule_config):
        from .schedules import describe_schedule
        raise ValueError(f"--schedule: {path} was learned on the noise schedule "
                         f"{describe_schedule(learned.schedule_config)}, but the model {spec} uses {schedule!r}")
    rec = learned.model
    if rec.get("hash_source") == "state_dict" and isinstance(model, torch.nn.Module):
        from .training.teacher import state_dict_hash
        same, what = state_dict_hash(model) == rec.get("weights_hash"), "weights"
    else:  # a file may spell the model another way (gmm:ring2d@edm, written before that spelling was canonical)
        from .models import canonical_spec
        same, what = (rec.get("spec") is None or canonical_spec(rec["spec"]) == spec), "--model"
    if not same:
        print(f"warning: {path} was learned for the model {rec.get('spec') or rec.get('name')!r}; {spec!r} has other "
              f"{what}: the schedule may be far from the best for it", file=sys.stderr)


def _progress(args) -> bool:
    """Progress bars on a terminal only: redirected to a file (a job log, CI) each redraw is a new line."""
    return not args.no_progress and sys.stderr.isatty()


def _model_from_file(learned, path: str) -> str:
    """The --model a schedule file records, for a command given no --model.  Only a built-in or a diffusers folder
    is taken from a file: a package.module:factory would make reading a file (one downloaded, say) import and run
    code, so the user names it on the command line; and a file recording no model is refused, not guessed."""
    from .models import canonical_spec, is_builtin
    spec = (learned.model or {}).get("spec")
    if not spec:
        raise UsageError(f"--model: {path} does not record which model it was trained for; pass --model")
    if not isinstance(spec, str):
        raise UsageError(f"--model: {path} records no valid model (its model spec is {spec!r}, not a name); pass "
                         f"--model")
    if not (is_builtin(spec) or canonical_spec(spec).startswith("diffusers:")):
        raise UsageError(f"--model: {path} records the model factory {spec!r}; a schedule file never makes ld3 "
                         f"import code: pass --model {spec} yourself if you trust it")
    return spec


def _check_out_dir(path: str, files: Tuple[str, ...] = ()) -> None:
    """--out made and writable before any work (os.makedirs succeeds on an existing read-only folder; the results
    would then be lost after the whole run, with an error naming a temporary file); ``files``, the names the command
    will write there, must not be folders (the final rename would fail after all the work)."""
    from .atomic_io import check_writable_dir
    try:
        check_writable_dir(path)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None
    for name in files:
        target = os.path.join(path, name)
        if os.path.isdir(target):
            raise UsageError(f"--out: {target} is a folder; {name} cannot be written there")
        real = os.path.realpath(target)
        if os.path.islink(target) and os.path.dirname(real) != os.path.realpath(path):
            # a link's target is what is rewritten, in its own folder: a read-only one failed after the whole run
            try:
                check_writable_dir(os.path.dirname(real))
            except OSError as exc:
                raise UsageError(f"--out: {target} links to {real}, whose folder cannot be written "
                                 f"({exc.strerror or exc})") from None


def _missing_folders(path: str) -> List[str]:
    """The folders ``_check_out_dir``'s makedirs would create for ``path``, deepest first.  Walked on the path as
    written, as makedirs walks it (``a/../b`` creates ``a`` too); a prefix whose real location exists already
    (``a/..``, or ``b`` there) is not one of them."""
    missing, p = [], path
    while p and not os.path.lexists(p):
        if not os.path.lexists(os.path.realpath(p)):
            missing.append(p)
        head = os.path.dirname(p.rstrip(os.sep)) if p.rstrip(os.sep) else ""
        if head == p:
            break
        p = head
    return missing


def _schedule_not_a_folder(path: str, flag: str) -> None:
    """``flag`` names where the path came from: --schedule, or --out (whose schedule.json is the default)."""
    if os.path.isdir(path):  # else a bare IsADirectoryError, naming no flag
        hint = os.path.join(path, "schedule.json")
        hint = f" (pass --schedule {hint})" if flag == "--schedule" and os.path.isfile(hint) else ""
        raise UsageError(f"{flag}: {path} is a folder, not a schedule file{hint}")


def cmd_sample(args) -> int:
    from .plotting import sample_grid
    learned = None
    if args.schedule:
        from .schedule_file import load_schedule
        if not os.path.exists(args.schedule):
            raise UsageError(f"--schedule: no schedule file at {args.schedule}")
        _schedule_not_a_folder(args.schedule, "--schedule")
        learned = load_schedule(args.schedule)
    elif os.path.isfile(os.path.join(args.out, "schedule.json")):
        # `ld3 eval --out DIR` scores DIR's schedule by itself; sample compares it only when asked
        print(f"note: {os.path.join(args.out, 'schedule.json')} is not sampled: pass --schedule "
              f"{os.path.join(args.out, 'schedule.json')} to compare it with the baselines", file=sys.stderr)
    # as `ld3 eval`: without --model, the model the schedule file records (without a file, the built-in ring)
    if not args.model:
        args.model = _model_from_file(learned, args.schedule) if learned is not None else SAMPLE_MODEL
    model, schedule, dtype = _load(args)
    try:
        solver = _make_solver(args)
    except UsageError:
        if learned is None:
            raise
        # the schedule's own solver is used: flags that do not fit the default --solver (a --variant for the
        # file's UniPC) get the note below, not a refusal naming a solver the user never chose
        solver = None
    if learned is not None:
        # the learned grid belongs to the solver and NFE it was trained for: everything is compared at those
        _check_schedule_fits(learned, args.schedule, model, schedule, args.model)
        learned.check_guidance(model.guidance_scale)
        given = getattr(args, "given_flags", set()) & {"--solver", "--order", "--variant", "--nfe"}
        if given and (solver is None or learned.solver().config() != solver.config() or learned.nfe != args.nfe):
            print(f"note: --schedule: comparing at the schedule's own solver {learned.solver()!r} and NFE "
                  f"{learned.nfe} (the --solver/--order/--variant/--nfe given are not used)", file=sys.stderr)
        solver, args.nfe = learned.solver(), learned.nfe
        _use_recorded_teacher(args, learned)
    steps = _exact_steps(solver, args.nfe, "--nfe")
    from .solvers.base import MultistepSolver
    order = solver.order if isinstance(solver, MultistepSolver) else None  # Heun's 2 is no warm-up
    if learned is None and order is not None and 1 <= steps < order:
        # sampling is well defined (the warm-up orders), but the table's label would overstate the order;
        # `ld3 train` refuses such a schedule outright
        print(f"note: --nfe {args.nfe}: {steps} step(s) never get past the warm-up of order-{order} "
              f"{type(solver).__name__}, so every row runs at orders 1..{steps}", file=sys.stderr)
    _check_out_dir(args.out, ("samples.png",))  # a bad --out fails now, not after the sampling
    x_T = _prior(model, schedule, args.n, args.seed, args.device, "sample").to(dtype)
    kw = _condition_kwargs(model, _conditions(model, args.n, args.seed, "sample"), args.device)
    t0 = time.time()
    target = _teacher(model, schedule, x_T, args, kw)
    _say(f"teacher: {_teacher_desc(model, args)} ({time.time() - t0:.1f}s)")
    grids = _baseline_grids(BASELINES, schedule, steps)
    if learned is not None:
        grids["ld3"] = learned.timesteps
    rows, samples = [], {"teacher": target}
    for name, t in grids.items():
        tm = learned.solver_model_timesteps() if (name == "ld3" and learned is not None) else None
        with torch.no_grad():
            x = solver.sample(model, x_T, t.to(args.device), model_timesteps=None if tm is None else tm.to(args.device),
                              **kw)
        err = _rmse(x, target)
        samples[name] = x
        rows.append({"schedule": name, "NFE": solver.nfe(steps), "mean RMSE": err.mean().item(),
                     "median RMSE": _median(err)})
    _say(f"{args.model}  solver={solver!r}  n={args.n}")
    _say(_table(rows, ["schedule", "NFE", "mean RMSE", "median RMSE"]))
    png = sample_grid(samples, os.path.join(args.out, "samples.png"), title=f"{args.model} {solver.name} NFE {args.nfe}")
    _say(f"wrote {png}")
    return 0


def _init_distributed(args):
    """Join torchrun's process group (a no-op in a single process); under torchrun ``--device cuda`` becomes
    this process's ``cuda:LOCAL_RANK`` (nccl), ``--device cpu`` uses gloo."""
    from . import distributed
    info = distributed.init_from_env(device=args.device)
    if info.distributed and str(args.device).startswith("cuda"):
        args.device = str(info.device)
    return info


class TeacherNotCached(RuntimeError):
    """``ld3 teacher`` generated its pairs but could not leave them in the cache (exit status 1)."""


def cmd_teacher(args) -> int:
    from .training.teacher import TeacherConfig, load_or_generate_teacher
    from . import distributed
    _init_distributed(args)  # under torchrun each rank generates its share of the chunks
    try:
        _teacher_steps(args)  # --teacher-solver/-order/-nfe refused before any work
        model, schedule, dtype = _load(args)
        _check_out_dir(os.path.join(args.out, "teacher"))  # a bad --out fails now, not after generating the pairs
        cfg = TeacherConfig(solver=args.teacher_solver, order=args.teacher_order, nfe=args.teacher_nfe,
                            n_train=args.n_train, n_valid=args.n_valid, seed=args.seed, teacher=_teacher_kind(model))
        cache_dir = os.path.join(args.out, "teacher")
        cond = _conditions(model, args.n_train + args.n_valid, args.seed, "teacher")  # those `ld3 train` draws
        data = load_or_generate_teacher(model, schedule, cfg, cache_dir=cache_dir, device=args.device,
                                        dtype=dtype, progress=_progress(args), conditions=cond,
                                        regenerate=args.regenerate_teacher, model_name=_weightless_name(model, args))
        if args.regenerate_teacher:
            # caching the set is this command's job: another regeneration of the same folder that restarted the
            # staged set with its settings keeps this run's pairs out (a warning, which `ld3 train` may live with)
            from .training.teacher import TeacherCacheMismatch
            try:
                load_or_generate_teacher(model, schedule, cfg, cache_dir=cache_dir, dtype=dtype, progress=False,
                                         device=args.device, conditions=cond, model_name=_weightless_name(model, args))
            except TeacherCacheMismatch:
                raise TeacherNotCached(f"{cache_dir} holds another run's teacher set (a regeneration of the same "
                                       "folder ran beside this one and replaced the staged set); this run's pairs "
                                       "are not cached: run the command again once the other has finished") from None
        if distributed.is_rank0():
            _say(f"teacher pairs ready in {os.path.join(args.out, 'teacher')}: "
                 f"{data.train_noise.shape[0]} train, {data.valid_noise.shape[0]} valid")
    finally:
        distributed.destroy()
    return 0


def cmd_train(args) -> int:
    from . import distributed
    _init_distributed(args)
    try:
        return _train(args)
    finally:
        distributed.destroy()


def _train(args) -> int:
    from .training.trainer import check_nfe
    _teacher_steps(args)  # --teacher-solver/-order/-nfe refused before any work
    model, schedule, dtype = _load(args)
    solver = _make_solver(args)
    try:
        check_nfe(solver, args.nfe)  # as the trainer checks it, but named in flags, before any work
    except ValueError as exc:
        raise UsageError(f"--nfe {args.nfe} with {solver!r}: {exc}") from None
    if _teacher_kind(model) != "exact" and args.teacher_nfe <= args.nfe:
        # LD3 fits the student to the teacher: one no more accurate than the student teaches it nothing
        print(f"warning: --teacher-nfe {args.teacher_nfe} is not above the student's --nfe {args.nfe}: the teacher "
              f"should be a much finer solve (pass --teacher-nfe, e.g. {max(20, 4 * args.nfe)})", file=sys.stderr)
    # where the results go must be usable before any work (an OSError here is one line)
    _check_out_dir(os.path.join(args.out, "checkpoint"))
    _check_out_dir(args.out, ("schedule.json",))
    with _train_lock(args.out):
        return _train_locked(args, model, schedule, solver, dtype)


TRAIN_LOCK = ".ld3_train.lock"  # in --out/checkpoint: one `ld3 train` per --out at a time


@contextlib.contextmanager
def _train_lock(out: str):
    """An exclusive advisory lock on ``out`` for the whole training: two runs on one --out both reported success
    while overwriting each other's checkpoint and schedule.json.  Rank 0 holds it under torchrun (every rank
    stops when it is taken); where no lock can be made (no fcntl, a read-only folder) the run goes on without."""
    from . import distributed
    try:
        import fcntl
    except ImportError:
        fcntl = None
    fd, busy = None, False
    if fcntl is not None and distributed.is_rank0():
        try:
            fd = os.open(os.path.join(out, "checkpoint", TRAIN_LOCK), os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = True
        except OSError:
            pass
    if distributed.any_rank(busy):
        if fd is not None:
            os.close(fd)
        raise UsageError(f"--out: another `ld3 train` is running in {out} (it holds {TRAIN_LOCK}); wait for it "
                         "to finish, or pass another --out")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _trained_in(seconds: float, learned) -> str:
    """This run's time; and the schedule file's training time when that is longer (a resumed run: the file counts
    the earlier runs' training too, and the two figures looked contradictory)."""
    total = (learned.metrics or {}).get("train_seconds")
    if isinstance(total, (int, float)) and total > seconds + 1.0:
        return f"trained in {seconds:.1f}s ({total:.1f}s of training in all, with the run this one resumed)"
    return f"trained in {seconds:.1f}s"


def _train_locked(args, model, schedule, solver, dtype) -> int:
    from .training import LD3Trainer
    from . import distributed
    testbed = getattr(model, "testbed", None)
    with warnings.catch_warnings():  # _train said so already, naming the flags
        warnings.filterwarnings("ignore", message=r"teacher_nfe=\d+ is not above")
        trainer = LD3Trainer(model, schedule, solver, args.nfe, loss=args.loss, time_mode=args.time_mode,
                             teacher=_teacher_kind(model), reference=testbed,
                             init=args.init, seed=args.seed, device=args.device, dtype=dtype,
                             n_train=args.n_train, n_valid=args.n_valid,
                             teacher_solver=args.teacher_solver, teacher_order=args.teacher_order,
                             teacher_nfe=args.teacher_nfe, teacher_dir=os.path.join(args.out, "teacher"),
                             checkpoint_dir=os.path.join(args.out, "checkpoint"), progress=_progress(args),
                             rounds_v1=args.rounds_v1, rounds_v2=args.rounds_v2, checkpoint_model=args.checkpointing,
                             resume="never" if (args.fresh or args.regenerate_teacher) else "auto",
                             regenerate_teacher=args.regenerate_teacher, model_name=_weightless_name(model, args),
                             conditions=_conditions(model, args.n_train + args.n_valid, args.seed, "teacher"),
                             model_spec=args.model)  # in every schedule file it writes: `ld3 eval` reloads the model
    t0 = time.time()
    learned = trainer.fit()
    if distributed.is_rank0():
        path = os.path.join(args.out, "schedule.json")
        took = _trained_in(time.time() - t0, learned)
        if _holds_schedule(path, learned):
            _say(f"{took}; {path} already holds this schedule: kept as it is")
            # a run stopped between writing this schedule and setting aside the eval of the one it replaced left
            # that eval.json looking current: one that records another schedule's sha256 goes now
            _set_aside_stale_eval(args.out, path, None, recorded_only=True)
        else:
            replaced = _file_sha256(path)  # the schedule an earlier `ld3 eval --out` may have evaluated
            kept = _keep_replaced_schedule(path) if replaced is not None else None
            path = learned.save(path)
            _set_aside_stale_eval(args.out, path, replaced)
            if kept is not None:
                print(f"note: the schedule {path} held before is kept as {kept}", file=sys.stderr)
            _say(f"{took}; wrote {path}")
        _say("timesteps:       " + ", ".join(f"{v:.5g}" for v in learned.timesteps.tolist()))
        _say("model_timesteps: " + ", ".join(f"{v:.5g}" for v in learned.model_timesteps.tolist()))
    return 0


EVAL_OUTPUTS = ("eval.json", "schedules.png", "eval_samples.png")


def _file_sha256(path: str) -> Optional[str]:
    """The sha256 of a file's bytes (what `sha256sum` prints), None when it cannot be read."""
    import hashlib
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _holds_schedule(path: str, learned) -> bool:
    """``path`` is an intact schedule file of ``learned`` but for its creation time (rerunning a finished training
    resumes to the same schedule): not rewritten, so an eval.json of it stays current (its sha256 unchanged)."""
    from .atomic_io import json_checksum
    try:
        with open(path) as f:
            old = json.load(f)
        new = json.loads(json.dumps(learned.to_dict(), allow_nan=False))
    except (OSError, ValueError, TypeError):
        return False
    if not isinstance(old, dict) or old.get("checksum") != json_checksum(old):
        return False  # a damaged file is replaced
    drop = ("created", "checksum")
    return {k: v for k, v in old.items() if k not in drop} == {k: v for k, v in new.items() if k not in drop}


def _same_file(a, b: str) -> bool:
    try:
        return isinstance(a, str) and os.path.samefile(a, b)
    except OSError:  # a path that no longer exists: compare the names
        return isinstance(a, str) and os.path.abspath(a) == os.path.abspath(b)


def _keep_replaced_schedule(path: str) -> Optional[str]:
    """A copy of the schedule file a training is about to replace, as ``schedule.stale-STAMP.json`` beside it (a
    schedule a user may have shipped is never lost; ``--fresh`` or other settings with no checkpoint left replace
    it).  Written atomically before the new file; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    stem, ext = os.path.splitext(path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
    target, k = f"{stem}.stale-{stamp}{ext}", 1
    while os.path.lexists(target):
        if _holds(target, data):  # kept already, by a run that was interrupted or failed before its own write
            return target
        k += 1
        target = f"{stem}.stale-{stamp}-{k}{ext}"
    from .atomic_io import atomic_write_bytes
    atomic_write_bytes(target, data)
    return target


def _holds(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False


def _recorded_eval(out: str) -> Tuple[str, Optional[Dict[str, Any]]]:
    """(path of ``out``/eval.json, its record) -- the record None when there is none or it is not a JSON object."""
    record_path = os.path.join(out, "eval.json")
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return record_path, None
    return record_path, record if isinstance(record, dict) else None


def _set_aside_stale_eval(out: str, schedule_path: str, replaced_sha: Optional[str],
                          recorded_only: bool = False) -> List[str]:
    """After `ld3 train` wrote ``schedule_path``: an eval.json in ``out`` (and its figures) that evaluated the
    schedule this one replaced would still look current; it is renamed, not deleted, to ``*.stale-STAMP.*``.
    An eval.json of this very schedule (same sha256) or of another schedule file stays; ``recorded_only``: so
    does one that records no sha256 (it may be of this schedule).  Returns the new names."""
    record_path, record = _recorded_eval(out)
    if record is None:
        return []  # none, or not one of ours
    evaluated = record.get("schedule_sha256")
    if evaluated is not None and evaluated == _file_sha256(schedule_path):
        return []  # the numbers are of this schedule: still current
    if evaluated is None and recorded_only:
        return []
    of_replaced = (evaluated is not None and evaluated == replaced_sha) or _same_file(record.get("schedule_file"),
                                                                                  schedule_path)
    if not of_replaced:
        return []
    names = [n for n in EVAL_OUTPUTS if os.path.exists(os.path.join(out, n))]
    moved: List[str] = []
    try:
        suffix = _rename_aside(out, names, record_path, moved)
    except OSError as exc:  # the new schedule is written: the run did not fail
        print(f"warning: {record_path} evaluated the schedule this training replaced and could not be renamed "
              f"({exc.strerror or exc}); its numbers are not of {schedule_path}", file=sys.stderr)
        return moved
    print(f"note: {', '.join(names)} in {out} evaluated the schedule this training replaced: renamed to "
          f"*.{suffix}.* (run `ld3 eval --out {out}` for the new one)", file=sys.stderr)
    return moved


def _rename_aside(out: str, names: List[str], stamp_of: str, moved: List[str]) -> str:
    """Rename ``names`` (eval outputs in ``out``) to ``NAME.stale-STAMP.EXT``, STAMP the time ``stamp_of`` was
    written, never over an earlier set-aside result; appends each new path to ``moved`` and returns the suffix.
    eval.json goes last: an interrupt leaves it to be found.  Raises the OSError of a rename that failed."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(stamp_of)))
    suffix, k = f"stale-{stamp}", 1
    while any(os.path.lexists(os.path.join(out, _stale_name(n, suffix))) for n in EVAL_OUTPUTS):
        k += 1
        suffix = f"stale-{stamp}-{k}"
    for n in sorted(names, key=lambda n: n == "eval.json"):
        os.replace(os.path.join(out, n), os.path.join(out, _stale_name(n, suffix)))
        moved.append(os.path.join(out, _stale_name(n, suffix)))
    return suffix


def _set_aside_other_eval(out: str, evaluated: str) -> None:
    """Before `ld3 eval` writes into ``out``: an eval.json there of another schedule (``--schedule X --out DIR``
    over DIR's evaluation of its own schedule) and its figures are renamed to ``*.stale-STAMP.*``, not replaced
    without a word (crash-safety audit).  One of this schedule, or one that records no schedule, is rewritten."""
    record_path, record = _recorded_eval(out)
    earlier = record.get("schedule_sha256") if record is not None else None
    if not isinstance(earlier, str) or earlier == evaluated:
        return
    names = [n for n in EVAL_OUTPUTS if os.path.exists(os.path.join(out, n))]
    try:
        suffix = _rename_aside(out, names, record_path, [])
    except OSError as exc:  # the writes below will say what is wrong with --out
        print(f"warning: {record_path} evaluated another schedule and could not be renamed ({exc.strerror or exc})",
              file=sys.stderr)
        return
    print(f"note: {', '.join(names)} in {out} evaluated another schedule ({record.get('schedule_file')}, sha256 "
          f"{earlier[:12]}...): renamed to *.{suffix}.*", file=sys.stderr)


def _set_aside_unwritten_figures(out: str, paths: List[str]) -> None:
    """After eval.json was written and a figure was not: the earlier figures still there are set aside, so no
    figure of another evaluation sits beside the new numbers (best effort: the run is failing already)."""
    names = [os.path.basename(p) for p in paths if os.path.exists(p)]
    try:
        if names:
            suffix = _rename_aside(out, names, os.path.join(out, names[0]), [])
            print(f"note: {', '.join(names)} in {out} are of an earlier evaluation: renamed to *.{suffix}.*",
                  file=sys.stderr)
    except OSError:
        pass


def _stale_name(name: str, suffix: str) -> str:
    stem, ext = os.path.splitext(name)
    return f"{stem}.{suffix}{ext}"


def cmd_eval(args) -> int:
    from .atomic_io import atomic_write_bytes, tensors_sha256
    from .plotting import sample_grid_png, schedule_plot_png
    from .schedule_file import _refuse_oversized, load_schedule
    path = args.schedule or os.path.join(args.out, "schedule.json")
    if not os.path.exists(path):
        hint = "" if args.schedule else f" (run `ld3 train --out {args.out}` first, or pass --schedule)"
        raise UsageError(f"{'--schedule' if args.schedule else '--out'}: no schedule file at {path}{hint}")
    _schedule_not_a_folder(path, "--schedule" if args.schedule else "--out")
    if not os.path.isfile(path):  # `--schedule <(cat f)`: the sha256 read below drained the pipe, and the schedule
        # read then found it empty ("truncated write?")
        raise UsageError(f"{'--schedule' if args.schedule else '--out'}: {path} is not a regular file (a pipe?); "
                         "eval reads it twice (its sha256 goes in eval.json): save it to a file first")
    _refuse_oversized(path)  # before the sha256 read below, which read a wrong (1 GiB) file whole
    evaluated = _file_sha256(path)  # recorded in eval.json: which schedule its numbers are of
    learned = load_schedule(path)
    if _file_sha256(path) != evaluated:
        raise UsageError(f"--schedule: {path} was replaced while being read (a training writing it?); rerun")
    args.model = args.model or _model_from_file(learned, path)
    model, schedule, dtype = _load(args)
    _check_schedule_fits(learned, path, model, schedule, args.model)
    learned.check_guidance(model.guidance_scale)
    _use_recorded_teacher(args, learned)
    solver = learned.solver()
    nfe = learned.nfe
    low = [k for k in args.nfe_curve or [] if k < solver.nfe(1)]
    if low:  # refused now, not after the teacher and every sample have run
        raise UsageError(f"--nfe-curve {low}: {solver.name} spends {solver.nfe(1)} evaluations a step; use "
                         f"values >= {solver.nfe(1)}")
    moved = {k: solver.nfe(solver.steps_for_nfe(k)) for k in args.nfe_curve or []}
    moved = {k: v for k, v in moved.items() if v != k}
    if moved:  # said now, not only visible in eval.json's curves
        print(f"note: --nfe-curve: {solver.name} spends {solver.nfe(1)} evaluations a step, so "
              + ", ".join(f"{k} runs as {v}" for k, v in sorted(moved.items())), file=sys.stderr)
    fd = None
    if args.model == "digits":
        try:
            from .metrics import digits_fd
            fd = digits_fd
        except ImportError:
            fd = None
    if fd is not None and args.n < 2:  # refused now, naming the flag, not by the metric after the teacher ran
        raise UsageError(f"--n: digits-FD needs at least 2 samples (a covariance), got {args.n}")
    _check_out_dir(args.out, EVAL_OUTPUTS)  # a bad --out fails now, not after the teacher and every sample
    x_T = _prior(model, schedule, args.n, args.seed, args.device, "eval").to(dtype)  # held-out noises
    cond = _conditions(model, args.n, args.seed, "eval")
    kw = _condition_kwargs(model, cond, args.device)
    target = _teacher(model, schedule, x_T, args, kw)
    steps = solver.steps_for_nfe(nfe)
    names = BASELINES + ([] if args.skip_model_baselines else MODEL_BASELINES)
    grids = _baseline_grids(names, schedule, steps, model=model, solver=solver, seed=args.seed, dtype=dtype)
    grids["ld3"] = learned.timesteps
    rows, samples, curves = [], {}, {}
    if fd is not None:
        # the reference point: digits-FD from a few hundred samples is biased upward and moves by a few
        # points with the noise seed, so a schedule is judged against the teacher's score, not zero
        exact = getattr(model, "testbed", None) is not None
        rows.append({"schedule": "teacher", "NFE": "exact" if exact else args.teacher_nfe, "mean RMSE": 0.0,
                     "median RMSE": 0.0, "digits-FD": fd(target.float())})
    for name, t in grids.items():
        tm = learned.solver_model_timesteps() if name == "ld3" else None
        with torch.no_grad():
            x = solver.sample(model, x_T, t.to(args.device), model_timesteps=None if tm is None else tm.to(args.device),
                              **kw)
        err = _rmse(x, target)
        row = {"schedule": name, "NFE": solver.nfe(steps), "mean RMSE": err.mean().item(),
               "median RMSE": _median(err)}
        if fd is not None:
            row["digits-FD"] = fd(x.float())
        rows.append(row)
        samples[name] = x
        curves.setdefault(name, []).append((nfe, _median(err)))
    if args.nfe_curve:
        # each NFE the solver really runs, once (Heun's two evaluations a step make an odd k run k - 1)
        extra = sorted({solver.steps_for_nfe(k) for k in args.nfe_curve} - {steps})
        for k_steps in extra:
            for name, t in _baseline_grids(BASELINES, schedule, k_steps).items():
                with torch.no_grad():
                    x = solver.sample(model, x_T, t.to(args.device), **kw)
                # the NFE actually run (Heun's two evaluations a step make an odd k run one fewer)
                curves[name].append((solver.nfe(k_steps), _median(_rmse(x, target))))
    cols = ["schedule", "NFE", "mean RMSE", "median RMSE"] + (["digits-FD"] if fd is not None else [])
    _say(f"{args.model}  solver={solver!r}  held-out noises={args.n}  teacher: {_teacher_desc(model, args)}")
    _say(_table(rows, cols))
    best = min((r for r in rows if r["schedule"] not in ("ld3", "teacher")), key=lambda r: r["median RMSE"])
    ld3 = next(r for r in rows if r["schedule"] == "ld3")
    if best["median RMSE"] > 0:
        gain = 1.0 - ld3["median RMSE"] / best["median RMSE"]
        _say(f"ld3 vs best baseline ({best['schedule']}): {100 * gain:+.1f}% median RMSE reduction")
    else:  # the baseline is the teacher's own solve (--teacher-* no finer than it): no ratio, and no lost results
        gain = float("nan")  # None in eval.json
        _say(f"ld3 vs best baseline ({best['schedule']}): not comparable, that baseline reproduces the teacher exactly "
             "(use a finer teacher: a higher --teacher-nfe)")
    if fd is not None:
        _say(f"digits-FD from {args.n} samples: read it against the teacher's row; a score below the teacher's "
             "does not mean samples better than the ODE solution (few-sample FD is biased and moves by a few "
             "points with the noise seed)")
    # the numbers first (a figure that cannot be drawn must not lose them), as numbers, with what they are of;
    # a unique temp name (atomic_io): two evals writing into one --out cannot clobber each other's half-file
    record = {"model": args.model, "schedule_file": os.path.abspath(path), "schedule_sha256": evaluated,
              "solver": solver.config(), "nfe": nfe,
              "n": args.n, "seed": args.seed, "dtype": str(dtype).replace("torch.", ""),  # --dtype moves them
              "teacher": "exact" if getattr(model, "testbed", None) is not None
              else {"solver": _make_teacher_solver(args).config(), "nfe": args.teacher_nfe,
                    "discretization": _teacher_grid(args)},
              "rows": rows,
              # a conditional model's held-out conditions (drawn by its draw_conditions): what the numbers are of too
              **({} if cond is None else {"conditions": {"key": model.cond_key, "n": int(cond.shape[0]),
                                                         "sha256": tensors_sha256({"conditions": cond.cpu()})}}),
              "gain_vs_best": gain, "curves": {k: sorted(v) for k, v in curves.items()}}
    if args.model == "digits":  # the numbers are of these exact (pinned, verified) weight files
        from .models.digits import weights_sha256
        from .models.digits_classifier import classifier_sha256
        record["weights_sha256"] = {"denoiser": weights_sha256(), "classifier": classifier_sha256()}
    p0, p1, p2 = (os.path.join(args.out, name) for name in EVAL_OUTPUTS)
    # the figures are drawn before any file is written: a Ctrl-C while drawing (seconds) keeps an earlier eval's
    # three files together, instead of this run's numbers next to the earlier run's figures
    numbers = json.dumps(json_safe(record), indent=1, allow_nan=False)
    if _file_sha256(path) != evaluated:  # a training replaced it meanwhile: eval.json's sha256 says which was run
        print(f"warning: {path} was replaced during this evaluation; {p0} is of the schedule it held before "
              f"(sha256 {evaluated[:12]}...)", file=sys.stderr)
    try:
        figures = {p1: schedule_plot_png(grids, schedule, errors=curves),
                   p2: sample_grid_png({"teacher": target, **samples})}
    except Exception:
        _set_aside_other_eval(args.out, evaluated)
        atomic_write_text(p0, numbers)
        _set_aside_unwritten_figures(args.out, [p1, p2])
        raise
    _set_aside_other_eval(args.out, evaluated)
    atomic_write_text(p0, numbers)
    unwritten = list(figures)
    try:
        for figure_path in list(unwritten):
            atomic_write_bytes(figure_path, figures[figure_path])
            unwritten.remove(figure_path)
    except BaseException:  # a full disk, Ctrl-C: this run's numbers beside an earlier run's figure otherwise
        # a write interrupted after its rename (the folder's fsync) put this run's figure in place already
        _set_aside_unwritten_figures(args.out, [f for f in unwritten if not _holds(f, figures[f])])
        raise
    _say(f"wrote {p0}, {p1}, {p2}")
    return 0


def _saved_since(directory: str, t0: float) -> bool:
    """A file in ``directory`` written at or after ``t0`` (this run's checkpoint), on a best-effort basis."""
    try:
        return any(os.path.getmtime(os.path.join(directory, f)) >= t0 - 1e-3 for f in os.listdir(directory)
                   if not f.startswith("."))
    except OSError:
        return False


def _foreign_scheduler_class(path: str) -> Optional[str]:
    """The ``_class_name`` of a scheduler config at ``path`` when it is not an LD3Scheduler's, else None."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None  # none there, or not a config: nothing of the model's to protect
    cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
    return cls if isinstance(cls, str) and cls != "LD3Scheduler" else None


def cmd_export_diffusers(args) -> int:
    from .integrations.diffusers_scheduler import LD3Scheduler
    if not os.path.exists(args.schedule):
        raise UsageError(f"schedule file not found: {args.schedule}")
    cfg = None
    written = os.path.join(args.out, LD3Scheduler.config_name)
    inputs = [("schedule file", args.schedule)]
    if args.scheduler_config:
        path = args.scheduler_config
        if os.path.isdir(path):
            path = os.path.join(path, LD3Scheduler.config_name)
        inputs.append(("--scheduler-config", path))
        try:
            with open(path) as f:
                cfg = json.load(f)
        except OSError as exc:  # the bare FileNotFoundError named neither the flag nor what was expected there
            found = ("no such file" if not os.path.exists(path) else exc.strerror or str(exc))
            raise UsageError(f"--scheduler-config: cannot read {path} ({found}); pass the model's diffusers "
                             f"scheduler folder (holding {LD3Scheduler.config_name}) or that JSON file") from None
        except ValueError as exc:  # JSONDecodeError's text names neither the file nor the flag
            raise UsageError(f"--scheduler-config: {path} is not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"--scheduler-config: {path} holds a JSON {type(cfg).__name__}, not a scheduler "
                             "config (a JSON object)")
    for what, path in inputs:  # `--out MODEL/scheduler` would replace the model's own config with ours
        if os.path.exists(written) and os.path.samefile(written, path):
            raise UsageError(f"--out: {written} is the {what} it is made from; write to another folder")
    other = _foreign_scheduler_class(written)
    if other is not None:  # without --scheduler-config too: the model's own scheduler config, not an earlier export
        raise UsageError(f"--out: {written} is a {other} config (a model's own scheduler, not an LD3Scheduler "
                         "export); write to another folder (and pass this one as --scheduler-config)")
    if os.path.isdir(written):  # else the atomic write failed naming its temporary file
        raise UsageError(f"--out: {written} is a folder; pass the folder that is to hold {LD3Scheduler.config_name}")
    made = _missing_folders(args.out)
    try:
        _check_out_dir(args.out)  # as the other commands: an unusable --out is refused before the work
        sched = LD3Scheduler.from_schedule_file(args.schedule, scheduler_config=cfg)
    except BaseException:
        for folder in made:  # a refused export leaves no folder behind (they are still empty)
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    # what save_pretrained writes, but atomically: an interrupted export keeps the earlier file whole
    atomic_write_text(written, sched.to_json_string())
    _say(f"wrote a diffusers scheduler config to {args.out} (load it with LD3Scheduler.from_pretrained)")
    return 0


def cmd_info(args) -> int:
    from .build_info import build_info, format_build_info
    info = build_info()
    print(json.dumps(info, indent=2) if args.json else format_build_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ld3", description="Learn and use LD3 sampling schedules.", allow_abbrev=False,
                                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    p.add_argument("--version", action="version", version=f"ld3 (ld3_ext {__version__})")
    # COMMAND, not the dest: a bare `ld3` said "the following arguments are required: cmd"
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                           help="sample | teacher | train | eval | export-diffusers | info (`ld3 COMMAND --help`)")
    sub_kw = dict(allow_abbrev=False, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)

    s = sub.add_parser("sample", **sub_kw,
                       help="sample with hand-made (and optionally a learned) schedule; PNG + error table")
    _add_common(s, model=None, out="runs/sample", sample=True)
    s.add_argument("--n", type=int, default=256, help="number of samples (default: 256)")
    s.add_argument("--schedule", default=None, help="a learned schedule file to compare as well")
    s.set_defaults(func=cmd_sample)

    t = sub.add_parser("teacher", **sub_kw, help="generate (or reuse) the cached teacher pairs")
    _add_common(t, solver_defaults=False)
    t.add_argument("--n-train", type=int, default=50, help="teacher pairs to train on (default: 50)")
    t.add_argument("--n-valid", type=int, default=50, help="teacher pairs to validate on (default: 50)")
    t.add_argument("--regenerate-teacher", action="store_true",
                   help="replace a cached teacher set made with other settings instead of refusing it (the old "
                        "set stays until the new one is complete)")
    t.set_defaults(func=cmd_teacher)

    tr = sub.add_parser("train", **sub_kw,
                        help="learn a schedule (resumes from --out/checkpoint after an interrupt)")
    _add_common(tr)
    tr.add_argument("--loss", default="pseudo_huber", choices=list(LOSSES),
                    help="pseudo_huber | l2 | l1 | lpips (default: pseudo_huber)")
    tr.add_argument("--time-mode", default="auto", choices=["auto", "lambda", "time"],
                    help="schedule parameterisation; auto: short trial of both, the better on validation continues "
                         "(default: auto)")
    tr.add_argument("--init", default="auto", choices=["auto", "dmn", *DISCRETIZATIONS],
                    help="auto (best of the candidates below and DMN on the validation "
                    "set) | logsnr | time_uniform | time_quadratic | edm | dmn (default: auto)")
    tr.add_argument("--n-train", type=int, default=50, help="teacher pairs to train on (default: 50)")
    tr.add_argument("--n-valid", type=int, default=50, help="teacher pairs to validate on (default: 50)")
    tr.add_argument("--rounds-v1", type=int, default=2, help="rounds of phase 1, the solver grid alone (default: 2)")
    tr.add_argument("--rounds-v2", type=int, default=5,
                    help="rounds of phase 2, the grid and the decoupled model times (default: 5)")
    tr.add_argument("--checkpointing", action="store_true", help="rematerialise network calls (flat memory in NFE)")
    tr.add_argument("--fresh", action="store_true",
                    help="start over: ignore (and overwrite) a training checkpoint in --out instead of resuming it")
    tr.add_argument("--regenerate-teacher", action="store_true",
                    help="replace a cached teacher set made with other settings instead of refusing it (implies "
                         "--fresh: a checkpoint made on the old teacher set cannot be resumed)")
    tr.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", **sub_kw, help="compare the learned schedule with every baseline")
    _add_common(e, solver_defaults=False, model=None)
    e.add_argument("--schedule", default=None, help="schedule file (default: OUT/schedule.json)")
    e.add_argument("--n", type=int, default=256, help="held-out noises (default: 256)")
    e.add_argument("--nfe-curve", type=int, nargs="*", default=[4, 5, 6, 8, 10],
                   help="NFEs at which the hand-made baselines are also run, for the error-vs-NFE plot (the learned "
                        "schedule runs at its own NFE; default: 4 5 6 8 10; none given: no curve)")
    e.add_argument("--skip-model-baselines", action="store_true", help="skip DMN/GITS")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export-diffusers", **sub_kw,
                       help="write an LD3Scheduler config for an unmodified diffusers pipeline")
    x.add_argument("schedule", help="learned schedule file")
    x.add_argument("--scheduler-config", default=None, help="the model's diffusers scheduler folder or JSON")
    x.add_argument("--out", required=True, help="folder to write scheduler_config.json into (made if missing)")
    x.set_defaults(func=cmd_export_diffusers)

    i = sub.add_parser("info", **sub_kw,
                       help="what this installation runs: native extension, CPU instruction set, CUDA kernels and "
                            "whether they cover the GPUs present")
    i.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    i.set_defaults(func=cmd_info)
    return p


# OSErrors about a path the user named (a missing input, --out under a file, no permission): usage errors
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
                errno.ENAMETOOLONG, errno.ELOOP}


def _exit_code(exc: BaseException) -> Optional[int]:
    """2 for an exception that describes unusable input (flags, files, paths), 1 for a run that failed (shown as one
    line, no traceback), None for anything else: a bug, whose traceback is what a report needs."""
    from .atomic_io import CorruptFileError
    from .training import CheckpointMismatchError, LossUnavailableError, NonFiniteLossError, TeacherCacheError
    from .wrappers import ModelOutputError
    from .plotting import PlottingUnavailableError
    if _out_of_memory(exc) or isinstance(exc, (NonFiniteLossError, ModelOutputError, TeacherNotCached,
                                               PlottingUnavailableError)):
        return 1
    if isinstance(exc, OSError):  # FileNotFoundError(msg) has no errno: its class says it
        path_error = isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
                                      PermissionError)) or exc.errno in _PATH_ERRNOS
        return 2 if path_error else 1  # disk full, I/O error: the run failed
    if isinstance(exc, (CorruptFileError, CheckpointMismatchError, LossUnavailableError, TeacherCacheError,
                        ValueError, TypeError)):
        return 2
    return None


# what torch.distributed's backends say when a peer process is gone or a collective waited too long (gloo raises
# plain RuntimeErrors; newer torch raises DistError subclasses)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket closed")
_PEER_TIMEOUT = ("Timed out waiting", "timed out", "Timeout")


def _peer_failure(exc: BaseException) -> Optional[str]:
    """Under torchrun: the message for a collective that failed because another rank stopped (killed, or failed
    with its own error) or never came, instead of gloo's multi-line traceback; None otherwise."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return None
    dist_error = getattr(getattr(torch, "distributed", None), "DistError", None)
    if not (isinstance(exc, RuntimeError) or (dist_error is not None and isinstance(exc, dist_error))):
        return None
    text = str(exc)
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    rank = os.environ.get("RANK", "?")
    if any(m in text for m in _PEER_GONE):
        return (f"rank {rank}: another rank stopped (killed, or failed: its own output says why), so this one stops "
                f"too ({first})")
    if ("gloo" in text or "NCCL" in text or "ProcessGroup" in text or "c10d" in text) and \
            any(m in text for m in _PEER_TIMEOUT):
        return (f"rank {rank}: a collective timed out: the ranks waited for each other in vain (a rank stopped, is "
                f"stuck, or runs another command) ({first})")
    return None


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _model_failure(exc: BaseException) -> bool:
    """The exception was raised inside the network's own code: past DiffusionModel._call's call of the network,
    the innermost frame that is not torch's is not ld3_ext's (a factory's function, a user's module, diffusers), or
    there is none (a TorchScript or torch.compile'd network, a torch module used as it is).  That run failed (exit 1,
    one line), whatever the class: a ValueError there is not a bad flag, a RuntimeError not a bug of ld3.  Where
    that frame is ld3_ext's (a built-in network, the diffusers adapter's call) the failure keeps the traceback a
    report needs.  Errors the engine raises in a backward pass carry no forward frame and keep their class's
    status."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append((os.path.abspath(code.co_filename), code.co_name))
        tb = tb.tb_next
    call = (os.path.join(_PACKAGE_DIR, "wrappers.py"), "_call")
    if call not in frames:
        return False
    later = [path for path, _ in frames[frames.index(call) + 1:]]
    if not later:
        return False  # raised by _call itself: its own checks of the call's arguments
    own = [path for path in later if not path.startswith(_TORCH_DIR + os.sep)]
    return not own or not own[-1].startswith(_PACKAGE_DIR + os.sep)


def _flag_hint(exc: BaseException) -> Optional[str]:
    """The command-line flag for a Python option that an error message names."""
    text = str(exc)
    if "time_mode='auto' to resume" in text:
        return "on the command line: --time-mode auto resumes it, --fresh starts over"
    if "resume='never'" in text:
        return "on the command line: `ld3 train --fresh` starts over"
    if "regenerate=True" in text or "regenerate_teacher=True" in text:
        return "on the command line: --regenerate-teacher replaces the cached teacher set"
    if "Lower the learning rates (lr_xi" in text:
        return ("on the command line the learning rates are fixed: try another --init, --time-mode or --loss, or set "
                "lr_xi/lr_xi_c/shift_lr with ld3_ext.training.LD3Trainer in Python")
    return None


def _check_device(args) -> None:
    """--device names a device this torch can use: checked before any model is loaded or file written."""
    name = getattr(args, "device", None)
    if name is None:
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(f"--device {name!r}: {exc}")
    if dev.type == "meta":
        raise UsageError(f"--device {name!r}: the meta device holds no values; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available (this torch has no CUDA build or sees no "
                         f"GPU); use --device cpu")
    if dev.type not in ("cpu", "cuda") and (os.environ.get("WORLD_SIZE") or "1") not in ("0", "1"):
        # init_from_env wants the process group's backend named for it (backend=...), which no flag gives
        raise UsageError(f"--device {name!r}: under torchrun the CLI runs on cpu (gloo) or cuda (nccl)")
    if dev.type != "cuda" or "LOCAL_RANK" not in os.environ:  # under torchrun the rank picks cuda:LOCAL_RANK
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise UsageError(f"--device {name!r}: {str(exc).splitlines()[0]}")


def _check_counts(args) -> None:
    """Counts and seeds named by their flags, before any work (a negative --n-train would slice a wrong split)."""
    for flag in ("nfe", "teacher_nfe", "n", "n_train", "n_valid", "rounds_v1", "rounds_v2"):
        v = getattr(args, flag, None)
        low = 0 if flag.startswith("rounds") else 1
        if v is not None and v < low:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= {low}, got {v}")
    for flag, high in (("nfe", MAX_NFE), ("teacher_nfe", MAX_TEACHER_NFE), ("n", MAX_COUNT), ("n_train", MAX_COUNT),
                       ("n_valid", MAX_COUNT)):
        v = getattr(args, flag, None)
        if v is not None and v > high:  # a huge NFE ran on for minutes, then failed naming an internal parameter
            raise UsageError(f"--{flag.replace('_', '-')} must be <= {high}, got {v}")
    threads = getattr(args, "threads", None)
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads must be in 1..{MAX_THREADS}, got {threads}")
    if getattr(args, "rounds_v1", None) == 0 and getattr(args, "rounds_v2", None) == 0:
        raise UsageError("--rounds-v1 and --rounds-v2 are both 0: train needs at least one round")
    for k in getattr(args, "nfe_curve", None) or []:
        if not 1 <= k <= MAX_NFE:
            raise UsageError(f"--nfe-curve values must be in 1..{MAX_NFE}, got {k}")
    gs = getattr(args, "guidance_scale", None)
    if gs is not None and not math.isfinite(gs):  # the library's message named its Python argument, guidance_scale
        raise UsageError(f"--guidance-scale must be a finite number, got {gs}")
    seed = getattr(args, "seed", 0)
    try:
        check_seed("--seed", seed)
    except ValueError:
        raise UsageError(f"--seed must be in [0, 2**63), got {seed}") from None


def _traceback_wanted() -> bool:
    return os.environ.get("LD3_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off")


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Library warnings on the command line: one line (no source line), with the flag for a Python option."""
    print(f"warning: {message}", file=sys.stderr)
    hint = _flag_hint(message)
    if hint:
        print(hint, file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or torchrun's stop), raised in the main thread like Ctrl-C, so that what is being
    written is cleaned up (atomic_io) and the resume hint is printed, instead of a silent kill."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _several_ranks() -> bool:
    """WORLD_SIZE > 1: a distributed launch.  A RANK alone (a job system's own variable) is no launch: the command
    runs (it exited 0 having done nothing, diff review)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def main(argv: Optional[List[str]] = None) -> int:
    import signal
    import threading
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    # only where nobody else chose a handler, and only from the main thread (signal.signal's own rule)
    own_sigterm = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if own_sigterm:
        signal.signal(signal.SIGTERM, _raise_terminated)
    threads = torch.get_num_threads()  # --threads is for this command: a caller's process keeps its setting
    try:
        return _main(argv)
    finally:
        warnings.showwarning = shown
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # argparse's own errors: usage line, then exit status 2
    # the flags written on the command line (not argparse's defaults), for notes about flags that are overridden
    args.given_flags = {a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv)
                        if isinstance(a, str) and a.startswith("--")}
    prog = f"ld3 {args.cmd}"
    started = time.time()
    try:
        _fill_teacher_defaults(args)
        _check_counts(args)
        _check_device(args)
        out = getattr(args, "out", None)
        if out is not None and not out.strip():
            raise UsageError("--out must name a directory, got an empty string")
        for flag in sorted(args.given_flags):
            # `--model "$UNSET"`: an empty value fell back to the default (another model, the file's own), exit 0
            value = getattr(args, flag[2:].replace("-", "_"), None)
            if isinstance(value, str) and not value.strip():
                raise UsageError(f"{flag} was given an empty value")
        if out and os.path.exists(out) and not os.path.isdir(out):
            raise UsageError(f"--out {out!r} exists and is not a directory")
        if args.cmd not in ("teacher", "train") and os.environ.get("RANK", "0") not in ("", "0") \
                and _several_ranks():
            # under torchrun every rank did the whole command and wrote the same files (distributed audit); rank 0
            # runs it (also a rank-0-only call from a user's distributed script)
            print(f"{prog}: rank {os.environ['RANK']}: only teacher and train use several ranks; rank 0 runs this "
                  "command", file=sys.stderr)
            return 0
        return args.func(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise  # SystemExit(2), as argparse exits on a bad flag
    except KeyboardInterrupt as exc:
        if _traceback_wanted():  # the traceback, and still the exit status that says how the run stopped
            traceback.print_exc()
        resume = ""
        if args.cmd == "teacher":  # a regeneration resumes its staged set when rerun with the flag, as without
            resume = " (rerun the same command to resume)"
        elif args.cmd == "train":
            restart = [f for f in ("--fresh", "--regenerate-teacher") if getattr(args, f[2:].replace("-", "_"), False)]
            if restart and _saved_since(os.path.join(args.out, "checkpoint"), started):
                resume = (f" (rerun the command without {' and '.join(restart)} to resume from this run's last "
                          "checkpoint; with it, the run starts over)")
            elif restart:  # no checkpoint of this run yet: without --fresh the earlier run's would be found
                resume = " (rerun the same command: this run saved no checkpoint yet)"
            else:
                resume = " (rerun the same command to resume from the last checkpoint)"
        if isinstance(exc, Terminated):
            print(f"{prog}: terminated (SIGTERM){resume}", file=sys.stderr)
            return 128 + 15
        print(f"{prog}: interrupted{resume}", file=sys.stderr)
        return 130
    except Exception as exc:
        if _traceback_wanted():
            raise
        peer = _peer_failure(exc)
        if peer is not None:
            print(f"{prog}: error: {peer}", file=sys.stderr)
            return 1
        if _model_failure(exc) and not _out_of_memory(exc):
            print(f"{prog}: error: the model raised {type(exc).__name__}: {exc}", file=sys.stderr)
            print("(set LD3_TRACEBACK=1 for the full traceback)", file=sys.stderr)
            return 1
        code = _exit_code(exc)
        if code is None:
            raise  # a bug: the traceback is what a report needs
        if _out_of_memory(exc):
            print(f"{prog}: error: out of memory ({str(exc).splitlines()[0]}); lower --n, --n-train/--n-valid or "
                  "--nfe", file=sys.stderr)
            return code
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        hint = _flag_hint(exc)
        if hint:
            print(hint, file=sys.stderr)
        print("(set LD3_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
