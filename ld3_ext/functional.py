"""A k-diffusion-style functional API over ld3_ext's solvers.

    x0 = ld3_ext.sample(denoiser, x, sigmas, solver="dpmpp_3m", extra_args={"cond": c})

Conventions (k-diffusion's): the state is in the variance-exploding view x = x0 + sigma * eps, the model is
a denoiser ``denoiser(x, sigma, **extra_args) -> x0`` with ``sigma`` a per-sample ``[B]`` tensor in x's dtype (as
k-diffusion passes it), and ``sigmas`` is a descending 1-D grid that may end in 0.  Internally the solve runs on
an ``EDM(sigma_min, sigma_max)`` schedule built from the sigmas, so every ld3_ext solver (and float / learned
grids, and decoupled model sigmas) can be used.

A :class:`~ld3_ext.wrappers.DiffusionModel` on any schedule is accepted too: it is evaluated in the VE view
(x_model = alpha(t) x at t = t_from_edm_sigma(sigma)), so ``sigmas`` are sigma/alpha of its schedule (what
``LearnedSchedule.to_k_diffusion()`` gives; with ``dtype=torch.float64`` the grid itself, else rounded to
float32 like k-diffusion's own sigmas) and ``x`` is x_model / alpha.  The sigmas must lie in its range
(sigma/alpha at the schedule's t_min..t_max, besides a trailing 0): ``ValueError`` otherwise, as ``solver.sample``.
With decoupled ``model_sigmas`` the network sees the state at its grid time, x_model = alpha(t_i) x, at the model
time (LD3's decoupling, as ``solver.sample(model, x_T, t, model_timesteps)``).  A plain denoiser cannot do that
(it scales x at the sigma it is given), so for a schedule learned with alpha != 1 (VP, flow) pass the
DiffusionModel; for EDM (alpha = 1) both are the same.

**Trailing zero.** If ``sigmas[-1] == 0`` the solver runs on the positive sigmas and the last interval is a
final denoising step ``x = denoiser(x, sigmas[-2])`` (as k-diffusion's samplers do on their last step).  NFE:

* multistep solvers (euler, dpmpp_*, unipc*, ipndm): ``len(sigmas) - 1`` with or without the trailing 0;
* heun: ``2 * (len(sigmas) - 1)`` without a trailing 0; ``2 * (len(sigmas) - 2) + 1`` with one (the last
  interval is the single denoising call, as in k-diffusion's ``sample_heun``).

**Solver names** (``SOLVER_NAMES``): "euler" (= "ddim"), "heun", "dpmpp_2m" (midpoint 2M = k-diffusion's
``sample_dpmpp_2m``), "dpmpp_3m" (3M with heun-type warm-up = k-diffusion's ``sample_dpmpp_3m_sde(eta=0)``),
"dpmpp_2m_heun", "unipc" (UniPC-3 bh1), "unipc_bh2", "unipc_2" (UniPC-2 bh1), "ipndm" (order 4), "ipndm_3";
or any :class:`~ld3_ext.solvers.Solver` instance.  The DPM-Solver++ names use ``lower_order_final=False``
(k-diffusion never lowers the order except through the final denoise); override with ``**solver_kw``.

**Named samplers** (``sample_euler``, ``sample_heun``, ``sample_dpmpp_2m``, ``sample_dpmpp_3m``, ...) have
k-diffusion's signatures; its noise arguments are accepted where they keep the sampler deterministic
(``s_churn=0``, ``eta=0``) and refused with ``ValueError`` otherwise (these are ODE solvers).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Mapping, Optional, Union

import numpy as np
import torch

from ._checks import flag, holds_values
from .ops import _vmapped
from .schedules import EDM
from .solvers import DPMSolverPP, Euler, Heun, IPNDM, Solver, UniPC
from ._finite import all_finite
from .solvers.base import check_model_kwargs, validate_timesteps
from .wrappers import DiffusionModel, _capturing, _compiling, require_diffusion_model, snap_onto_ends

SOLVER_NAMES: Dict[str, Callable[..., Solver]] = {
    "euler": lambda **kw: Euler(**kw),
    "ddim": lambda **kw: Euler(**kw),
    "heun": lambda **kw: Heun(**kw),
    "dpmpp_2m": lambda **kw: DPMSolverPP(**{"order": 2, "solver_type": "midpoint", "lower_order_final": False, **kw}),
    "dpmpp_2m_heun": lambda **kw: DPMSolverPP(**{"order": 2, "solver_type": "heun", "lower_order_final": False, **kw}),
    "dpmpp_3m": lambda **kw: DPMSolverPP(**{"order": 3, "solver_type": "heun", "lower_order_final": False, **kw}),
    "unipc": lambda **kw: UniPC(**{"order": 3, "variant": "bh1", **kw}),
    "unipc_bh2": lambda **kw: UniPC(**{"order": 3, "variant": "bh2", **kw}),
    "unipc_2": lambda **kw: UniPC(**{"order": 2, "variant": "bh1", **kw}),
    "ipndm": lambda **kw: IPNDM(**{"order": 4, **kw}),
    "ipndm_3": lambda **kw: IPNDM(**{"order": 3, **kw}),
}


def get_solver(solver: Union[str, Solver], **solver_kw) -> Solver:
    if isinstance(solver, Solver):
        if solver_kw:
            raise TypeError("solver keyword arguments are only used with a solver name, not a Solver instance")
        return solver
    if not isinstance(solver, str) or solver not in SOLVER_NAMES:  # a list/dict would fail as "unhashable type"
        raise ValueError(f"solver must be a Solver or one of {sorted(SOLVER_NAMES)}, got {solver!r}")
    return SOLVER_NAMES[solver](**solver_kw)


class _VEModel(DiffusionModel):
    """A k-diffusion denoiser, or a DiffusionModel seen in the VE view, as a DiffusionModel on an EDM schedule.

    ``grid`` (the caller's sigmas) and ``evals_per_step`` map a network evaluation's ``step`` to
    k-diffusion's callback: one call per grid interval ``i``, from its first evaluation, with
    ``sigma = grid[i]`` and ``sigma_hat`` the sigma the network saw (the model sigma when decoupled)."""

    # a k-diffusion denoiser takes extra_args as k-diffusion's samplers pass them: its own CFG wrapper reads uncond
    # (CFGDenoiser(x, sigma, uncond, cond, cond_scale)), which DiffusionModel refused as "guidance is off"
    _refuse_guidance_kwargs = False

    def __init__(self, model_or_denoiser, schedule: EDM, callback=None, check_output: Optional[bool] = True,
                 grid: Optional[torch.Tensor] = None, evals_per_step: Optional[int] = 1,
                 state_sigmas: Optional[torch.Tensor] = None):
        # a DiffusionModel checks its own outputs, checked once, not twice: by its own check_output setting, or
        # by this call's (check_output not None), set around each of its evaluations (a backward's re-evaluations
        # included)
        self_check = bool(check_output) and not isinstance(model_or_denoiser, DiffusionModel)
        super().__init__(model_or_denoiser, schedule, prediction="x0", time_input="sigma", check_output=self_check,
                         name=getattr(model_or_denoiser, "name", None) or getattr(model_or_denoiser, "__name__", None))
        self.inner = model_or_denoiser if isinstance(model_or_denoiser, DiffusionModel) else None
        self.inner_checks = check_output if self.inner is not None else None
        self.callback = callback
        self.grid = grid
        self.evals_per_step = evals_per_step
        # decoupled model sigmas on a DiffusionModel: the positive grid (with its gradient), where the states live
        self.state_sigmas = state_sigmas

    # a denoiser gets sigma in x's dtype, as k-diffusion passes it (sigma * x.new_ones(B)): its wrappers scale x by
    # c_in(sigma), and a float32 sigma made a half network's input float32 ("mat1 and mat2 must have the same dtype")
    _time_in_opmath = False
    _fresh_time = True

    def predict(self, x, t, step=None, returns="both", **kwargs):
        # t is the EDM sigma (float64 grid value): keep it in full precision for an inner schedule's t
        inner = self.inner
        want = "both" if returns == "eps" and self.callback is not None else returns  # the callback shows x0
        if inner is None:
            # eps from the base conversion: in float32 for a half state (as wrap_model's models), not in half
            x0, eps = super().predict(x, t, step=step, returns=want, **kwargs)
        else:
            # LD3's decoupling feeds the network the solver's state at its grid time t_i (x_model = alpha(t_i) x)
            # at the model time: scaling x by alpha(model time) instead would solve another ODE than the one the
            # schedule was learned on (solver.sample's), whenever alpha is not 1
            tt = inner.schedule.t_from_edm_sigma(t)
            ts = tt if self.state_sigmas is None else inner.schedule.t_from_edm_sigma(self._state_sigma(step))
            a = inner.schedule.alpha(ts).to(x.dtype)
            # eps is the same in the VP and VE views: the inner model's, converted at its own times
            with (inner.output_checks(self.inner_checks) if self.inner_checks is not None
                  else contextlib.nullcontext()):
                x0, eps = inner.predict(a * x, tt, step=step, returns=want, **kwargs)
        if self.callback is not None:
            self._report(x, t, step, x0)
        return x0, eps

    def _fresh_checks_on(self) -> bool:
        # this wrapper's own NaN check is off for an inner DiffusionModel (that one checks): the static-buffer check
        # follows the inner model's setting, or this call's check_output (ld3_ext.sample skipped it; diff review)
        if self.inner is not None:
            return self.inner._checks_on() if self.inner_checks is None else bool(self.inner_checks)
        return self._checks_on()

    @contextlib.contextmanager
    def deferred_output_checks(self):
        """The inner DiffusionModel's checks are the ones that run (this wrapper's own are off for it): they are
        the ones to queue, with this call's check_output in force when the block starts.  (This wrapper's own
        block would have been a no-op, and each inner check read back at once: on a GPU a sync every step.)"""
        if self.inner is None:
            with super().deferred_output_checks():
                yield
            return
        with (self.inner.output_checks(self.inner_checks) if self.inner_checks is not None
              else contextlib.nullcontext()):
            with self.inner.deferred_output_checks():
                yield

    def _state_sigma(self, step):
        # evaluation `step` sees the state at grid index ceil(step / per) (Heun's corrector: the next grid point;
        # the final denoise, step nfe(n): the last positive sigma)
        return self.state_sigmas[-(-step // self.evals_per_step)]

    def _report(self, x, t, step, x0):
        if _in_backward():  # a re-evaluation for the gradient (checkpointing, double backward): not a new step
            return
        per = self.evals_per_step
        if step is None or per is None:  # no step to map: report every evaluation
            i, sigma = step, t
        elif step % per:
            return  # a later evaluation of the same interval (Heun's corrector): k-diffusion reports none
        else:
            i = step // per
            sigma = self.grid[i] if self.grid is not None and i < self.grid.numel() else t
        self.callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": t, "denoised": x0})


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)  # -1 outside a backward pass
    return task is not None and task() != -1


def _as_tensor_keeping_floats(value, device=None) -> torch.Tensor:
    """torch.as_tensor, but Python floats (a list of them, to_diffusers()'s model_sigmas) stay float64: torch's
    default dtype rounded them to float32 (a sigma of 23.627836437 reached the network as 23.627836227)."""
    t = torch.as_tensor(value, device=device)
    if t.dtype == torch.get_default_dtype() and not isinstance(value, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(value, dtype=torch.float64, device=device)
    return t


def _grid(s, x: torch.Tensor, name: str, decreasing: bool = True) -> torch.Tensor:
    """``decreasing=False`` for model sigmas: LD3's decoupled network times need not keep the grid's order
    (shifted neighbours may meet), and ``solver.sample`` takes model times in any order."""
    if s is None:
        raise TypeError(f"{name} must be a 1-D sequence of numbers (a tensor or a list), got None")
    try:
        s = _as_tensor_keeping_floats(s)
    except (TypeError, ValueError, RuntimeError):  # strings, ragged lists, objects
        raise TypeError(f"{name} must be a 1-D sequence of numbers (a tensor or a list), got "
                        f"{type(s).__name__}") from None
    if s.is_complex() or s.dtype == torch.bool:  # the cast to float64 would drop the imaginary part silently
        raise TypeError(f"{name} must be real numbers, got {s.dtype}")
    if _vmapped(s):  # torch's own error names nothing ("data-dependent control flow")
        raise ValueError(f"{name} cannot be vmapped: sample() builds its EDM schedule from their values; vmap a "
                         f"solver's sample() over its timesteps or model_timesteps instead")
    holds_values(name, s)
    if s.dim() != 1 or s.numel() < 2:
        raise ValueError(f"{name} must be a 1-D sequence with at least 2 entries, got shape {tuple(s.shape)}")
    if not s.is_floating_point():
        s = s.to(torch.float64)
    s = s.to(device=x.device, dtype=torch.float64)
    sd = s.detach()
    if not torch.isfinite(sd).all():
        raise ValueError(f"{name} contains NaN/Inf")
    if decreasing and not (sd[1:] < sd[:-1]).all():
        raise ValueError(f"{name} must be strictly decreasing, got {sd.cpu().tolist()}")
    if not (sd[:-1] > 0).all() or sd[-1] < 0:
        raise ValueError(f"{name} must be positive (only the last entry may be 0), got {sd.cpu().tolist()}")
    return s


def _check_range(schedule, sig: torch.Tensor, name: str) -> None:
    """Every sigma must map into ``schedule``'s [t_min, t_max] up to round-off (``validate_timesteps``'s
    tolerance): outside it the network would run at extrapolated times (e.g. a discrete schedule's index
    1280 of 1000), which ``solver.sample`` refuses too."""
    lo, hi, tol = schedule.t_min, schedule.t_max, schedule.time_slack()
    with torch.no_grad():
        t = schedule.t_from_edm_sigma(sig.detach().to(torch.float64))
        ok = (t >= lo - tol) & (t <= hi + tol)  # False for NaN (a sigma the schedule cannot map)
    if not bool(ok.all()):
        s_lo, s_hi = schedule.edm_sigma(torch.tensor([lo, hi], dtype=torch.float64)).tolist()
        vals = sig.detach().reshape(-1).tolist()
        raise ValueError(f"{name} must lie in the model's sigma range [{s_lo:.6g}, {s_hi:.6g}] (sigma/alpha of its "
                         f"schedule at t_min..t_max; only a trailing 0 may lie below), got [{min(vals):.6g}, "
                         f"{max(vals):.6g}]")


def sample(model_or_denoiser: Union[DiffusionModel, Callable], x: torch.Tensor, sigmas,
           solver: Union[str, Solver] = "dpmpp_3m", model_sigmas=None, extra_args: Optional[Dict[str, Any]] = None,
           callback: Optional[Callable] = None, disable: Any = None, check_output: Optional[bool] = None,
           **solver_kw) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x`` at ``sigmas[0]`` down the grid ``sigmas`` (k-diffusion style).

    ``model_sigmas`` (same length as ``sigmas``) are where the network is evaluated (LD3's decoupled times;
    default ``sigmas``); with a trailing 0 the final denoise uses ``model_sigmas[-2]``.  ``extra_args`` are
    passed to every model call.  ``callback(dict(x, i, sigma, sigma_hat, denoised))`` runs once per
    grid interval as k-diffusion's samplers do: ``i`` = 0 .. len(sigmas) - 2, ``sigma = sigmas[i]``, ``sigma_hat``
    the sigma the network saw (``model_sigmas[i]``), ``denoised`` the interval's first evaluation (Heun's
    corrector is not reported); ``disable`` is accepted for signature compatibility.
    A :class:`DiffusionModel` with its own schedule takes only sigmas in its range (sigma/alpha at its
    t_min..t_max, plus a trailing 0); others raise ``ValueError``.
    ``check_output``: a model output with NaN/Inf raises ``ModelOutputError`` naming the step (as ``wrap_model``
    does; False lets it through, as k-diffusion does).  Default: on for a denoiser, a :class:`DiffusionModel`'s own
    ``check_output`` setting for one; an explicit value overrides that setting for this call.
    Differentiable w.r.t. ``x``, ``sigmas`` and ``model_sigmas`` (float tensors).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating torch.Tensor")
    holds_values("x", x)
    if x.dim() < 1 or x.shape[0] == 0:  # the solver's own check would call it x_T
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    # named here as x (the solver would call it x_T; a final-denoise-only grid reaches no solver)
    if not (_compiling() or _capturing() or _vmapped(x)) and not all_finite(x):
        raise ValueError("x contains NaN/Inf")
    if not callable(model_or_denoiser):
        raise TypeError(f"model_or_denoiser must be a DiffusionModel or a callable denoiser(x, sigma, **kw) -> x0, "
                        f"got {type(model_or_denoiser).__name__}")
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be a dict of model keyword arguments, got {type(extra_args).__name__}")
    if callback is not None and not callable(callback):  # else "'int' object is not callable" after a model call
        raise TypeError(f"callback must be callable (it is called with a dict per step) or None, got "
                        f"{type(callback).__name__}")
    if check_output is not None:
        check_output = flag("check_output", check_output)
    if check_output is None and not isinstance(model_or_denoiser, DiffusionModel):
        check_output = True  # a DiffusionModel's default: its own setting
    sv = get_solver(solver, **solver_kw)
    s = _grid(sigmas, x, "sigmas")
    ms = s if model_sigmas is None else _grid(model_sigmas, x, "model_sigmas", decreasing=False)
    if ms.shape != s.shape:
        raise ValueError(f"model_sigmas must have the length of sigmas ({s.numel()}), got {ms.numel()}")
    final_denoise = bool(s.detach()[-1] == 0)
    if final_denoise != bool(ms.detach()[-1] == 0) and model_sigmas is not None:
        raise ValueError("sigmas and model_sigmas must both end in 0 or both end above 0")
    pos, mpos = (s[:-1], ms[:-1]) if final_denoise else (s, ms)
    if isinstance(model_or_denoiser, DiffusionModel):
        # a range end rounded past itself by the sigmas' own dtype (SD's sigma_max 14.6146 is 14.625 in
        # bfloat16) is that end, as to_denoiser takes it
        sch = model_or_denoiser.schedule
        lo_s, hi_s = sch.edm_sigma(torch.tensor([sch.t_min, sch.t_max], dtype=torch.float64)).tolist()
        pos = _snap_to_range(pos, lo_s, hi_s, eps=_eps_of(sigmas))
        _check_range(sch, pos, "sigmas")
        if model_sigmas is not None:
            mpos = _snap_to_range(mpos, lo_s, hi_s, eps=_eps_of(model_sigmas))
            _check_range(sch, mpos, "model_sigmas")
        else:
            mpos = pos
    both = torch.cat([pos.detach(), mpos.detach()])
    lo, hi = both.min().item(), both.max().item()
    schedule = EDM(lo, hi) if hi > lo else EDM(lo, lo * (1 + 1e-6))
    n = pos.numel() - 1
    # network evaluations per grid interval (Heun: 2), for the callback's interval index; None: not uniform
    per = sv.nfe(1)
    per = per if per >= 1 and sv.nfe(max(n, 1)) == per * max(n, 1) else None
    state_sigmas = None
    if isinstance(model_or_denoiser, DiffusionModel) and model_sigmas is not None and not torch.equal(pos, mpos):
        if per is None:
            raise ValueError(f"model_sigmas with a DiffusionModel need a solver with a fixed number of network "
                             f"evaluations per step (the state's sigma is found from the evaluation's step), got "
                             f"{type(sv).__name__}")
        state_sigmas = pos
    model = _VEModel(model_or_denoiser, schedule, callback, check_output=check_output, grid=s.detach(),
                     evals_per_step=per, state_sigmas=state_sigmas)
    kw = dict(extra_args or {})
    check_model_kwargs(kw, "extra_args")
    if n >= 1:
        # a degenerate step named in the caller's terms: entry j of the positive grid is sigmas[j]
        validate_timesteps(schedule, pos, name="sigmas", spec=sv.spec(), values=not (_compiling() or _capturing()))
        x = sv.sample(model, x, pos, mpos, **kw)
    if final_denoise:
        # its step (the evaluation index) names it in a NaN/Inf error, with or without a callback
        x = model.predict(x, mpos[-1], step=sv.nfe(n) if n >= 1 else 0, **kw)[0]
    return x


def to_denoiser(model: DiffusionModel) -> Callable:
    """A k-diffusion denoiser ``D(x, sigma, **kw) -> x0`` (VE view, per-sample sigma [B]) for a DiffusionModel,
    e.g. to run k-diffusion's own samplers on an ld3_ext model.  All samples must share one sigma, in the
    model's range (sigma/alpha at its schedule's t_min..t_max, an end rounded by sigma's own dtype counting as
    that end; others raise ``ValueError``).  A :class:`Denoiser`: it pickles (torch.save, multiprocessing) when the
    model does."""
    require_diffusion_model(model)  # a k-diffusion denoiser already is one: pass it to its samplers as it is
    return Denoiser(model)


class Denoiser:
    """:func:`to_denoiser`'s callable: a module-level class, not a closure, so that it pickles."""

    def __init__(self, model: DiffusionModel):
        s = model.schedule
        self.model = model
        self._lo_s, self._hi_s = s.edm_sigma(torch.tensor([s.t_min, s.t_max], dtype=torch.float64)).tolist()
        self.__name__ = f"denoiser_{model.name}"

    def __repr__(self) -> str:
        return f"{self.__name__}(sigma in [{self._lo_s:.4g}, {self._hi_s:.4g}])"

    def __call__(self, x, sigma, **kw):
        model, s = self.model, self.model.schedule
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        check_model_kwargs(kw, "the denoiser's keyword arguments")
        try:
            sig = _as_tensor_keeping_floats(sigma, device=x.device).reshape(-1)
        except (TypeError, ValueError, RuntimeError):  # a str or None failed in torch naming nothing
            raise TypeError(f"sigma must be a number or a tensor of sigmas, got {type(sigma).__name__}") from None
        if sig.numel() == 0:
            raise ValueError("sigma must hold one sigma per sample (shape [B]) or one for all, got an empty tensor")
        if sig.is_complex() or sig.dtype == torch.bool:
            raise TypeError(f"sigma must be real numbers, got {sig.dtype}")
        # a half state's sampler grid is rounded in half, whatever dtype sigma then arrives in (ld3_ext.sample
        # hands a float32 image of it): its round-off counts too
        sig = _snap_to_range(sig, self._lo_s, self._hi_s, eps=max(_eps_of(sig), _eps_of(x)))
        # the checks read values back: not while tracing/capturing, nor from a vmapped sigma
        if not (_compiling() or _capturing() or _vmapped(sig)):
            _check_denoiser_sigma(s, sig)
        t = s.t_from_edm_sigma(sig[0])
        return model.predict(s.alpha(t).to(x.dtype) * x, t, **kw)[0]


def _snap_to_range(sig: torch.Tensor, lo: float, hi: float, eps: Optional[float] = None) -> torch.Tensor:
    """``sig`` in float64, with values outside [lo, hi] by no more than its own dtype's round-off (``eps``: that of
    the dtype sig came in) moved onto that end: k-diffusion passes ``sigma * ones`` in x's dtype, which may not
    hold the range's ends (Stable Diffusion's sigma_max 14.6146 is 14.625 in bfloat16, 14.617 in float16), so a
    half state was refused at its first step."""
    e = eps if eps is not None else _eps_of(sig)
    return snap_onto_ends(sig, lo, hi, lo * (1 - e), hi * (1 + e))  # sigmas: relative round-off


def _eps_of(values) -> float:
    """The round-off of the dtype ``values`` came in (0 for integers; a list of floats is float64)."""
    dtype = getattr(values, "dtype", None)  # a tensor's or a numpy array's
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    if isinstance(dtype, np.dtype):
        return float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0
    return float(np.finfo(np.float64).eps)


def _check_denoiser_sigma(schedule, sig: torch.Tensor) -> None:
    """In the model's range, and one sigma for the whole batch: the model runs at one time per call, so a
    per-sample sigma with different entries would evaluate every sample at sigma[0].  One read-back."""
    lo, hi, tol = schedule.t_min, schedule.t_max, schedule.time_slack()
    with torch.no_grad():
        sd = sig.detach().to(torch.float64)
        t = schedule.t_from_edm_sigma(sd)
        out_of_range = ~((t >= lo - tol) & (t <= hi + tol))
        differ = sd != sd[0]
        flags = torch.stack([out_of_range.any(), differ.any()]).tolist()
    if flags[0]:
        _check_range(schedule, sig, "sigma")  # raises, with the range in its message
    if flags[1]:
        vals = sd.cpu().tolist()
        raise ValueError(f"sigma must be the same for every sample (ld3_ext models take one time per call), got "
                         f"{len(vals)} values from {min(vals):.6g} to {max(vals):.6g}")


# k-diffusion's sampler signatures.  Their noise arguments are accepted at the values that keep the sampler
# deterministic (k-diffusion's own default for the Euler/Heun family); stochastic values are refused, as
# ld3_ext integrates the probability-flow ODE only.

def _check_churn(sigmas, s_churn, s_tmin, s_tmax) -> None:
    if not isinstance(s_churn, (int, float)) or isinstance(s_churn, bool) or not s_churn >= 0:
        raise ValueError(f"s_churn must be a number >= 0, got {s_churn!r}")
    if s_churn == 0:
        return
    # k-diffusion adds noise at step i only if s_tmin <= sigmas[i] <= s_tmax: a window missing the grid is
    # deterministic
    sd = torch.as_tensor(sigmas).detach().reshape(-1)[:-1].to(torch.float64)
    if bool(((sd >= s_tmin) & (sd <= s_tmax)).any()):
        raise ValueError(f"s_churn={s_churn!r} > 0 adds noise at the sigmas in [s_tmin, s_tmax] = "
                         f"[{s_tmin!r}, {s_tmax!r}] (stochastic sampling), which ld3_ext's ODE solvers do not do; "
                         f"use s_churn=0")


def _check_eta(eta) -> None:
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0 or math.isinf(eta):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if eta > 0:
        raise ValueError(f"eta={eta!r} > 0 is SDE (stochastic) sampling, which ld3_ext's ODE solvers do not do; "
                         f"use eta=0")


def _churn_sampler(name: str):
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
           s_tmax=float("inf"), s_noise=1., **kw):
        _check_churn(sigmas, s_churn, s_tmin, s_tmax)  # s_noise only scales churn noise: unused at s_churn=0
        return sample(model, x, sigmas, solver=name, extra_args=extra_args, callback=callback, disable=disable, **kw)
    return _named(fn, name, "s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1., ")


def _eta_sampler(name: str):
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0., s_noise=1., noise_sampler=None,
           **kw):
        _check_eta(eta)  # s_noise and noise_sampler are unused at eta=0 (as in k-diffusion)
        return sample(model, x, sigmas, solver=name, extra_args=extra_args, callback=callback, disable=disable, **kw)
    return _named(fn, name, "eta=0., s_noise=1., noise_sampler=None, ")


def _plain_sampler(name: str):
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **kw):
        return sample(model, x, sigmas, solver=name, extra_args=extra_args, callback=callback, disable=disable, **kw)
    return _named(fn, name, "")


def _named(fn, name: str, noise_args: str):
    fn.__name__ = fn.__qualname__ = f"sample_{name}"
    fn.__doc__ = (f"k-diffusion-style ``sample_{name}(model, x, sigmas, extra_args=None, callback=None, disable=None, "
                  f"{noise_args}**kw)``: ``sample(..., solver={name!r})``; ``**kw`` go to ``sample`` (model_sigmas, "
                  f"check_output, solver options).")
    return fn


sample_euler = _churn_sampler("euler")
sample_heun = _churn_sampler("heun")
sample_dpmpp_2m = _plain_sampler("dpmpp_2m")
sample_dpmpp_3m = _eta_sampler("dpmpp_3m")
sample_unipc = _plain_sampler("unipc")
sample_ipndm = _plain_sampler("ipndm")

__all__ = ["sample", "to_denoiser", "get_solver", "SOLVER_NAMES", "sample_euler", "sample_heun", "sample_dpmpp_2m",
           "sample_dpmpp_3m", "sample_unipc", "sample_ipndm"]
