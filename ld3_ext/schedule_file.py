"""Learned schedules and their file format.

A :class:`LearnedSchedule` is what :class:`ld3_ext.training.LD3Trainer` returns: the solver grid
``timesteps`` (t_0 = t_max > ... > t_N = t_min) and the network times ``model_timesteps`` (LD3's
decoupled times, same length, the same endpoints), float64 1-D tensors in the schedule's time units,
plus everything needed to use them correctly::

    s = load_schedule("cifar_unipc_nfe6.json")
    x0 = solver.sample(model, x_T, s.timesteps, model_timesteps=s.model_timesteps)

File format: versioned JSON (``"format": "ld3_ext.schedule"``, ``"version": 1``) with a sha256
checksum over the canonical JSON of the rest of the document, written atomically.  Floats are
written with Python's shortest round-trip repr, so float64 values survive exactly.

Fields: timesteps, model_timesteps, nfe, num_steps, solver (``Solver.config()``), schedule
(``NoiseSchedule.config()``), guidance_scale, model ({name, weights_hash, hash_source}), time_mode,
decoupled, training (settings), metrics, library_version, created (UTC ISO time), checksum.  Fields this version
does not know (written by a newer ld3_ext of the same format version) are kept in ``LearnedSchedule.extra`` and
written back by ``save``, so a load -> save round trip loses nothing.
"""
from __future__ import annotations

import copy
import datetime as _dt
import math
import numbers
import os
import warnings
from typing import Any, Dict, Optional, Union

import torch

from .atomic_io import CorruptFileError, atomic_write_json, json_checksum, json_safe, read_json_checked

FORMAT = "ld3_ext.schedule"
VERSION = 1
_REQUIRED = {"format": str, "version": int, "timesteps": list, "model_timesteps": list, "nfe": int,
             "num_steps": int, "solver": dict, "schedule": dict, "checksum": str}


# every field this version writes (LearnedSchedule.to_dict); any other is a newer version's, kept as ``extra``
_FIELDS = ("format", "version", "timesteps", "model_timesteps", "nfe", "num_steps", "solver", "schedule",
           "guidance_scale", "model", "time_mode", "decoupled", "training", "metrics", "library_version", "created")
_NOT_EXTRA = frozenset(_FIELDS) | {"checksum"}  # the checksum is recomputed by save(), never carried as extra


class ScheduleFileError(CorruptFileError):
    """A schedule file is corrupt, truncated, tampered with, or not a valid schedule."""


def _library_version() -> str:
    try:
        from . import __version__
        return str(__version__)
    except Exception:  # partially initialised package (import cycles) -- keep saving possible
        return "unknown"


def _as_grid(x, name: str) -> torch.Tensor:
    dt = getattr(x, "dtype", None)
    # a float64 conversion would drop the imaginary part silently
    if (isinstance(dt, torch.dtype) and dt.is_complex) or getattr(dt, "kind", None) == "c":
        raise TypeError(f"{name} must be real numbers, got dtype {dt}")
    try:
        t = torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise TypeError(f"{name} must be a sequence or tensor of real numbers, got {type(x).__name__} ({e})") from None
    if t.dim() != 1:  # flattened silently before: a [2, k] table became one grid (init= refuses it alike)
        raise ValueError(f"{name} must be 1-D (a grid of times), got shape {tuple(t.shape)}")
    t = t.detach().cpu().clone()
    if t.numel() < 2:
        raise ValueError(f"{name} needs at least 2 values, got {t.numel()}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN/Inf")
    return t


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond the float64 range (JSON allows such literals)
        return False


def _writable(v, where: str, finite: bool = False):
    """``v`` as a value :func:`atomic_write_json` can write and a load gives back with the same meaning: NaN/Inf as
    None (``json_safe``), numpy scalars as Python numbers, int dict keys as the strings JSON makes of them; anything
    else (tensors, arrays, objects, non-int non-str keys) is a ValueError naming ``where``.  ``finite``: NaN/Inf
    is a ValueError too (in a solver or noise-schedule config, None would mean the default, not NaN)."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        if finite and not math.isfinite(v):
            raise ValueError(f"{where}: {v!r} cannot be written to a schedule file (JSON has no NaN/Inf)")
        return json_safe(float(v))  # np.float64 is a float: stored as a plain one
    if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # np.float32(0.5) etc.
        return _writable(v.item(), where, finite)
    if isinstance(v, (list, tuple)):
        return [_writable(x, f"{where}[{i}]", finite) for i, x in enumerate(v)]
    if isinstance(v, dict):
        out, seen = {}, {}
        for k, x in v.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise ValueError(f"{where}: key {k!r} ({type(k).__name__}) cannot be written to a schedule file "
                                 "(JSON keys are strings)")
            key = str(k)
            if key in seen:
                raise ValueError(f"{where}: keys {seen[key]!r} and {k!r} would both be written as {key!r}")
            seen[key] = k
            out[key] = _writable(x, f"{where}[{k!r}]", finite)
        return out
    hint = " (use .item() or .tolist())" if isinstance(v, torch.Tensor) else ""
    raise ValueError(f"{where}: a {type(v).__name__} cannot be written to a schedule file{hint}; use JSON values "
                     "(numbers, strings, bools, None, lists, dicts)")


# optional fields: the type allowed besides None, and its name in messages
_OPTIONAL = {"guidance_scale": (numbers.Real, "number"), "model": (dict, "dict"), "time_mode": (str, "str"),
             "decoupled": (bool, "bool"), "training": (dict, "dict"), "metrics": (dict, "dict"),
             "library_version": (str, "str"), "created": (str, "str")}


def _check_contents(ts, ms, nfe, solver_config, schedule_config, optional: Dict[str, Any], *,
                    solver_key: str = "solver_config", schedule_key: str = "schedule_config") -> None:
    """The rules for a schedule's contents, shared by :class:`LearnedSchedule` and :func:`validate_schedule_dict`.

    ``ts``, ``ms``: the grids as lists of finite floats of one length; ``optional``: the optional fields.
    Raises TypeError/ValueError naming the field (``*_key``: the config fields' names where called from)."""
    n = len(ts) - 1
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral):
        raise TypeError(f"nfe must be an int, got {nfe!r}")
    if n < 1 or nfe < 1:
        raise ValueError(f"nfe and num_steps must be >= 1 (nfe={nfe}, num_steps={n})")
    if not all(a > b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
    if not isinstance(solver_config, dict) or "name" not in solver_config:
        raise ValueError(f"{solver_key} must be a solver config dict with a 'name', got {solver_config!r}")
    if not isinstance(schedule_config, dict) or "type" not in schedule_config:
        raise ValueError(f"{schedule_key} must be a noise-schedule config dict with a 'type', got {schedule_config!r}")
    for k, (typ, what) in _OPTIONAL.items():
        v = optional.get(k)
        if v is not None and (not isinstance(v, typ) or (typ is not bool and isinstance(v, bool))):
            raise TypeError(f"{k} must be None or a {what}, got {type(v).__name__}")
    g = optional.get("guidance_scale")
    if g is not None and not _finite(g):
        raise ValueError(f"guidance_scale must be finite, got {g!r}")
    from .schedules import schedule_from_config
    try:
        sched = schedule_from_config(schedule_config)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{schedule_key}: invalid noise-schedule config: {e}") from None
    tol = sched.time_slack()
    if abs(ts[0] - sched.t_max) > tol or abs(ts[-1] - sched.t_min) > tol:
        raise ValueError(f"timesteps must run from t_max={sched.t_max:.6g} to t_min={sched.t_min:.6g}, got "
                         f"{ts[0]:.6g} ... {ts[-1]:.6g}")
    lo, hi = sched.t_min - tol, sched.t_max + tol
    if not all(lo <= x <= hi for x in ms):
        raise ValueError(f"model_timesteps leave the schedule's time range [{sched.t_min:.6g}, {sched.t_max:.6g}]")
    mtol = 1e-3 * (sched.t_max - sched.t_min)  # the solvers' model-time tolerance (validate_model_timesteps)
    if abs(ms[0] - ts[0]) > mtol or abs(ms[-1] - ts[-1]) > mtol:
        raise ValueError(f"model_timesteps must have the same endpoints as timesteps ({ts[0]:.6g} ... {ts[-1]:.6g}, "
                         f"within {mtol:.3g}), got {ms[0]:.6g} ... {ms[-1]:.6g}")
    from .solvers import solver_from_config
    try:
        solver = solver_from_config(solver_config)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{solver_key}: invalid solver config: {e}") from None
    if solver.nfe(n) != nfe:
        raise ValueError(f"nfe={nfe} does not match {n} steps of {solver_config['name']} ({solver.nfe(n)} NFE)")


class LearnedSchedule:
    """A learned (or any) time grid bound to the solver, NFE and noise schedule it was made for."""

    def __init__(self, timesteps, model_timesteps=None, *, solver_config: Dict[str, Any], nfe: int,
                 schedule_config: Dict[str, Any], guidance_scale: Optional[float] = None,
                 model: Optional[Dict[str, Any]] = None, time_mode: Optional[str] = None,
                 decoupled: Optional[bool] = None, training: Optional[Dict[str, Any]] = None,
                 metrics: Optional[Dict[str, Any]] = None, library_version: Optional[str] = None,
                 created: Optional[str] = None, extra: Optional[Dict[str, Any]] = None, _checked: bool = False):
        # _checked: the contents passed validate_schedule_dict already (load_schedule), no second run of the rules
        # extra: fields this version does not know (a newer ld3_ext's), written back unchanged by save()
        self.timesteps = _as_grid(timesteps, "timesteps")
        self.model_timesteps = (self.timesteps.clone() if model_timesteps is None
                                else _as_grid(model_timesteps, "model_timesteps"))
        if self.model_timesteps.shape != self.timesteps.shape:
            raise ValueError(f"model_timesteps ({self.model_timesteps.numel()}) and timesteps "
                             f"({self.timesteps.numel()}) must have the same length")
        if not _checked:
            # what save() cannot write is made writable (same meaning) or refused here, not at save time
            model, training, metrics = (v if not isinstance(v, dict) else _writable(v, k) for k, v in
                                        (("model", model), ("training", training), ("metrics", metrics)))
            # the configs too: an np.int64 order or a tensor sigma_min would only fail in save(), after training
            solver_config, schedule_config = (v if not isinstance(v, dict) else _writable(v, k, finite=True)
                                              for k, v in (("solver_config", solver_config),
                                                           ("schedule_config", schedule_config)))
            # the same rules as a schedule file (validate_schedule_dict): a grid made here is one that loads back
            _check_contents(self.timesteps.tolist(), self.model_timesteps.tolist(), nfe, solver_config,
                            schedule_config, dict(guidance_scale=guidance_scale, model=model, time_mode=time_mode,
                                                  decoupled=decoupled, training=training, metrics=metrics,
                                                  library_version=library_version, created=created))
        self.solver_config = dict(solver_config)
        self.nfe = int(nfe)
        self.schedule_config = dict(schedule_config)
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.model = dict(model or {})
        self.time_mode = time_mode
        self.decoupled = decoupled
        self.training = dict(training or {})
        self.metrics = dict(metrics or {})
        self.library_version = library_version or _library_version()
        self.created = created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        extra = dict(extra or {})
        known = [k for k in extra if k in _NOT_EXTRA]
        if known:
            raise ValueError(f"extra: {known} are schedule fields of this version, not extra ones")
        self.extra = extra if _checked else _writable(extra, "extra")

    # --- convenience -------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.timesteps.numel() - 1

    @property
    def schedule(self):
        from .schedules import schedule_from_config
        return schedule_from_config(self.schedule_config)

    def solver(self, **overrides):
        """A fresh solver built from the stored config (the grid is solver-specific: use this one)."""
        from .solvers import solver_from_config
        return solver_from_config(self.solver_config, **overrides)

    def check_guidance(self, guidance_scale: Optional[float]) -> bool:
        """Warn (and return False) when used at another classifier-free guidance scale than trained for:
        the ODE, hence the best grid, changes with the scale."""
        from ._checks import guidance
        return guidance_matches(self.guidance_scale, guidance("guidance_scale", guidance_scale), "this schedule",
                                stacklevel=4)

    def sample(self, model, x_T: torch.Tensor, solver=None, **model_kwargs) -> torch.Tensor:
        """``solver.sample(model, x_T, timesteps, model_timesteps=...)`` on x_T's device.

        The model must use the noise schedule the grid was learned on (its times mean other noise levels on
        any other: ValueError); another solver than the file's (a Solver, or a name for
        :func:`ld3_ext.solvers.make_solver`) is allowed, with a warning (the grid was learned for that solver
        and NFE)."""
        from .schedules import FlowMatching, NoiseSchedule, describe_schedule
        from .solvers import as_solver
        if not isinstance(x_T, torch.Tensor):
            raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
        solver = as_solver(solver)
        sched = getattr(model, "schedule", None)
        cfg = self.schedule_config
        if isinstance(sched, FlowMatching) and isinstance(cfg, dict) and cfg.get("type") == "FlowMatching":
            # a flow shift moves only the hand-made grids, not alpha or sigma (Flux varies it with resolution)
            cfg = {**cfg, "shift": sched.shift}
        if isinstance(sched, NoiseSchedule) and not sched.same_as(cfg):
            raise ValueError(f"model: this schedule was learned on the noise schedule "
                             f"{describe_schedule(self.schedule_config)}, but the model uses {sched!r}: its times would "
                             f"mean other noise levels")
        self.check_guidance(getattr(model, "guidance_scale", None))
        if solver is None:
            solver = self.solver()
        elif solver.config() != self.solver().config() or solver.nfe(self.num_steps) != self.nfe:
            warnings.warn(f"solver: this grid was learned for {self.solver()!r} at NFE {self.nfe}; sampling with "
                          f"{solver!r} (NFE {solver.nfe(self.num_steps)}) may be far from its best", UserWarning,
                          stacklevel=2)
        tm = self.solver_model_timesteps()
        return solver.sample(model, x_T, self.timesteps.to(x_T.device),
                             model_timesteps=None if tm is None else tm.to(x_T.device), **model_kwargs)

    def solver_model_timesteps(self) -> Optional[torch.Tensor]:
        """``model_timesteps`` as a solver takes them: None where they equal the timesteps (a schedule learned
        with ``decoupled=False``, or whose shifts stayed 0), so the solver knows the network runs at the grid's own
        times -- Heun then takes the noise view there, as the trainer did (``solvers.heun.heun_view``)."""
        return None if torch.equal(self.model_timesteps, self.timesteps) else self.model_timesteps

    @property
    def metadata(self) -> Dict[str, Any]:
        """Everything but the two grids: a deep copy (editing its nested dicts leaves the schedule unchanged)."""
        d = copy.deepcopy(self.to_dict())
        for k in ("timesteps", "model_timesteps", "format", "version"):
            d.pop(k, None)
        return d

    def __repr__(self):
        return (f"LearnedSchedule(nfe={self.nfe}, solver={self.solver_config.get('name')}, "
                f"timesteps={[round(v, 5) for v in self.timesteps.tolist()]})")

    # --- exports -----------------------------------------------------------------------------
    def _edm_sigmas(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.edm_sigma(t)

    def to_k_diffusion(self, append_zero: bool = False, *, dtype: Optional[torch.dtype] = None,
                       device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """k-diffusion ``sigmas`` (sigma/alpha, descending) of the solver grid, in ``dtype`` on ``device``.

        As k-diffusion's own ``get_sigmas_*``: torch's default dtype (float32) on the CPU unless asked otherwise.
        Pass the network's device (``device=x.device``): k-diffusion's Euler, Heun and LMS samplers broadcast a
        sigma to x's dimensions, so a CPU or float64 grid fails against a GPU or float32 network (or turns the
        state float64).  ``dtype=torch.float64`` keeps the learned times unrounded, for float64 sampling.

        LD3 grids end at t_min (sigma_min > 0) and were trained *without* a final jump to sigma = 0, so
        the default omits the trailing 0 (k-diffusion samplers then stop at sigma_min and return x
        there).  ``append_zero=True`` adds it for samplers that expect it; that adds a last step the
        schedule was not trained for.  Decoupled model times cannot be expressed in k-diffusion's API: for a
        decoupled schedule this warns (k-diffusion's samplers evaluate the network at these sigmas instead);
        ``ld3_ext.sample(model, x, sigmas, model_sigmas=...)`` takes them (``to_diffusers()["model_sigmas"]``) for
        an ld3_ext ``DiffusionModel`` (a k-diffusion denoiser: ``wrap_model(denoiser, schedule, prediction="edm")``)
        -- a plain denoiser passed to ``ld3_ext.sample`` scales x at the sigma it is given, which is another map
        once alpha != 1 (VP, flow; ``ld3_ext/functional.py``).
        k-diffusion's samplers run the schedule's own solver only for Euler (``sample_euler``), Heun
        (``sample_heun``), DPMSolverPP(2, "midpoint", lower_order_final=False) (``sample_dpmpp_2m``) and
        DPMSolverPP(3, "heun", lower_order_final=False) (``sample_dpmpp_3m_sde``, eta=0).  With k-diffusion's
        discrete-time model wrappers (``CompVisDenoiser``, ``DiscreteEpsDDPMDenoiser``) use ``quantize=False``:
        ``quantize=True`` rounds the learned (float) times to integer training indices.  Even unquantized they
        read a sigma between two training indices by interpolating log sigma in the index, where ``VPDiscrete``
        interpolates log alpha in t: the same sigma lands up to ~0.1 index apart, so a VP sample through those
        wrappers differs from the schedule's own by ~1e-5 relative (exact at integer indices).  k-diffusion
        samples in the VE view: its result is x/alpha at the last time (divide ``sample()``'s by alpha(t_N) to
        compare; 0.99957 for Stable Diffusion's schedule).
        """
        from ._checks import flag, torch_device
        append_zero = flag("append_zero", append_zero)  # "no" is truthy: it appended the 0
        if self.solver_model_timesteps() is not None:
            warnings.warn("this schedule has decoupled model times (model_timesteps), which k-diffusion's sigmas "
                          "cannot carry: its samplers will evaluate the network at the solver grid, not where the "
                          "schedule was learned to; use ld3_ext.sample(model, x, sigmas, "
                          "model_sigmas=to_diffusers()['model_sigmas']) with model an ld3_ext DiffusionModel (a "
                          "k-diffusion denoiser: wrap_model(denoiser, schedule, prediction='edm')) to keep them",
                          UserWarning, stacklevel=2)
        if dtype is None:
            dtype = torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"to_k_diffusion: dtype must be a floating torch.dtype, got {dtype!r}")
        device = torch_device("to_k_diffusion", "cpu" if device is None else device)
        s = self._edm_sigmas(self.timesteps)
        if append_zero:
            s = torch.cat([s, s.new_zeros(1)])
        return s.to(device=device, dtype=dtype)

    def to_diffusers(self) -> Dict[str, Any]:
        """A dict for diffusers-style schedulers (plain Python floats).

        * ``sigmas``: N+1 descending values sigma/alpha of the solver grid t_0..t_N, *including* the trailing
          value sigma_N = sigma/alpha(t_min) > 0.  diffusers' schedulers take them differently (diffusers 0.42):
          ``EulerDiscreteScheduler.set_timesteps(sigmas=...)`` takes all N+1 (it appends nothing to a custom
          list: passing ``sigmas[:-1]`` silently drops the last step); ``DPMSolverMultistepScheduler`` has no
          ``sigmas`` argument and ``UniPCMultistepScheduler`` accepts one only with ``use_flow_sigmas=True`` --
          for those, overwrite ``scheduler.sigmas`` (and ``timesteps``) after ``set_timesteps(N)``.  A trailing
          0 adds a final denoising step this schedule was not trained for.  To run the grid exactly (decoupled
          network times and the learned solver included), use ``LD3Scheduler.from_schedule_file``
          (``ld3_ext.integrations.diffusers_scheduler``).
        * ``timesteps``: the solver grid in VPDiscrete training-index units (t*N_train - 1, floats, not
          rounded: diffusers casts to int64, which moves them); for other schedules the schedule's own time.
        * ``model_sigmas`` / ``model_timesteps``: the same for the network times (LD3's decoupled times);
          the first N entries are where the network is evaluated.  diffusers schedulers cannot use them
          directly (they evaluate at the solver grid); ``decoupled`` says whether they differ.
        * ``flow_sigmas`` / ``flow_model_sigmas`` (``FlowMatching`` schedules only): the grids in the units of
          diffusers' flow schedulers, whose sigma is the flow time t itself (alpha = 1 - sigma), not sigma/alpha
          as in ``sigmas``.  ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` would shift them again
          (its ``shift``) and append a 0, so run them as ``scheduler.set_timesteps(N)`` followed by
          ``scheduler.sigmas = torch.tensor(flow_sigmas)`` (N+1 values) AND ``scheduler.timesteps =
          torch.tensor(flow_sigmas[:-1]) * scheduler.config.num_train_timesteps``: a pipeline hands the network
          ``scheduler.timesteps`` (sigma times ``num_train_timesteps``), which ``set_timesteps`` left at its own
          grid.  Decoupled network times (``flow_model_sigmas``) cannot be run that way: the scheduler's step
          reads the network output at the state's own sigma; use ``LD3Scheduler``.
        """
        from .schedules import FlowMatching, VPDiscrete

        sched = self.schedule
        if isinstance(sched, VPDiscrete):
            idx, midx, units = sched.model_index(self.timesteps), sched.model_index(self.model_timesteps), "index"
        else:
            idx, midx, units = self.timesteps, self.model_timesteps, "t"
        flow = {}
        if isinstance(sched, FlowMatching):  # alpha = 1 - t, sigma = t: diffusers' flow sigma is t
            flow = {"flow_sigmas": self.timesteps.tolist(), "flow_model_sigmas": self.model_timesteps.tolist()}
        return {
            **flow,
            "sigmas": self._edm_sigmas(self.timesteps).tolist(),
            "timesteps": idx.tolist(),
            "timestep_units": units,
            "model_sigmas": self._edm_sigmas(self.model_timesteps).tolist(),
            "model_timesteps": midx.tolist(),
            "final_sigmas_type": "sigma_min",
            "num_inference_steps": self.num_steps,
            "decoupled": self.solver_model_timesteps() is not None,
        }

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A deep copy: editing it (``d["solver"]["order"] = 3``) changed how this schedule samples."""
        return copy.deepcopy({
            **self.extra,
            "format": FORMAT, "version": VERSION,
            "timesteps": self.timesteps.tolist(), "model_timesteps": self.model_timesteps.tolist(),
            "nfe": self.nfe, "num_steps": self.num_steps, "solver": self.solver_config,
            "schedule": self.schedule_config, "guidance_scale": self.guidance_scale, "model": self.model,
            "time_mode": self.time_mode, "decoupled": self.decoupled, "training": self.training,
            "metrics": self.metrics, "library_version": self.library_version, "created": self.created,
        })

    @classmethod
    def from_dict(cls, d: Dict[str, Any], _checked: bool = False) -> "LearnedSchedule":
        """The schedule of a ``to_dict()`` document (``model_timesteps`` optional, as in the constructor).  A
        document of another format or a newer version is refused as ``load_schedule`` refuses the file."""
        if not _checked:
            if not isinstance(d, dict):
                raise TypeError(f"LearnedSchedule.from_dict: d must be a dict, got {type(d).__name__}")
            if "format" in d or "version" in d:  # a hand-made dict may carry neither
                _check_format(d, "<dict>")
            missing = [k for k in ("timesteps", "solver", "nfe", "schedule") if k not in d]
            if missing:
                _fail("<dict>", f"missing field(s) {', '.join(map(repr, missing))}")
        return cls(d["timesteps"], d.get("model_timesteps"), solver_config=d["solver"], nfe=d["nfe"],
                   schedule_config=d["schedule"], guidance_scale=d.get("guidance_scale"), model=d.get("model"),
                   time_mode=d.get("time_mode"), decoupled=d.get("decoupled"), training=d.get("training"),
                   metrics=d.get("metrics"), library_version=d.get("library_version"), created=d.get("created"),
                   extra={k: v for k, v in d.items() if k not in _NOT_EXTRA}, _checked=_checked)

    def save(self, path: str) -> str:
        """Write the schedule atomically (a crash leaves the old file intact); returns the path."""
        # checked before anything is written: a value put in an attribute's dict after construction is refused
        # naming its key (json.dumps' TypeError names neither), and no file or temp file is left
        if isinstance(path, bytes):  # as load_schedule takes it
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):  # atomic_write's own TypeError names no argument
            raise TypeError(f"path must be a str, bytes or os.PathLike, got {type(path).__name__}")
        doc = {k: _writable(v, k, finite=k in ("solver", "schedule")) for k, v in self.to_dict().items()}
        try:  # what load_schedule checks: a schedule edited in place (a NaN time, nfe) replaced a good file
            validate_schedule_dict({**doc, "checksum": ""}, os.fspath(path))  # the write adds the checksum
        except ScheduleFileError as exc:
            why = str(exc).removeprefix(f"schedule file {os.fspath(path)}: ")  # the path may hold ": " itself
            raise ValueError(f"save: this schedule would not load back ({why}); {os.fspath(path)} was not "
                             "written") from None
        atomic_write_json(path, doc)
        return os.fspath(path)


def guidance_matches(learned: Optional[float], used: Optional[float], what: str, stacklevel: int = 3) -> bool:
    """True when a grid learned at guidance scale ``learned`` is used at ``used`` (None: no guidance); else a
    warning saying both (the ODE, hence the best grid, changes with the scale).  LearnedSchedule and LD3Scheduler
    share it."""
    same = (learned is None and used is None) or (
        learned is not None and used is not None and abs(learned - used) <= 1e-9 * max(1.0, abs(learned)))
    if not same:
        was = f"at guidance scale {learned}" if learned is not None else "without guidance"
        now = f"at {used}" if used is not None else "without guidance"
        warnings.warn(f"{what} was learned {was}, and is being used {now}; learn one for this scale for best "
                      "results", UserWarning, stacklevel=stacklevel)
    return same


def _fail(path, msg):
    raise ScheduleFileError(f"schedule file {path}: {msg}")


def _check_format(d: Dict[str, Any], path) -> None:
    """The format and version fields: read before anything else (a newer version may checksum differently)."""
    if d.get("format") != FORMAT:
        _fail(path, f"not an ld3_ext schedule (format is {d.get('format')!r}, expected {FORMAT!r})")
    v = d.get("version")
    if not isinstance(v, int) or isinstance(v, bool):
        _fail(path, f"version must be an integer, got {v!r}")
    if v > VERSION:
        _fail(path, f"format version {v} is newer than this ld3_ext understands ({VERSION}); upgrade ld3_ext")
    if v < 1:
        _fail(path, f"invalid format version {v}")


def validate_schedule_dict(d: Dict[str, Any], path: str = "<dict>") -> None:
    """Schema and consistency checks of a schedule document (checksum excluded)."""
    if not isinstance(d, dict):
        _fail(path, f"a schedule document must be a JSON object (dict), got {type(d).__name__}")
    _check_format(d, path)
    for k, typ in _REQUIRED.items():
        if k not in d:
            _fail(path, f"missing field {k!r}")
        if not isinstance(d[k], typ) or (typ is int and isinstance(d[k], bool)):
            _fail(path, f"field {k!r} must be {typ.__name__}, got {type(d[k]).__name__}")
    for k in ("timesteps", "model_timesteps"):
        vals = d[k]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            _fail(path, f"{k} must be a list of numbers")
        if not all(_finite(x) for x in vals):
            _fail(path, f"{k} contains non-finite values (NaN/Inf, or beyond the float64 range)")
    ts, ms, n = d["timesteps"], d["model_timesteps"], d["num_steps"]
    if len(ts) != n + 1 or len(ms) != n + 1:
        _fail(path, f"num_steps={n} needs {n + 1} timesteps and model_timesteps, got {len(ts)} and {len(ms)}")
    try:
        _check_contents([float(x) for x in ts], [float(x) for x in ms], d["nfe"], d["solver"], d["schedule"],
                        {k: d.get(k) for k in _OPTIONAL}, solver_key="solver", schedule_key="schedule")
    except (TypeError, ValueError) as e:
        raise ScheduleFileError(f"schedule file {path}: {e}") from None


MAX_SCHEDULE_BYTES = 64 * 2 ** 20


def _refuse_oversized(path: str) -> None:
    """A :class:`ScheduleFileError` for a file over MAX_SCHEDULE_BYTES, before anything reads it."""
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0  # a missing path or a folder: the read below raises open()'s own error
    if size > MAX_SCHEDULE_BYTES:  # a wrong file (a checkpoint, an image) was read whole, several copies, before failing
        _fail(path, f"is {size / 2 ** 20:.0f} MiB; a schedule file is a few KiB (at most {MAX_SCHEDULE_BYTES // 2 ** 20} "
                    "MiB): is it the right file?")


def load_schedule(path: str) -> LearnedSchedule:
    """Load and validate a schedule file; raises :class:`ScheduleFileError` on any problem with its contents
    (``FileNotFoundError`` for a missing path, ``IsADirectoryError`` for a folder, as ``open`` does)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    _refuse_oversized(path)
    try:
        d = read_json_checked(path, what="schedule file", verify=False)
    except FileNotFoundError:
        raise
    except CorruptFileError as e:
        raise ScheduleFileError(str(e)) from None
    # format and version first: a file from a newer ld3_ext (whose checksum may be computed otherwise) says so
    _check_format(d, path)
    if "checksum" not in d:
        _fail(path, "has no checksum (truncated, hand-written, or not written by ld3_ext)")
    expected = json_checksum(d)
    if d["checksum"] != expected:
        _fail(path, f"fails its checksum (stored {str(d['checksum'])[:20]}..., content hashes to {expected[:20]}...): "
                    "it was modified or corrupted")
    validate_schedule_dict(d, path)
    return LearnedSchedule.from_dict(d, _checked=True)  # the content rules ran once, just above


__all__ = ["LearnedSchedule", "load_schedule", "validate_schedule_dict", "ScheduleFileError", "FORMAT", "VERSION"]
