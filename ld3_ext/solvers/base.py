"""Shared machinery of every solver: argument checks, model evaluation, the multistep loop."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import contextlib
import functools
import math
import numbers

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import _native, adjoint, ops
from .._checks import count, flag, holds_values
from .._finite import all_finite
from ..coefficients import SolverSpec, step_orders
from ..layout import in_layout_of
from ..ops import _layout_text, _vmapped
from ..schedules import NoiseSchedule
from ..wrappers import (DiffusionModel, OutputLedger, _capturing, _compiling, half_time_on_range,
                        require_diffusion_model)


def _fail(name: str, msg: str):
    raise ValueError(f"{name}: {msg}")


class DegenerateGridError(ValueError, FloatingPointError):
    """Two neighbouring times of a grid have the same log-SNR lambda in float64 (distinct t, e.g. one ulp apart at
    large sigma): the step between them has h = 0 and infinite coefficients.  A ValueError (a bad grid) and a
    FloatingPointError (where LD3 training meets one, a diverging trial, as time_mode="auto" treats it)."""


_no_meta = holds_values  # a meta tensor has no values: a solve on it can only fail later, inside torch


def _dense(name: str, t: torch.Tensor) -> None:
    # a sparse grid fails deep inside ("Cannot access data pointer"), a nested one with torch's "Internal error"
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got {_layout_text(t)}")


_PREDICT_ARGS = frozenset({"step", "returns"})  # DiffusionModel.predict's keywords besides the model's own


def check_model_kwargs(kw, what: str) -> None:
    """Model keywords named like predict's own (step, returns) would be taken by predict, not passed on (a
    returns= made a result None, a step= clashed inside): refused by name, for every caller of predict."""
    reserved = sorted(_PREDICT_ARGS.intersection(kw))
    if reserved:
        raise TypeError(f"{what}: model keyword arguments {reserved} clash with DiffusionModel.predict's own "
                        f"arguments {sorted(_PREDICT_ARGS)}; rename them in the function you wrapped")


def validate_timesteps(schedule, timesteps, x_T: Optional[torch.Tensor] = None, name: str = "timesteps",
                       check_range: bool = True, min_len: int = 2, values: bool = True,
                       spec: Optional[SolverSpec] = None, lambda_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Check a time grid t_0 > t_1 > ... > t_N; returns it unchanged (gradients keep flowing).

    ``values=False`` keeps the checks that read no tensor value (type, shape, dtype, device); a vmapped grid
    (one grid per mapped sample) has no values to read back and gets only those too.  With the ``spec`` of a
    solver whose steps divide by lambda differences, every step they read must also raise lambda, computed in
    ``lambda_dtype`` (the table's dtype: float64 on every solver path) (``DegenerateGridError``)."""
    # needed without check_range too: the values are checked to lie where the schedule is defined
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be an ld3_ext NoiseSchedule (the range of {name}), got "
                        f"{type(schedule).__name__}")
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor, got {type(timesteps).__name__}")
    _dense(name, timesteps)
    if timesteps.dim() != 1:
        _fail(name, f"must be 1-D, got shape {tuple(timesteps.shape)}")
    if not timesteps.is_floating_point():
        _fail(name, f"must be a floating tensor, got dtype {timesteps.dtype}")
    if timesteps.numel() < min_len:
        _fail(name, f"needs at least {min_len} entries (t_0 > ... > t_N), got {timesteps.numel()}")
    if x_T is not None and timesteps.device != x_T.device:
        _fail(name, f"is on {timesteps.device} but x_T is on {x_T.device}; put both on one device")
    if x_T is not None:
        _no_meta("x_T", x_T)  # on the device of timesteps: name the state first
    _no_meta(name, timesteps)
    if spec is not None and not isinstance(spec, SolverSpec):
        raise TypeError(f"spec must be a SolverSpec or None, got {type(spec).__name__}")
    if not isinstance(lambda_dtype, torch.dtype) or not lambda_dtype.is_floating_point:
        raise TypeError(f"lambda_dtype must be a floating torch.dtype, got {lambda_dtype!r}")
    if not values or _vmapped(timesteps):
        return timesteps
    # one read-back for every value check (one host sync on a GPU, instead of one per check);
    # a grid has tens to thousands of entries, so the checks in Python cost microseconds
    vals = timesteps.detach().tolist()
    if not all(math.isfinite(v) for v in vals):
        _fail(name, "contains NaN or Inf")
    if any(b >= a for a, b in zip(vals, vals[1:])):
        _fail(name, f"must be strictly decreasing (t_0 = t_max first), got {vals}")
    if check_range:
        lo, hi, tol = schedule.t_min, schedule.t_max, schedule.time_slack()
        if min(vals) < lo - tol or max(vals) > hi + tol:
            _fail(name, f"must lie in the schedule's range [{lo:.6g}, {hi:.6g}], got "
                        f"[{min(vals):.6g}, {max(vals):.6g}]")
        # the round-off slack can reach past the schedule's domain (t < 0 for a tiny t_min, alpha <= 0
        # past t = 1 for flow matching): there the solve would return NaN, or blame the model
        slack = [v for v in vals if v < lo or v > hi]
        if slack:
            _check_defined(schedule, slack, name)
    else:  # no range: still only times where the schedule is defined (on the values read back above)
        _check_defined(schedule, vals, name)
    if spec is not None:
        _check_lambda_steps(schedule, vals, spec, name, lambda_dtype)
    return timesteps


def _check_lambda_steps(schedule, times, spec: SolverSpec, name: str, dtype: torch.dtype) -> None:
    """A step i of order p >= 2 divides by h_{i-p+1} .. h_i (DPM-Solver++'s r = h_{i-1}/h_i, UniPC's r_k and its
    Vandermonde system): each must raise lambda, in the dtype the table is computed in, or the coefficients are
    infinite and the solve returns Inf/NaN, blamed on the model at the next step.  Steps no such row reads (a
    collision in a final first-order step) solve finitely and pass, as Euler's and iPNDM's (phi_1(0) = 0)."""
    read = _lambda_steps_read(spec, len(times) - 1)
    if not read:
        return
    if _clearly_rising(schedule, times, read, dtype):
        return
    with torch.no_grad():
        lam = schedule.lambda_(torch.tensor(times, dtype=dtype)).double().tolist()
    for j in read:  # step j goes from entry j-1 to entry j (ascending)
        a, b = lam[j - 1], lam[j]
        if math.isfinite(a) and math.isfinite(b) and not b > a:
            what = "the same log-SNR" if b == a else "a falling log-SNR"
            raise DegenerateGridError(
                f"{name}: entries {j - 1} and {j} ({times[j - 1]!r} and {times[j]!r}) have {what} in "
                f"{str(dtype).replace('torch.', '')} (lambda {a!r} -> {b!r}): the step between them has h = {b - a!r}, "
                f"and the order >= 2 steps that divide by it get infinite coefficients; drop one of them or space "
                f"them further apart")


def _lambda_steps_read(spec: SolverSpec, n: int) -> tuple:
    """The steps j (entry j-1 to entry j) whose lambda difference an order >= 2 row of an n-step solve divides by
    (cached: a sampler asks the same question at every call)."""
    try:
        return _lambda_steps_read_cached(spec, n)
    except TypeError:  # a SolverSpec subclass that defines __eq__ without __hash__ cannot key the cache
        return _lambda_steps_read_cached.__wrapped__(spec, n)


@functools.lru_cache(maxsize=256)
def _lambda_steps_read_cached(spec: SolverSpec, n: int) -> tuple:
    read = set()
    if spec.kind in ("dpmpp", "unipc"):
        for i, p in enumerate(step_orders(spec, n), start=1):
            if p >= 2:
                read.update(range(max(1, i - p + 1), i + 1))
    return tuple(sorted(read))


def _clearly_rising(schedule, times, read, dtype: torch.dtype) -> bool:
    """A screen that spares the exact check's torch ops (tens of microseconds once a sampler's tensors have swept the
    caches): lambda of a native schedule from the extension (the table's own formula, in C++), and every read step
    rising by far more than the two computations of lambda can differ (a few ulp; the margin is 1e-9 relative).
    False sends the grid to the exact check in ``dtype``: other schedules and dtypes, a tiny step, a non-finite
    lambda."""
    spec = schedule.native_spec() if dtype == torch.float64 else None
    if spec is None or not _native.native_available():
        return False
    kind, (p0, p1) = spec
    lam = _native._C.schedule_lambda(kind, p0, p1, times)
    for j in read:
        a, b = lam[j - 1], lam[j]
        if not (math.isfinite(a) and math.isfinite(b) and b - a > 1e-9 * max(1.0, abs(a), abs(b))):
            return False
    return True


def _check_defined(schedule, times, name: str) -> None:
    """alpha and sigma finite and > 0 (finite log alpha, log sigma) at every one of ``times``."""
    with torch.no_grad():
        t = torch.tensor(times, dtype=torch.float64)
        ok = torch.isfinite(schedule.log_alpha(t)) & torch.isfinite(schedule.log_sigma(t))
    if not bool(ok.all()):
        _fail(name, f"contains times where the schedule is undefined (alpha or sigma not > 0): "
                    f"{t[~ok].tolist()}")


def validate_model_timesteps(schedule, model_timesteps, timesteps: torch.Tensor, values: bool = True) -> torch.Tensor:
    name = "model_timesteps"
    if not isinstance(model_timesteps, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor, got {type(model_timesteps).__name__}")
    _dense(name, model_timesteps)
    if not model_timesteps.is_floating_point():
        _fail(name, f"must be a floating tensor, got dtype {model_timesteps.dtype}")
    if model_timesteps.shape != timesteps.shape:
        _fail(name, f"must have the same length as timesteps ({timesteps.numel()}), got shape "
                    f"{tuple(model_timesteps.shape)}")
    if model_timesteps.device != timesteps.device:
        _fail(name, f"is on {model_timesteps.device} but timesteps is on {timesteps.device}")
    _no_meta(name, model_timesteps)
    if not values or _vmapped(model_timesteps):  # a vmapped grid: no values to read back
        return model_timesteps
    md = model_timesteps.detach().reshape(-1).cpu().tolist()  # one read-back for every check below (four before)
    if not all(math.isfinite(v) for v in md):
        _fail(name, "contains NaN or Inf")
    lo, hi = schedule.t_min, schedule.t_max
    tol = 1e-3 * (hi - lo)
    if md and (min(md) < lo - tol or max(md) > hi + tol):
        _fail(name, f"must lie in the schedule's range [{lo:.6g}, {hi:.6g}]")
    # the tolerance above can reach past the schedule's domain (e.g. t <= 0 for EDM, alpha = 0 for flow
    # matching): every model time must give finite log alpha and log sigma
    _check_defined(schedule, md, name)
    return model_timesteps


def table_rows(table: torch.Tensor, which: int):
    """The [N, 2, 5] table's rows [i, which] as N full-width views from one unbind.

    The update reads the first 1 + len(history) entries of its coefficient row (the rest get a zero
    gradient), so the per-step loops pass whole rows: no t[i, 0, :p] indexing per step, whose three
    views cost three autograd nodes per step in the backward; unbind records one node for all rows.
    """
    return table.select(1, which).unbind(0)


def _as_is(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t


class Solver:
    """Base class.  Subclasses set ``name``, ``max_order`` and implement ``_solve``."""

    name = "solver"
    max_order = 1

    def __init__(self, order: int = 1, backend: str = "auto", checkpoint_model: bool = False):
        # any integer (numpy's too, as _checks.count takes), stored as a Python int: config() goes to JSON
        if isinstance(order, bool) or not isinstance(order, numbers.Integral):
            raise TypeError(f"order must be an int, got {type(order).__name__}")
        if not 1 <= order <= self.max_order:
            allowed = "1 (it is a first-order method)" if self.max_order == 1 else f"in 1..{self.max_order}"
            raise ValueError(f"order must be {allowed} for {type(self).__name__}, got {order}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.order = int(order)
        self.backend = backend
        #: rematerialise each network evaluation in backward (flat memory in NFE, LD3 App. D.3)
        self.checkpoint_model = flag("checkpoint_model", checkpoint_model)  # "no" would be truthy

    # --- description -------------------------------------------------------------------------
    def spec(self) -> Optional[SolverSpec]:
        """The coefficient spec (None for solvers outside the linear-multistep family, e.g. Heun)."""
        return None

    def nfe(self, num_steps: int) -> int:
        """Network evaluations for ``num_steps`` grid intervals."""
        return count("num_steps", num_steps, 0, type_error=False)

    def steps_for_nfe(self, nfe: int) -> int:
        """Grid intervals for a budget of ``nfe`` network evaluations (at most ``nfe``: see :meth:`exact_steps`)."""
        return count("nfe", nfe, 1, type_error=False)

    def exact_steps(self, nfe: int, name: str = "nfe", min_steps: int = 1) -> int:
        """Grid intervals that spend exactly ``nfe`` network evaluations, or a ValueError naming the setting
        ``name`` when the solver cannot: a solver whose steps cost two evaluations (Heun) cannot spend an odd NFE.
        The message suggests the nearest NFEs of at least ``min_steps`` steps, in the words of a command-line
        flag (``name`` "--nfe": "--nfe 5: heun spends 2 evaluations a step; use 4 or 6") or of a keyword."""
        if count(name, nfe, 1, type_error=False) < self.nfe(1):  # named by the caller's flag, not steps_for_nfe's "nfe"
            least = self.nfe(max(min_steps, 1))
            if name.startswith("-"):
                raise ValueError(f"{name} {nfe}: {self.name} spends {self.nfe(1)} evaluations a step; use {least}")
            raise ValueError(f"{type(self).__name__} cannot use {name}={nfe} (it spends {self.nfe(1)} evaluations per "
                             f"step); use {name}={least}")
        steps = self.steps_for_nfe(nfe)
        if self.nfe(steps) != nfe:
            near = [self.nfe(k) for k in (steps, steps + 1) if k >= min_steps]
            if name.startswith("-"):
                msg = (f"{name} {nfe}: {self.name} spends {self.nfe(1)} evaluations a step; use "
                       + " or ".join(map(str, near)))
            else:
                msg = (f"{type(self).__name__} cannot use exactly {name}={nfe} (it spends {self.nfe(1)} evaluations "
                       "per step); use " + " or ".join(f"{name}={k}" for k in near))
            raise ValueError(msg)
        return steps

    def min_steps(self) -> int:
        return 1

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "order": self.order}

    def __repr__(self):
        # config() is the solver's math (what schedule files record); how it runs shows where not the default
        settings = {k: v for k, v in self.config().items() if k != "name"}
        if self.backend != "auto":
            settings["backend"] = self.backend
        if self.checkpoint_model:
            settings["checkpoint_model"] = True
        args = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        return f"{type(self).__name__}({args})"

    # --- sampling ----------------------------------------------------------------------------
    def sample(self, model: DiffusionModel, x_T: torch.Tensor, timesteps: torch.Tensor,
               model_timesteps: Optional[torch.Tensor] = None, **model_kwargs) -> torch.Tensor:
        """Integrate the probability-flow ODE from x_T at timesteps[0] to timesteps[-1].

        ``model_timesteps`` (same length) are the times at which the network is evaluated (LD3's
        decoupled times); the solver coefficients always use ``timesteps``.  Differentiable w.r.t.
        x_T, timesteps and model_timesteps.
        """
        require_diffusion_model(model)
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise TypeError(f"x_T must be a floating torch.Tensor, got "
                            f"{getattr(x_T, 'dtype', type(x_T).__name__)}")
        _dense("x_T", x_T)  # a sparse x_T failed inside torch ("Could not run 'aten::ne.Scalar' ... 'SparseCPU'")
        if x_T.dim() < 1 or x_T.shape[0] == 0:
            raise ValueError(f"x_T must have a non-empty batch dimension, got shape {tuple(x_T.shape)}")
        check_model_kwargs(model_kwargs, "sample")
        schedule = model.schedule
        compiling = _compiling()
        if not compiling and x_T.is_neg():  # a lazily negated view (z.conj().imag): the fused kernels read storage
            x_T = x_T.resolve_neg()
        # value checks read tensors back to the host: not traceable, and not allowed while a CUDA graph is
        # being captured -- only the type/shape/dtype/device checks run then
        values = not (compiling or _capturing())
        timesteps = half_time_on_range(schedule, timesteps)
        validate_timesteps(schedule, timesteps, x_T, values=values, spec=self.spec())
        # a NaN/Inf start would surface as "model returned NaN/Inf at step 0" (blaming the network) or, for a
        # network that ignores it, as a silently NaN sample.  Not for a vmapped x_T: it cannot be read back
        # (data-dependent control flow)
        if values and not _vmapped(x_T) and not all_finite(x_T):
            _fail("x_T", "contains NaN or Inf")
        if timesteps.numel() - 1 < self.min_steps():
            raise ValueError(f"timesteps: {type(self).__name__} needs at least {self.min_steps() + 1} entries")
        if model_timesteps is None:
            model_timesteps = timesteps
        else:
            model_timesteps = half_time_on_range(schedule, model_timesteps)
            validate_model_timesteps(schedule, model_timesteps, timesteps, values=values)
        if x_T.is_cuda and not compiling:
            # the output checks read back once, after the last step (not at all during capture): no step
            # waits for the GPU
            with model.deferred_output_checks():
                return self._solve(model, x_T, timesteps, model_timesteps, model_kwargs)
        return self._solve(model, x_T, timesteps, model_timesteps, model_kwargs)

    def _evaluate(self, model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, step: int,
                  kwargs: Dict[str, Any], returns: str = "both"):
        # no checkpointing under a torch.func transform (eager or compiled): grad/vjp/jacrev/hessian disable the
        # saved-tensor hooks it is built on, and under vmap a later backward's recomputation meets escaped batched
        # tensors.  The evaluation keeps its graph there (the memory of checkpoint_model=False)
        if self.checkpoint_model and torch.is_grad_enabled() and not ops.func_transform_active():
            on = model._checks_on()

            def run(xx, tt):  # the recomputation may run on autograd's device thread: this thread's setting
                with model.output_checks(on):
                    return model.predict(xx, tt, step=step, returns=returns, **kwargs)
            if _compiling():  # a trace checks no values, and takes no side effect (the override) in the checkpoint
                return _checkpoint(lambda xx, tt: model.predict(xx, tt, step=step, returns=returns, **kwargs), x, t,
                                   use_reentrant=False)
            # the generators are replayed in the recomputation only when the evaluation drew random numbers (dropout),
            # as in the whole-sampler node (adjoint._if_drawn): torch's own replay sets the process-wide generator
            # back for every recomputation, under another thread drawing from it
            dev, snap, done = x.device, [adjoint._rng_snapshot(x.device)], [False]

            def replaying(xx, tt):
                if not done[0]:
                    done[0] = True
                    out = run(xx, tt)
                    snap[0] = adjoint._if_drawn(snap[0], dev)
                    return out
                with adjoint._replayed_rng(snap[0], dev):
                    return run(xx, tt)
            return _checkpoint(replaying, x, t, use_reentrant=False, preserve_rng_state=False)
        return model.predict(x, t, step=step, returns=returns, **kwargs)

    def _solve(self, model, x, t, tm, kwargs):
        raise NotImplementedError

    def _history_entry_fn(self):
        """How a model output enters the per-step loop's history: on the fused path in the state's layout, one
        copy instead of one in every update that reads it (``ld3_ext/layout.py``); otherwise as it is (the eager
        ops take any layout, and a torch.func transform's wrapped tensors have no strides to compare)."""
        if ops.resolve_backend(self.backend) == "fused" and not ops.func_transform_active():
            return in_layout_of
        return _as_is


    @staticmethod
    def _backward_checks(model: DiffusionModel, x: torch.Tensor):
        """For the whole-sampler node: its backward's network re-evaluations (checkpointing, a second backward)
        check outputs as this sample call does -- with this thread's ``output_checks`` setting, which a backward
        run on autograd's device thread (CUDA) would not see -- and on CUDA queue the checks and read them back
        once, like sample() does."""
        on, cuda = model._checks_on(), x.is_cuda

        @contextlib.contextmanager
        def checks():
            with model.output_checks(on), (model.deferred_output_checks() if cuda else contextlib.nullcontext()):
                yield
        return checks


class MultistepSolver(Solver):
    """Linear multistep solvers whose every step is ``ops.multistep_update`` with tabulated coefficients."""

    def min_steps(self) -> int:
        return 1

    def _solve(self, model, x, t, tm, kwargs):
        spec = self.spec()
        n = t.numel() - 1
        # sample() validated t already: no second read-back of the grid
        coef = ops.coefficient_table(model.schedule, t, spec, self.backend, validate=False)
        orders = step_orders(spec, n)
        use_eps = spec.uses_noise_prediction
        returns, idx = ("eps", 1) if use_eps else ("x0", 0)
        first = None  # step 0's evaluation, made once for whichever path runs
        if ops.resolve_backend(self.backend) == "fused" and adjoint.applicable(x, coef, tm):
            # one autograd node for the whole solve (ld3_ext/adjoint.py); declines when the model
            # depends on other tensors that require grad, which the per-step loop below handles
            def evaluate(xx, tt, step):
                return model.predict(xx, tt, step=step, returns=returns, **kwargs)[idx]
            first = self._evaluate(model, x, tm[0], 0, kwargs, returns)
            try:
                return adjoint.whole_sampler(evaluate, orders, spec.order, self.checkpoint_model, x, coef, tm,
                                             self._backward_checks(model, x), first=first[idx],
                                             check_outputs=model._fresh_checks_on())
            except adjoint.ForeignGradients:
                pass
        history: List[torch.Tensor] = []  # newest first
        ledger = OutputLedger(model._fresh_checks_on())
        rows = table_rows(coef, 0)
        entry = self._history_entry_fn()
        for i in range(1, n + 1):
            out = first if i == 1 and first is not None else self._evaluate(model, x, tm[i - 1], i - 1, kwargs, returns)
            p = orders[i - 1]
            val = entry(out[idx], x)
            ledger.admit(val, i - 1, x, coef, history[:p - 1])
            history.insert(0, val)
            del history[spec.order:]
            x = ops.multistep_update(x, rows[i - 1], history[:p], self.backend)
        return x
