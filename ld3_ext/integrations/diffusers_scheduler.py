"""``LD3Scheduler``: run an ld3_ext time grid + solver inside an unmodified diffusers pipeline.

The pipeline loop stays as diffusers writes it::

    scheduler.set_timesteps(N, device=device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t).sample    # (+ CFG as the pipeline does it)
        x = scheduler.step(out, t, x).prev_sample

and ``x`` ends equal (float32 round-off) to ``solver.sample(model, x_T, timesteps, model_timesteps)``
with ``model, _ = from_diffusers(unet, scheduler_config)``.

What the network receives: ``scheduler.timesteps[k]`` is the k-th *model* time (LD3's decoupled network
time, = the solver grid when not decoupled) in diffusers units, as FLOATS: for VP configs the continuous
training index ``t*N_train - 1`` (0..N_train-1; not rounded), for flow-matching configs ``t*N_train``
(diffusers' flow convention).  ``len(timesteps)`` = NFE: N for the multistep solvers, 2N for Heun
(evaluations at t_{i-1} then t_i of every interval; ``order`` = 2 as diffusers' Heun scheduler).
``num_inference_steps`` is N (steps, not evaluations) for every solver, as in diffusers' Heun scheduler.

State: the scheduler keeps the solver history (data or noise predictions, newest first) and, for UniPC,
the sample before the predictor: the UniC corrector of step k runs at the start of the next ``step()``
call, with the network output at the predictor point (as diffusers' UniPCMultistepScheduler does).

No host sync per step: coefficient tables, alpha/sigma of every model time and the orders are computed
once in ``set_timesteps`` (float64 on the CPU, then moved to the device once); ``step()`` only slices
device tensors and does tensor arithmetic (no ``.item()``/``float()``).  The step index is a counter (pass
the ``scheduler.timesteps`` entries in order); only the first ``step()`` of a solve looks its ``timestep`` up
(one read-back), so that a pipeline that slices ``scheduler.timesteps`` for img2img without calling
``set_begin_index`` starts at the right interval, as diffusers' own schedulers do (Heun, a value equal to two
entries: the second step's is read too, to refuse a start inside an interval).

``init_noise_sigma`` is the schedule's prior std sigma(t_max) (~1 for VP, t_max for flow), the same x_T
scaling as ``schedule.prior_std()``.  ``scale_model_input`` is the identity (the network reads x itself).
"""
from __future__ import annotations

import math
import numbers
import operator
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .._checks import guidance, usable_device
from .. import ops
from ..coefficients import step_orders
from ..discretizations import DISCRETIZATIONS, get_discretization
from ..schedules import FlowMatching, NoiseSchedule, VPDiscrete, schedule_from_config
from ..solvers import SOLVERS, Solver, as_solver, solver_from_config
from ..solvers.heun import heun_multistep_table, heun_view
from ..wrappers import _capturing, _compiling, check_fresh_output
from .diffusers import (PREDICTION_TYPES, DiffusersConfigError, _config_dict, learned_variance, network_time_fn,
                        schedule_from_diffusers_config)

_SUPPORTED_SOLVERS = tuple(SOLVERS)
# keywords of from_timesteps / set_timesteps that from_config would drop with a log line (pipelines audit)
_FROM_TIMESTEPS_WORDS = {"solver": "give the solver as solver_config=Solver(...).config()",
                         "timesteps": "give a grid as ld3_timesteps=[...] (schedule units)",
                         "model_timesteps": "give them as ld3_model_timesteps=[...]",
                         "schedule": "give the noise schedule as schedule_config=schedule.config()",
                         "scheduler_config": "pass it as from_config's first argument",
                         "num_inference_steps": "pass it to set_timesteps()"}


def _fields_of(schedule: NoiseSchedule) -> Dict[str, Any]:
    """The diffusers config fields that describe ``schedule``.  Set when no model config is given, so that what reads
    the config -- ``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`` to switch back,
    ``from_diffusers(unet, pipe.scheduler.config)`` -- gets the schedule this scheduler runs, not diffusers' defaults."""
    if isinstance(schedule, VPDiscrete):
        log_ac = torch.log(schedule.alphas_cumprod.to(torch.float64))
        betas = -torch.expm1(torch.diff(log_ac, prepend=log_ac.new_zeros(1)))  # 1 - ac_i / ac_{i-1}
        return {"num_train_timesteps": schedule.num_train_timesteps, "trained_betas": betas.tolist()}
    if isinstance(schedule, FlowMatching):
        # both names: FlowMatchEuler reads shift, DPMSolverMultistep / UniPC read flow_shift
        return {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "shift": float(schedule.shift),
                "flow_shift": float(schedule.shift)}
    return {}


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _check_usable_device(dev) -> None:
    """set_timesteps(device=...): a device this torch cannot use is named, with torch's reason (the move failed with
    torch's bare error); other errors of the move stay torch's."""
    usable_device("set_timesteps: ", dev)


class LD3Scheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler (SchedulerMixin/ConfigMixin API) driving an ld3_ext solver on a float time grid.

    Parameters (all stored in ``scheduler.config``; ``save_pretrained``/``from_pretrained`` round-trip):

    num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type, shift,
    use_flow_sigmas, flow_shift, variance_type:
        the model's diffusers scheduler config (what the network was trained with); ``prediction_type`` is
        what the network outputs (epsilon / v_prediction / sample / flow_prediction).  With ``variance_type``
        "learned" / "learned_range" a 2C-channel output is [prediction; variance] and only the first C
        channels are used (the ODE needs no variance).
    schedule_config:
        an ld3_ext ``NoiseSchedule.config()``; when given it replaces the beta fields (e.g. from a schedule
        file).  Must be a VPDiscrete or FlowMatching schedule to give the network diffusers time units.
    solver_config:
        ``Solver.config()`` of the solver to run (default DPM-Solver++(3M)), e.g. ``{"name": "unipc",
        "order": 3, "variant": "bh2"}``.
    ld3_timesteps, ld3_model_timesteps:
        the solver grid t_0 > ... > t_N and the network times (same length) in the SCHEDULE's time units
        (floats).  With them the scheduler runs exactly N steps; without them ``set_timesteps(N)`` uses
        the ``discretization`` baseline ("logsnr", "edm", "time_uniform", "time_quadratic").
    guidance_scale:
        the classifier-free guidance scale the grid was learned at (None: unguided or unknown).  The pipeline
        applies CFG, so the scheduler only records it; ``check_guidance(scale)`` warns on a mismatch.
    """

    _compatibles: List[str] = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
                 prediction_type: str = "epsilon", shift: float = 1.0, use_flow_sigmas: bool = False,
                 flow_shift: Optional[float] = None, schedule_config: Optional[Dict[str, Any]] = None,
                 solver_config: Optional[Dict[str, Any]] = None, ld3_timesteps: Optional[Sequence[float]] = None,
                 ld3_model_timesteps: Optional[Sequence[float]] = None, discretization: str = "logsnr",
                 variance_type: Optional[str] = None, guidance_scale: Optional[float] = None):
        if prediction_type not in PREDICTION_TYPES:
            raise DiffusersConfigError(f"prediction_type={prediction_type!r} is not supported; expected one of "
                                       f"{sorted(PREDICTION_TYPES)}")
        self.prediction = PREDICTION_TYPES[prediction_type]
        self._learned_variance = learned_variance(variance_type)
        self.guidance_scale = _guidance_arg(guidance_scale)
        if discretization not in DISCRETIZATIONS:  # now, not at the first set_timesteps
            raise ValueError(f"discretization must be one of {sorted(DISCRETIZATIONS)}, got {discretization!r}")
        if schedule_config is not None:
            if not isinstance(schedule_config, Mapping):  # dict(5) named nothing
                raise TypeError(f"schedule_config must be a dict (NoiseSchedule.config()), got "
                                f"{type(schedule_config).__name__}")
            self.schedule = schedule_from_config(dict(schedule_config))
        else:
            cfg = {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
                   "beta_schedule": beta_schedule, "trained_betas": trained_betas,
                   "prediction_type": prediction_type, "use_flow_sigmas": use_flow_sigmas}
            sh = shift if flow_shift is None else flow_shift
            self.schedule, _ = schedule_from_diffusers_config(cfg, shift=sh if self.prediction == "velocity" else None)
        _check_diffusers_schedule(self.schedule)
        if (self.prediction == "velocity") != isinstance(self.schedule, FlowMatching):
            raise DiffusersConfigError(f"prediction_type={prediction_type!r} does not fit a "
                                       f"{type(self.schedule).__name__} schedule (flow_prediction <-> FlowMatching)")
        network_time_fn(self.schedule, num_train_timesteps)  # an int >= 1 (flow: the network reads t * it)
        if isinstance(self.schedule, VPDiscrete) and num_train_timesteps != self.schedule.num_train_timesteps:
            # the network's index follows the schedule; add_noise's range and len() follow the config
            raise DiffusersConfigError(f"num_train_timesteps={num_train_timesteps} but the schedule has "
                                       f"{self.schedule.num_train_timesteps} training steps (schedule_config / "
                                       "trained_betas); give the model's own value")
        solver_config = dict(solver_config or {"name": "dpmpp", "order": 3})
        if solver_config.get("name") not in _SUPPORTED_SOLVERS:
            raise ValueError(f"solver_config: name must be one of {_SUPPORTED_SOLVERS}, got {solver_config!r}")
        self.solver: Solver = solver_from_config(solver_config)
        if (ld3_model_timesteps is not None) and ld3_timesteps is None:
            raise ValueError("ld3_model_timesteps needs ld3_timesteps (the solver grid)")
        self._grid = None if ld3_timesteps is None else _grid_arg(ld3_timesteps, "ld3_timesteps")
        self._mgrid = None if ld3_model_timesteps is None else _grid_arg(ld3_model_timesteps, "ld3_model_timesteps")
        if self._grid is not None:
            from ..solvers.base import validate_model_timesteps, validate_timesteps
            validate_timesteps(self.schedule, self._grid, name="ld3_timesteps", spec=self.solver.spec())
            if self._mgrid is not None:
                validate_model_timesteps(self.schedule, self._mgrid, self._grid)
        if self.solver.name == "heun":
            self.order = 2  # diffusers' meaning: network calls per interval (the pipeline's progress bar)
        self.init_noise_sigma = float(self.schedule.prior_std())
        self.num_inference_steps: Optional[int] = None
        self.timesteps: Optional[torch.Tensor] = None
        self.sigmas: Optional[torch.Tensor] = None
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    # --- construction helpers ------------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``; a flow-matching config (e.g. FlowMatchEulerDiscreteScheduler's, which has
        no ``prediction_type`` field) is read as a flow model instead of silently falling back to VP defaults."""
        from .diffusers import _config_dict, _is_flow_config
        if config is not None:
            cfg = _config_dict(config)
            if _is_flow_config(cfg):
                kwargs.setdefault("prediction_type", "flow_prediction")
                kwargs.setdefault("use_flow_sigmas", True)
            # fields LD3Scheduler does not register (sigma_data, use_dynamic_shifting, ...) would be dropped
            _check_foreign_config(cfg, kwargs)
            _warn_thresholding_dropped("from_config", cfg, kwargs)
        # from_timesteps' words: a ConfigMixin drops unknown keywords with a log line, so from_config(cfg,
        # solver="unipc") built the default DPM-Solver++(3M) (pipelines audit)
        confused = sorted(k for k in kwargs if k in _FROM_TIMESTEPS_WORDS)
        if confused and not return_unused_kwargs:
            k = confused[0]
            raise TypeError(f"LD3Scheduler.from_config: {k} is not a scheduler config field: "
                            f"{_FROM_TIMESTEPS_WORDS[k]} (or build with LD3Scheduler.from_timesteps / "
                            "from_schedule_file)")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def check_guidance(self, guidance_scale: Optional[float]) -> bool:
        """Warn (and return False) when the pipeline's guidance scale differs from the one the grid was learned
        at (``config.guidance_scale``, kept by save_pretrained/from_pretrained)."""
        from ..schedule_file import guidance_matches
        return guidance_matches(self.guidance_scale, _guidance_arg(guidance_scale), "this LD3Scheduler's grid")

    @classmethod
    def from_timesteps(cls, timesteps, model_timesteps=None, solver: Union[Solver, Dict[str, Any], str] = "dpmpp",
                       scheduler_config=None, schedule: Optional[NoiseSchedule] = None, **overrides) -> "LD3Scheduler":
        """From an explicit grid (schedule units) + solver (instance, config dict or name) + the model's diffusers
        scheduler config (a scheduler, its ``.config`` or a dict).  ``schedule`` overrides the config's
        betas (e.g. a VPDiscrete with another t_min/t_max)."""
        kw = _diffusers_fields(scheduler_config)
        if scheduler_config is not None:
            from .diffusers import _config_dict
            if schedule is None:
                _check_foreign_config(_config_dict(scheduler_config), overrides)
            _warn_thresholding_dropped("from_timesteps", _config_dict(scheduler_config), overrides)
        if isinstance(solver, (Solver, str)):
            solver = as_solver(solver)  # a name: the solver make_solver builds for it
            kw["solver_config"] = {**solver.config(), "backend": solver.backend}
        elif isinstance(solver, dict):
            kw["solver_config"] = dict(solver)
        else:
            raise TypeError(f"solver must be an ld3_ext Solver, a solver config dict or a solver name, got "
                            f"{type(solver).__name__}")
        if schedule is not None:
            kw["schedule_config"] = schedule.config()
            if scheduler_config is None:
                for k, v in _fields_of(schedule).items():
                    kw.setdefault(k, v)
        kw["ld3_timesteps"] = _grid_arg(timesteps, "ld3_timesteps").tolist()
        kw["ld3_model_timesteps"] = None if model_timesteps is None else \
            _grid_arg(model_timesteps, "ld3_model_timesteps").tolist()
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_schedule_file(cls, path, scheduler_config=None, guidance_scale=None, **overrides) -> "LD3Scheduler":
        """From an ld3_ext schedule file (``ld3_ext.schedule_file``): its grid, model times, solver config and
        noise schedule.  ``scheduler_config`` (the model's diffusers config) supplies ``prediction_type`` and
        ``num_train_timesteps``; it is checked against the file's schedule where both describe one.
        ``guidance_scale``: the scale the pipeline will be called with (the scheduler never sees it); a
        warning is given when it differs from the one the schedule was learned at."""
        from ..schedule_file import load_schedule

        ls = load_schedule(path)
        if guidance_scale is not None:
            ls.check_guidance(_guidance_arg(guidance_scale))
        kw = _diffusers_fields(scheduler_config)
        sched = schedule_from_config(ls.schedule_config)
        _check_diffusers_schedule(sched)  # before any other complaint about the file: nothing else can help it
        if scheduler_config is not None:
            # a flow file carries its shift, so a dynamic-shifting (Flux-style) config is fine here
            ref, _ = schedule_from_diffusers_config(
                scheduler_config, shift=sched.shift if isinstance(sched, FlowMatching) else None)
            _check_same_schedule(sched, ref)
            # as from_config / from_timesteps do: this is the path of ld3 export-diffusers, whose saved config drops it
            _warn_thresholding_dropped("from_schedule_file", _config_dict(scheduler_config), overrides)
        # what the network outputs: the file records it (schedules trained by ld3_ext); a config that says
        # otherwise belongs to another model
        recorded = (ls.model or {}).get("prediction")
        theirs = {v: k for k, v in PREDICTION_TYPES.items()}.get(recorded)
        if "prediction_type" in overrides:  # an explicit keyword is checked like a config field
            kw["prediction_type"] = overrides["prediction_type"]
        if "prediction_type" in kw:
            if theirs is not None and kw["prediction_type"] != theirs:
                raise DiffusersConfigError(f"prediction_type={kw['prediction_type']!r} was given, but "
                                           f"{path} was learned with a model that predicts {recorded!r} "
                                           f"(prediction_type={theirs!r})")
        elif theirs is not None:
            kw["prediction_type"] = theirs
        elif not isinstance(sched, FlowMatching):
            warnings.warn(f"{path} records no prediction type diffusers knows (model prediction {recorded!r}) and no "
                          "scheduler_config was given: assuming prediction_type='epsilon'; pass the model's "
                          "scheduler config (ld3 export-diffusers --scheduler-config) if it predicts anything else",
                          stacklevel=2)
        if isinstance(sched, FlowMatching):
            kw.setdefault("prediction_type", "flow_prediction")
        if (kw.get("prediction_type") == "flow_prediction") != isinstance(sched, FlowMatching) and theirs is not None \
                and "prediction_type" not in overrides and scheduler_config is None:
            # the file's own record is what does not fit (a test bed's x0 model on a flow schedule): said so, not
            # as a prediction_type the caller never gave
            raise DiffusersConfigError(
                f"{path} was learned for a model that predicts {recorded!r} on a {type(sched).__name__} schedule; a "
                f"diffusers pipeline's network on that schedule predicts "
                f"{'velocity (flow_prediction)' if isinstance(sched, FlowMatching) else 'epsilon, v or the sample'}: "
                f"this schedule is not for a diffusers model")
        if isinstance(sched, VPDiscrete):
            kw["num_train_timesteps"] = sched.num_train_timesteps
        if scheduler_config is None:
            for k, v in _fields_of(sched).items():
                kw.setdefault(k, v)
        # guidance_scale is a config field so that save_pretrained (ld3 export-diffusers) keeps it
        kw.update(schedule_config=ls.schedule_config, solver_config=ls.solver_config,
                  ld3_timesteps=ls.timesteps.tolist(),
                  ld3_model_timesteps=None if ls.solver_model_timesteps() is None else ls.model_timesteps.tolist(),
                  guidance_scale=ls.guidance_scale)
        kw.update(overrides)
        return cls(**kw)

    # --- diffusers API ------------------------------------------------------------------------
    @property
    def step_index(self) -> Optional[int]:
        """The index in ``timesteps`` of the next network evaluation (diffusers' meaning: begin_index + calls)."""
        if self._step_index is None:
            return None
        return (self._begin_index or 0) + self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def _network_units(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(self.schedule, VPDiscrete):
            return self.schedule.model_index(t)
        return t * float(self.config.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      sigmas=None, mu: Optional[float] = None, **kwargs):
        """Prepare a solve.  With a stored grid ``num_inference_steps`` must be None or its N (a learned grid
        is made for one N); otherwise the ``discretization`` baseline with ``num_inference_steps`` intervals.

        ``mu`` and ``sigmas`` are what Flux-family pipelines pass for diffusers' own grid: ``mu`` shifts it for
        the image size (use_dynamic_shifting), and the img2img/inpainting ones always pass its unshifted sigmas
        ``linspace(1, 1/N, N)``.  This scheduler's grid replaces that one, so ``mu`` is accepted and not used
        (the grid is the stored one, or the discretization's with the config's ``shift``), and so are those
        default sigmas; any other ``sigmas`` (or ``timesteps``) is a custom grid, which
        ``LD3Scheduler.from_timesteps`` builds."""
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu)):
            raise TypeError(f"set_timesteps: mu must be a finite number or None, got {mu!r}")
        if sigmas is not None:
            n_sigmas = _pipeline_default_sigmas(sigmas, num_inference_steps)
            if n_sigmas is None:
                raise TypeError("LD3Scheduler.set_timesteps: custom sigmas are not supported (the scheduler's grid "
                                "is its stored or discretized one); build the scheduler with "
                                "LD3Scheduler.from_timesteps(...) for a custom grid")
            if self.solver.name == "heun":
                # the pipelines that pass sigmas then count steps as len(timesteps), 2 per Heun step, and their
                # strength slicing started the solve at the wrong interval; diffusers' FlowMatchHeunDiscreteScheduler
                # takes no sigmas and is refused by them likewise
                raise TypeError("LD3Scheduler.set_timesteps: sigmas with a Heun schedule: the pipelines that pass "
                                "sigmas (Flux img2img/inpainting) count 2 timesteps per Heun step and would start at "
                                "the wrong step; use a multistep solver's schedule (dpmpp, unipc, ipndm, euler)")
            if num_inference_steps is None:  # retrieve_timesteps passes the sigmas alone: their length is the N asked
                num_inference_steps = n_sigmas
        unknown = {k for k, v in kwargs.items() if v is not None}
        if unknown:
            grids = sorted(unknown & {"timesteps", "sigmas"})
            raise TypeError(f"LD3Scheduler.set_timesteps: unsupported arguments {sorted(unknown)}"
                            + ("; build the scheduler with LD3Scheduler.from_timesteps(...) for a custom grid"
                               if grids else ""))
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                                or not isinstance(num_inference_steps, numbers.Integral)):
            raise TypeError(f"set_timesteps: num_inference_steps must be an int, got {num_inference_steps!r}")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"set_timesteps: num_inference_steps must be >= 1, got {num_inference_steps}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError, ValueError) as exc:  # torch's message names no argument
                raise ValueError(f"set_timesteps: device={device!r} is not a usable torch device ({exc})") from None
        solver = self.solver
        if self._grid is not None:
            n = self._grid.numel() - 1
            # steps, never evaluations: img2img pipelines slice timesteps at int(steps * strength) * order, so a
            # Heun evaluation count (2N) would start the solve at the wrong interval
            if num_inference_steps is not None and int(num_inference_steps) != n:
                heun = ("; num_inference_steps counts Heun steps (intervals of 2 network evaluations), as "
                        "diffusers' HeunDiscreteScheduler does"
                        if solver.name == "heun" else "")
                raise ValueError(f"set_timesteps: this LD3Scheduler holds a grid with N={n} intervals "
                                 f"({solver.nfe(n)} network evaluations), got num_inference_steps="
                                 f"{num_inference_steps}; call the pipeline with num_inference_steps={n}{heun}")
            t = self._grid.clone()
            tm = self._mgrid.clone() if self._mgrid is not None else t.clone()
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps: give num_inference_steps (no grid is stored in this scheduler)")
            n = int(num_inference_steps)
            t = get_discretization(self.config.discretization, self.schedule, n)
            tm = t.clone()
        self._full = (t, tm)
        self._begin_index = None
        self.timesteps = None
        self._prepare(t, tm, device, public=True)

    def _prepare(self, t: torch.Tensor, tm: torch.Tensor, device=None, public: bool = False):
        """Tables of a solve on the grid t with model times tm (float64, CPU), then reset the solver state.
        ``public``: t is the whole grid of set_timesteps, which ``timesteps`` shows; set_begin_index solves on
        a tail of it and leaves ``timesteps`` whole, as diffusers' schedulers do."""
        solver = self.solver
        n = t.numel() - 1
        spec = solver.spec()
        # everything step() needs, computed once (float64 on the CPU)
        if spec is not None:
            self._orders = step_orders(spec, n)
            coef = ops.coefficient_table(self.schedule, t, spec, "reference")
        else:  # Heun: its 2N multistep updates, the chain solver.sample runs (rows [k, 0], orders 1, 2, 1, 2, ...)
            # the view solver.sample takes: the noise one only for a solve at the grid's own times (no ld3 model
            # times stored), where solver.sample(model, x, t) evaluates at t itself
            self._heun_view = heun_view(self.prediction, coupled=self._mgrid is None)
            coef, self._orders = heun_multistep_table(self.schedule, t, self._heun_view)
        s = self.schedule
        tables = {
            "coef": coef.detach(),
            "t": t, "tm": tm,
            "alpha_m": s.alpha(tm), "sigma_m": s.sigma(tm),  # conversion of the output made at model time k
        }
        self._tables_cpu = {k: v.detach() for k, v in tables.items()}
        self._tables = dict(self._tables_cpu)
        if solver.name == "heun":
            idx = [j for i in range(1, n + 1) for j in (i - 1, i)]
            model_t = tm[idx]
        else:
            model_t = tm[:n]
        dev = device if device is not None else (self.timesteps.device if self.timesteps is not None else None)
        self._evaluations = model_t.numel()  # step() calls this solve takes
        if public:
            self._n = n
            self.timesteps = self._network_units(model_t).to(torch.float32)
            self._timesteps_cpu = self.timesteps  # for the first step's look-up (_start_index)
            # diffusers' sigmas (pipelines read them: WanPipeline's float(scheduler.sigmas[i]) was an AttributeError):
            # each timestep's noise level, then the grid's end; the flow time on flow matching, else sigma/alpha
            u = torch.cat([model_t, t[-1:]])
            self.sigmas = (u if isinstance(s, FlowMatching) else s.sigma(u) / s.alpha(u)).to(torch.float32)
            self.num_inference_steps = n
        self._reset_state()  # before the move: a device that fails must not leave the old solve's history
        if dev is not None:
            _check_usable_device(dev)
            if public:
                self.timesteps = self.timesteps.to(dev)
                self.sigmas = self.sigmas.to(dev)
            self._move(torch.device(dev))

    def set_begin_index(self, begin_index: int = 0):
        """Start the solve at ``timesteps[begin_index]`` (img2img/inpainting pipelines call this after slicing
        ``scheduler.timesteps``): the solver restarts on the remaining grid t[b:], with its warm-up, from the
        sample the pipeline noised to that time (``add_noise``).  ``timesteps`` stays whole, as in diffusers'
        schedulers: the solve's evaluations are ``timesteps[begin_index:]``."""
        if self.timesteps is None:
            raise ValueError("LD3Scheduler.set_begin_index: call set_timesteps() first")
        if isinstance(begin_index, bool):
            raise TypeError(f"set_begin_index: begin_index must be an int, got {begin_index!r}")
        try:
            b = operator.index(begin_index)  # an int, a numpy int, a 0-d integer tensor: never int(1.9) == 1
        except TypeError:
            raise TypeError(f"set_begin_index: begin_index must be an int, got {begin_index!r}") from None
        per = 2 if self.solver.name == "heun" else 1
        if b % per:
            # e.g. SDXL's denoising_start: its arithmetic assumes diffusers' Heun layout (2N - 1 entries, the last
            # interval first-order), and this scheduler's Heun evaluates both ends of all N intervals (2N)
            raise ValueError(f"begin_index={b} is inside a Heun interval; use a multiple of {per}, or a multistep "
                             f"solver (dpmpp, unipc, ipndm, euler) with a pipeline's denoising_start")
        t, tm = self._full
        if not 0 <= b // per < t.numel() - 1:
            raise ValueError(f"begin_index={b} is out of range for {t.numel() - 1} intervals")
        self._prepare(t[b // per:], tm[b // per:])
        self._begin_index = b

    def _reset_state(self):
        self._step_index = 0  # counts calls from the start of the (sub-)grid; never looked up from timestep
        self._history: List[torch.Tensor] = []
        self._x_before = None  # UniPC: the sample the predictor started from
        self._heun = None      # Heun: the x0 of an interval's first evaluation, for its corrector
        self._ambiguous_start = None  # Heun: the first timestep's value when it also matched the odd entry before

    def _move(self, device: torch.device):
        """Move the step tables to ``device`` once (pinned + non_blocking to CUDA: no sync)."""
        if self._tables["coef"].device == device:
            return
        pin = device.type == "cuda"
        self._tables = {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin)
                        for k, v in self._tables_cpu.items()}

    def _convert(self, out: torch.Tensor, x: torch.Tensor, k: int):
        """(x0, eps) from the network output at model time k -- DiffusionModel.predict's steps as its fused
        conversion takes them (coefficients in float64, then cast; a division as a product with the reciprocal),
        so a solve here equals the library's own bitwise."""
        dt = x.dtype
        a, s = self._tables["alpha_m"][k], self._tables["sigma_m"][k]  # float64

        def c(v):
            return v.to(dt)
        p = self.prediction
        if p == "eps":
            eps = out
            x0 = (x + c(-s) * eps) * c(1.0 / a)
        elif p == "x0":
            x0 = out
            eps = (x + c(-a) * x0) * c(1.0 / s)
        elif p == "v":
            inv = c(1.0 / (a * a + s * s))
            x0 = (c(a) * x + c(-s) * out) * inv
            eps = (c(s) * x + c(a) * out) * inv
        else:  # velocity, alpha = 1 - t, sigma = t
            tm = self._tables["tm"][k]
            x0 = x + c(-tm) * out
            eps = x + c(1.0 - tm) * out
        return x0, eps

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             eta: Optional[float] = 0.0, use_clipped_model_output: Optional[bool] = None, generator=None,
             **kwargs) -> Union[SchedulerOutput, tuple]:
        """One network evaluation's worth of the solve; returns the next network input (or, after the last
        call, the final sample at t_N).  Extra diffusers kwargs (generator, ...) are accepted; ``eta`` must be 0
        (this is an ODE solver).  ``eta`` is a named parameter: pipelines pass it only to a scheduler whose
        ``step`` names it, and LDM/StableDiffusion pipelines ran ``eta=0.8`` as 0 without a word (pipelines
        audit); ``use_clipped_model_output`` and ``generator`` are named for the same reason and unused."""
        if self.timesteps is None or self._step_index is None:
            raise ValueError("LD3Scheduler.step: call set_timesteps() first")
        if eta not in (0, 0.0, None):
            raise ValueError(f"LD3Scheduler runs the probability-flow ODE: eta must be 0, got {eta!r}")
        for name, v in (("model_output", model_output), ("sample", sample)):
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():  # an integer output was cast silently
                got = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else type(v).__name__
                raise TypeError(f"LD3Scheduler.step: {name} must be a floating torch.Tensor, got {got}")
        k = self._step_index
        if k == 0 and self._begin_index is None and not (_compiling() or _capturing()):
            j, ambiguous = self._start_index(timestep)
            if j is None:  # it started at interval 0, silently: a sliced solve would run the wrong intervals
                raise ValueError(f"LD3Scheduler.step: the first timestep {self._describe(timestep)} is none of "
                                 f"scheduler.timesteps ({self._list_timesteps()}) nor a rounded copy of one; a solve starts at one of them "
                                 f"(pass the pipeline's t from scheduler.timesteps), or call set_begin_index(i)")
            if j:  # sliced timesteps without set_begin_index (img2img): start at that interval
                self.set_begin_index(j)
            self._ambiguous_start = ambiguous  # after set_begin_index, which resets the state
        elif k == 0 and not (_compiling() or _capturing()):
            # set_begin_index(b) and then a loop from another timestep ran the intervals from b silently, a wrong
            # sample (pipelines audit): the first timestep must be timesteps[b] (a view of it: no read-back)
            j, _ = self._start_index(timestep)
            # a rounded copy of timesteps[b] (a half or int t) where the grid's gaps are under the rounding: the
            # unique-entry look-up finds none, yet it is the start asked for (review: 13 of 50 begin indices)
            if j != self._begin_index and not (j is None and self._rounds_to_entry(timestep, self._begin_index)):
                where = "none of scheduler.timesteps" if j is None else f"timesteps[{j}]"
                raise ValueError(f"LD3Scheduler.step: set_begin_index({self._begin_index}) starts the solve at "
                                 f"timesteps[{self._begin_index}], but the first timestep {self._describe(timestep)} "
                                 f"is {where}: loop over scheduler.timesteps[{self._begin_index}:]")
        elif k == 1 and self._ambiguous_start is not None and not (_compiling() or _capturing()):
            self._check_second_timestep(timestep)
        if k >= self._evaluations:
            b = self._begin_index or 0
            raise IndexError(f"LD3Scheduler.step called {k + 1} times for the {self._evaluations} timesteps from "
                             f"timesteps[{b}]; call set_timesteps() again to start a new solve")
        self._move(sample.device)
        out_dtype = sample.dtype
        wdt = torch.float32 if _half(sample.dtype) else sample.dtype  # upcast half precision like diffusers
        x = sample.to(wdt)
        out = self._own_channels(model_output, sample).to(wdt)
        if self.solver.name == "heun":
            prev = self._heun_step(out, x, k)
        else:
            prev = self._multistep_step(out, x, k)
        self._step_index = k + 1
        prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _start_index(self, timestep):
        """``(j, value)``: the index of ``timestep`` among ``self.timesteps`` where an interval starts (Heun: the
        even one of two equal entries, as diffusers' index_for_timestep picks the second), or None when it is not
        one of them; ``value`` is the timestep when that choice was ambiguous (Heun: it equals the odd entry
        before), else None.  A pipeline's ``t`` is usually a view of ``scheduler.timesteps`` (its loop iterates
        over a slice of it): then its place in that storage is the index, with no read-back; otherwise the
        value is compared on the host (one device sync for a device tensor).  A Heun start at an odd entry (an
        interval's corrector evaluation) is refused."""
        own = self.timesteps
        per = 2 if self.solver.name == "heun" else 1
        if isinstance(timestep, torch.Tensor) and timestep.device == own.device and own.stride(0) == 1 \
                and timestep.untyped_storage().data_ptr() == own.untyped_storage().data_ptr():
            j = timestep.storage_offset() - own.storage_offset()
            if not 0 <= j < own.numel():
                return None, None
            if j % per:
                self._refuse_odd_start(j)
            return j, None
        value = self._host_value(timestep)
        if value is None:
            return None, None
        own_cpu = self._timesteps_cpu
        hits = (own_cpu == value).nonzero().flatten().tolist()
        if not hits:
            # a rounded copy of an entry (a loop that cast t to the latents' half dtype, or to an int): the one
            # entry within that rounding (2^-7 relative, or 1 for an int of a fractional t); none or two: no match
            near = own_cpu[self._within_rounding(own_cpu, value)].unique()
            if near.numel() == 1:
                hits = (own_cpu == near).nonzero().flatten().tolist()
        j = next((j for j in hits if j % per == 0), None)
        if j is None and hits:  # only an odd entry (Heun's last evaluation) has this value
            self._refuse_odd_start(hits[0])
        # timesteps[j - 1] == timesteps[j]: the next step's timestep tells a start at j - 1 from one at j
        return j, (value if per == 2 and j is not None and j - 1 in hits else None)

    def _list_timesteps(self, most: int = 8) -> str:
        vals = [f"{v:g}" for v in self._timesteps_cpu.tolist()]
        return ", ".join(vals if len(vals) <= most else vals[:most - 1] + ["...", vals[-1]])

    @classmethod
    def _describe(cls, timestep) -> str:
        value = cls._host_value(timestep)
        return f"{float(value):g}" if value is not None else f"{timestep!r} ({type(timestep).__name__})"

    @staticmethod
    def _host_value(timestep) -> Optional[torch.Tensor]:
        try:
            tt = torch.as_tensor(timestep).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            return None
        if tt.numel() < 1 or tt.is_complex() or tt.dtype == torch.bool:
            return None
        return tt[0].to("cpu", torch.float32)

    def _rounds_to_entry(self, timestep, b: int) -> bool:
        """``timestep`` is a rounded copy (half, bfloat16, int) of ``timesteps[b]``.  Not "the nearest
        entry": an int copy of timesteps[b] can be nearer timesteps[b + 1] where the gaps are under 1, and an exact
        or view timesteps[b + 1] was told apart by the look-up before this is asked."""
        value = self._host_value(timestep)
        if value is None:
            return False
        # one of the roundings a pipeline makes of timesteps[b] itself (half, bfloat16, int() / .long(), round()),
        # not "within 1 or 2^-7" (_within_rounding): that also took a half or bfloat16 copy of timesteps[b + 1]
        # where the gap is under 1 (the end of SD's grid), a loop one entry late run from b silently
        entry = self._timesteps_cpu[b]
        roundings = (entry.to(torch.float16).to(torch.float32), entry.to(torch.bfloat16).to(torch.float32),
                     entry.trunc(), entry.round())
        return any(bool(r == value) for r in roundings)

    @staticmethod
    def _within_rounding(entries: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Which ``entries`` a rounded copy ``value`` may be of: within half/bfloat16's rounding of it (2^-7
        relative) or an int's (1)."""
        return (entries - value).abs() <= max(1.0, abs(float(value)) * 2.0 ** -7)

    def _check_second_timestep(self, timestep):
        """Heun, first step read by value: a repeat of the first value means the solve started at the odd entry."""
        value = self._host_value(timestep)
        if value is not None and bool(value == self._ambiguous_start):
            j = (self._begin_index or 0) - 1
            self._refuse_odd_start(j)

    def _refuse_odd_start(self, j: int):
        raise ValueError(f"LD3Scheduler.step: the first timestep is scheduler.timesteps[{j}], the second evaluation "
                         f"inside a Heun interval; a solve starts at an even index (slice timesteps[2 * i:], as "
                         f"img2img pipelines do with t_start * scheduler.order); call set_timesteps() again")

    def _own_channels(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The prediction part of the output (shape checks only: no host sync)."""
        if out.shape == x.shape:
            return out
        if out.dim() == x.dim() > 1 and out.shape[1] == 2 * x.shape[1] and \
                out.shape[:1] + out.shape[2:] == x.shape[:1] + x.shape[2:]:
            if not self._learned_variance:
                raise ValueError(f"LD3Scheduler.step: model_output has {out.shape[1]} channels for a "
                                 f"{x.shape[1]}-channel sample (a learned-variance model?) but variance_type="
                                 f"{self.config.variance_type!r}; build the scheduler from the model's scheduler "
                                 "config or pass variance_type='learned_range'")
            return out[:, : x.shape[1]]  # [prediction; variance]: the ODE uses only the prediction
        raise ValueError(f"LD3Scheduler.step: model_output shape {tuple(out.shape)} does not match sample shape "
                         f"{tuple(x.shape)}")

    def _in_state_layout(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A history entry in the sample's layout on the fused path: a channels_last UNet's output for contiguous
        latents is copied once here, not by each of the up to three updates that read it (``ld3_ext/layout.py``)."""
        return self.solver._history_entry_fn()(m, x)  # the solvers' own rule (fused path, no transform)

    def _multistep_step(self, out, x, k):
        spec = self.solver.spec()
        backend = self.solver.backend
        coef = self._tables["coef"]
        x0, eps = self._convert(out, x, k)
        m = self._in_state_layout(eps if spec.uses_noise_prediction else x0, x)
        p = self._orders[k]
        corrects = spec.has_corrector and k > 0
        # the earlier outputs this step reads must not have been overwritten by a network's static output buffer
        check_fresh_output(m, self._history[:max(p - 1, self._orders[k - 1] if corrects else 0)], k)
        if corrects:
            # UniC of the previous step, with the output just made at its predictor point
            p_prev = self._orders[k - 1]
            x = ops.multistep_update(self._x_before, coef[k - 1, 1, : 2 + p_prev], [m] + self._history[:p_prev],
                                     backend)
        history = ([m] + self._history)[:spec.order]
        out = ops.multistep_update(x, coef[k, 0, : 1 + p], history[:p], backend)
        # the state changes only once the step succeeded: a step that raised (e.g. a wrong batch) can be retried;
        # the sample is kept only for UniPC's corrector (one latent less held through the solve otherwise)
        self._history, self._x_before = history, (x if spec.has_corrector else None)
        return out

    def _heun_step(self, out, x, k):
        # the chain of solver.sample (solvers/heun.py): predictor z = a x + b m, corrector z + c (m - m'), both
        # from the sample passed in (a pipeline may have edited it: an inpainting blend, a step callback).  Not
        # EDM's loop in x/alpha: that state is up to 1/alpha larger than the sample, and float32 lost its digits
        x0, eps = self._convert(out, x, (k + 1) // 2)  # evaluation k is made at model time (k + 1) // 2
        m = self._in_state_layout(x0 if self._heun_view == "x0" else eps, x)  # the view solver.sample takes
        coef = self._tables["coef"]
        check_fresh_output(m, [self._heun] if k % 2 else [], k)  # the corrector reads the predictor's output
        if k % 2 == 0:
            self._heun = m
            return ops.multistep_update(x, coef[k, 0, :2], [m], self.solver.backend)
        return ops.multistep_update(x, coef[k, 0, :3], [m, self._heun], self.solver.backend)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = alpha x_0 + sigma noise (img2img).  ``timesteps`` in diffusers units (floats ok); an entry equal to
        one of ``self.timesteps`` means that step's start, i.e. its SOLVER grid time (which differs from the
        network time when the grid is decoupled); any other value is read as a time in network units.  Unlike
        ``step``'s first timestep, a rounded copy of an entry (``.long()``, ``.half()``) is such another value: on a
        decoupled grid it noises to the network time, not to the grid time the solve starts from -- pass the entry
        itself (diffusers' img2img pipelines pass ``timesteps[t_start:][:1]``, which matches)."""
        return self._noised(original_samples, noise, timesteps, ("add_noise", "original_samples", "timesteps"))

    def scale_noise(self, sample: torch.Tensor, timestep, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The flow-matching schedulers' name for ``add_noise`` (FlowMatchEulerDiscreteScheduler's signature), which
        the SD3 / Flux img2img and inpainting pipelines call: x = (1 - t) x_0 + t noise for a flow schedule
        (alpha x_0 + sigma noise in general), ``timestep`` read as in ``add_noise``."""
        if noise is None:
            raise TypeError("scale_noise: noise is required (the tensor mixed into sample)")
        return self._noised(sample, noise, timestep, ("scale_noise", "sample", "timestep"))

    def _noised(self, original_samples, noise, timesteps, names) -> torch.Tensor:
        fn, x_name, t_name = names  # the caller's own argument names, for the messages
        if not isinstance(original_samples, torch.Tensor) or not original_samples.is_floating_point() \
                or original_samples.dim() < 1:
            raise TypeError(f"{fn}: {x_name} must be a floating tensor with a batch dimension, got "
                            f"{getattr(original_samples, 'dtype', type(original_samples).__name__)}")
        if not isinstance(noise, torch.Tensor) or noise.shape != original_samples.shape:
            # broadcasting would return a bigger (or differently batched) sample without a word
            raise ValueError(f"{fn}: noise must have the shape of {x_name} "
                             f"{tuple(original_samples.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        dev = original_samples.device
        try:
            tt = torch.as_tensor(timesteps, device=dev).reshape(-1)
        except (TypeError, ValueError, RuntimeError):  # a str or None failed in torch naming nothing
            raise TypeError(f"{fn}: {t_name} must be a number or a tensor of timesteps, got "
                            f"{type(timesteps).__name__}") from None
        b = original_samples.shape[0]
        if tt.numel() not in (1, b):
            raise ValueError(f"{fn}: {t_name} must hold one timestep or one per sample (batch {b}), got "
                             f"{tt.numel()}")
        if tt.is_complex() or tt.dtype == torch.bool:
            raise TypeError(f"{fn}: {t_name} must be real numbers, got {tt.dtype}")
        units = tt.to(torch.float64)
        hit = None  # the entries that are this solve's own timesteps (their range is not checked)
        if self.timesteps is not None:
            own = self.timesteps.to(dev)
            hit = tt.to(own.dtype)[:, None] == own[None, :]
            # each own timestep's solver grid time, in network units: made on the CPU, moved once (the whole
            # grid of set_timesteps, as timesteps is, also after set_begin_index)
            grid = self._network_units(self._full[0])
            if self.solver.name == "heun":
                grid = grid[[j for i in range(1, self._n + 1) for j in (i - 1, i)]]
            else:
                grid = grid[: self._n]
            grid = grid.to(dev)
            first = hit.to(torch.int64).argmax(1)
            hit = hit.any(1)
            units = torch.where(hit, grid[first], units)
        if not (_compiling() or _capturing()):  # one read-back (once per img2img call, not per step)
            self._check_noise_units(units, hit, names)
        if isinstance(self.schedule, VPDiscrete):
            t = self.schedule.t_from_index(units)
        else:
            t = units / float(self.config.num_train_timesteps)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        a = self.schedule.alpha(t).to(original_samples.dtype).reshape(shape)
        s = self.schedule.sigma(t).to(original_samples.dtype).reshape(shape)
        return a * original_samples + s * noise

    def _check_noise_units(self, units: torch.Tensor, own: Optional[torch.Tensor] = None,
                           names=("add_noise", "original_samples", "timesteps")) -> None:
        """add_noise's timesteps (other than this solve's own, where ``own`` is True) in the training range: 0..N-1
        (the VP index) or 0..N (flow time * N); outside, alpha/sigma are NaN (a negative index) or extrapolated.
        One read-back from the device (a boolean-mask selection of the others would be a second)."""
        n = int(self.config.num_train_timesteps)
        hi = n - 1 if isinstance(self.schedule, VPDiscrete) else n
        bad = ~(torch.isfinite(units) & (units >= 0) & (units <= hi))
        if own is not None:
            bad &= ~own
        if bool(bad.any()):
            raise ValueError(f"{names[0]}: {names[2]} must be finite and in [0, {hi}] (num_train_timesteps={n}), got "
                             f"{units[bad].cpu().tolist()[:8]}")

    def __len__(self):
        return int(self.config.num_train_timesteps)


def _pipeline_default_sigmas(sigmas, num_inference_steps) -> Optional[int]:
    """N when ``sigmas`` is the grid Flux-family pipelines pass when the user gave none, ``linspace(1, 1/N, N)``
    (of num_inference_steps entries where that is given); None for anything else."""
    try:  # a meta tensor has no values to compare (NotImplementedError): not the default grid
        if isinstance(sigmas, torch.Tensor):
            sigmas = sigmas.detach().to("cpu", torch.float64)
        got = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        return None
    if got.dim() != 1:  # the pipelines pass a 1-D list; a [1, N] grid is another thing
        return None
    n = got.numel()
    if n < 1 or (num_inference_steps is not None and n != num_inference_steps):
        return None
    default = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
    return n if bool(torch.allclose(got, default, rtol=0, atol=1e-6)) else None


def _grid_arg(value, name: str) -> torch.Tensor:
    """A time grid argument as a 1-D float64 CPU tensor of finite values.  Complex, bool, integer and string input
    is refused by name (torch.tensor would drop an imaginary part with only a warning, or fail naming nothing)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if isinstance(value, np.ndarray) and value.dtype.kind not in "fc":
            raise TypeError(f"{name} must be a floating array, got dtype {value.dtype}")
        t = torch.as_tensor(value)
        if t.is_complex() or not t.is_floating_point() or t.is_meta:
            raise TypeError(f"{name} must be a real floating tensor with values, got dtype {t.dtype}"
                            + (" on the meta device" if t.is_meta else ""))
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (t_0 > ... > t_N), got shape {tuple(t.shape)}")
        t = t.detach().to("cpu", torch.float64)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        vals = []
        for v in value:
            if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0:
                if v.dtype == torch.bool or v.dtype == np.bool_ or not (
                        v.is_floating_point() if isinstance(v, torch.Tensor) else v.dtype.kind == "f"):
                    raise TypeError(f"{name} must hold real numbers, got an entry of dtype {v.dtype}")
            elif isinstance(v, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(v, (str, bytes)):
                raise ValueError(f"{name} must be 1-D (t_0 > ... > t_N), got a nested entry {v!r}")
            elif isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must hold real numbers, got {type(v).__name__} {v!r}")
            vals.append(float(v))
        t = torch.tensor(vals, dtype=torch.float64)
    else:
        raise TypeError(f"{name} must be a sequence of floats or a 1-D floating tensor, got {type(value).__name__}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return t


def _guidance_arg(value, name: str = "guidance_scale") -> Optional[float]:
    """A guidance scale: None or a finite real number (a str such as "7.5" is refused, not parsed; a tensor too:
    the value goes into the JSON config)."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number or None, got a tensor ({value!r}); pass float(...)")
    return guidance(name, value)


_DIFFUSERS_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "prediction_type", "shift", "use_flow_sigmas", "flow_shift", "variance_type")


def _warn_thresholding_dropped(where: str, cfg: Dict[str, Any], overrides: Dict[str, Any]) -> None:
    """A config asking for dynamic thresholding loses it (as ConfigMixin drops any field LD3Scheduler does not
    register), and that changes the samples: said, not silent."""
    if overrides.get("thresholding", cfg.get("thresholding")):
        warnings.warn(f"LD3Scheduler.{where}: the config asks for dynamic thresholding of the x0 predictions "
                      "(thresholding=True, as DeepFloyd IF's), which LD3Scheduler does not do: its samples are the "
                      "plain ODE solve's, not the thresholded ones of the pipeline's own scheduler", UserWarning,
                      stacklevel=3)


def _check_foreign_config(cfg: Dict[str, Any], overrides: Dict[str, Any]):
    """Run the adapter's checks on another scheduler's config (with the caller's overrides, which an explicit
    ``shift`` may extend by ``flow_shift``) before its fields become LD3Scheduler fields: what LD3Scheduler
    does not register (sigma_data, use_dynamic_shifting, ...) would otherwise be dropped and the model read
    with a wrong noise schedule."""
    if cfg.get("_class_name") == "LD3Scheduler" or "solver_config" in cfg or "ld3_timesteps" in cfg:
        return  # our own config: __init__ validates it
    if overrides.get("schedule_config") is not None:
        return  # an explicit ld3_ext schedule replaces the config's noise schedule
    if overrides.get("shift") is not None and "flow_shift" not in overrides and cfg.get("flow_shift") is not None:
        overrides["flow_shift"] = overrides["shift"]  # __init__ prefers flow_shift: the explicit shift must win
    # every keyword, not only the fields LD3Scheduler keeps: ConfigMixin drops the others without a word, so
    # from_config(cfg, rescale_betas_zero_snr=True) built the plain betas' schedule where the config field is refused
    merged = {**cfg, **overrides}
    shift = overrides.get("flow_shift", overrides.get("shift"))
    full, _ = schedule_from_diffusers_config(merged, shift=shift)
    # what the fields LD3Scheduler keeps build must be that schedule: a field it drops (CogVideoX's
    # snr_shift_scale, or its class default) would read the model with the unshifted one
    kept = {k: merged[k] for k in _DIFFUSERS_FIELDS if k in merged and merged[k] is not None}
    from .diffusers import _is_flow_config
    if _is_flow_config(merged):
        kept.setdefault("prediction_type", "flow_prediction")
        kept["use_flow_sigmas"] = True
    plain, _ = schedule_from_diffusers_config(kept, shift=shift)
    if not plain.same_as(full):
        dropped = [k for k in ("snr_shift_scale",) if k in merged] or [f"_class_name={cfg.get('_class_name')!r}"]
        raise DiffusersConfigError(
            f"{', '.join(dropped)}: this config's noise schedule ({cfg.get('_class_name', 'its class')}) is not one "
            "LD3Scheduler's own fields can hold; pass schedule_config=schedule_from_diffusers_config(config)[0]"
            ".config() to carry it")


def _diffusers_fields(scheduler_config) -> Dict[str, Any]:
    if scheduler_config is None:
        return {}
    from .diffusers import _config_dict, _is_flow_config
    cfg = _config_dict(scheduler_config)
    kw = {k: cfg[k] for k in _DIFFUSERS_FIELDS if k in cfg and cfg[k] is not None}
    if _is_flow_config(cfg):
        kw.setdefault("prediction_type", "flow_prediction")
        kw["use_flow_sigmas"] = True
    if kw.get("trained_betas") is not None:
        kw["trained_betas"] = [float(b) for b in kw["trained_betas"]]
    return kw


def _check_diffusers_schedule(schedule) -> None:
    if not isinstance(schedule, (VPDiscrete, FlowMatching)):
        raise DiffusersConfigError(f"schedule_config type {type(schedule).__name__!r}: a diffusers network reads a "
                                   "VP training index (VPDiscrete) or a flow time (FlowMatching)")


def _check_same_schedule(a: NoiseSchedule, b: NoiseSchedule):
    """A schedule file made for another model's noise schedule would silently sample garbage."""
    if type(a) is not type(b):
        raise DiffusersConfigError(f"the schedule file is for the schedule {type(a).__name__} but the scheduler config "
                                   f"describes a {type(b).__name__} model")
    if isinstance(a, VPDiscrete):
        ok = a.num_train_timesteps == b.num_train_timesteps and torch.allclose(a.alphas_cumprod, b.alphas_cumprod,
                                                                               rtol=1e-5, atol=1e-7)
        if not ok:
            raise DiffusersConfigError("the schedule file's alphas_cumprod differ from the scheduler config's "
                                       "(beta_schedule/beta_start/beta_end/num_train_timesteps)")


__all__ = ["LD3Scheduler"]
