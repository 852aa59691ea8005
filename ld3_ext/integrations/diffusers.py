"""Use diffusers UNets (UNet2DModel, UNet2DConditionModel, ...) with every ld3_ext solver and the LD3 trainer.

``from_diffusers(unet, scheduler_config)`` returns ``(model, schedule)``:

* ``schedule`` comes from the scheduler config: ``VPDiscrete`` built from the betas that diffusers itself
  would build (``beta_schedule`` linear / scaled_linear / squaredcos_cap_v2 / ... / Heun's exp, ``trained_betas``,
  ``num_train_timesteps``, CogVideoX's ``snr_shift_scale``), or ``FlowMatching`` for rectified-flow configs
  (``FlowMatch*`` scheduler classes, ``prediction_type="flow_prediction"``, ``use_flow_sigmas``; ``shift`` /
  ``flow_shift`` kept as the schedule's shift).
* ``model`` is a :class:`DiffusersModel` (a ``DiffusionModel``) whose network receives, for VP configs, the
  *float* training index ``t*N - 1`` (0..N-1; diffusers' integer ``timestep`` made continuous, LD3's
  ``(t - 1/N)*N``) and, for flow configs, ``t * num_train_timesteps`` (as diffusers' flow schedulers do).
  ``prediction_type`` epsilon / v_prediction / sample / flow_prediction maps to eps / v / x0 / velocity.

Conditioning: a ``UNet2DConditionModel`` is called with ``encoder_hidden_states=`` (the model kwarg of that
name), as are SD3/Flux-style transformers (``joint_attention_dim``; their ``pooled_projections`` is a model
kwarg, the negative one under guidance in ``uncond_kwargs``); a class-conditional ``UNet2DModel`` with
``class_labels=``.  With ``guidance_scale`` set, pass
``uncond=`` as well: both are batched into ONE network call as ``[uncond; cond]`` and combined as
``u + s (c - u)`` (diffusers' pipeline convention).  Conditioning tensors with batch 1 are broadcast to
the batch of ``x`` (so one prompt embedding can be stored in ``model.model_kwargs``).  SDXL-style
networks take ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}`` as well; under guidance give
the negative pooled embedding as ``uncond_kwargs={"added_cond_kwargs": {"text_embeds": neg, "time_ids": ids}}``
(without it, both halves get the conditional values).

Config fields that only change how diffusers *samples* (``timestep_spacing``, ``steps_offset``,
``clip_sample``, ``thresholding``, ``use_karras_sigmas``, ``solver_order``, ...) are ignored: ld3_ext
chooses its own grid and solver.  Fields that change what the network *means* and that we cannot map raise
:class:`DiffusersConfigError` naming the field: a live ``scheduler.config`` has no ``_class_name``, so EDM,
score-SDE VE and consistency schedulers are recognised by their own fields (``sigma_data``, ``snr``,
``original_inference_steps``, ...), and a config with neither betas nor a flow-matching signature is refused
rather than read as the default linear VP schedule.
"""
from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from .._checks import guidance
from ..schedules import FlowMatching, NoiseSchedule, VPDiscrete
from ..wrappers import DiffusionModel

#: diffusers prediction_type -> ld3_ext prediction
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}

#: lambda below which a cosine (squaredcos_cap_v2) schedule's tail is cut, as DPM-Solver's numerical_clip_alpha
COSINE_LAMBDA_CLIP = -5.1

# scheduler classes whose config describes a model we cannot express as (schedule, prediction)
_UNSUPPORTED_CLASSES = {
    "ScoreSdeVeScheduler": "score-SDE VE models (continuous sigma input, score output)",
    "KarrasVeScheduler": "Karras VE models",
    "EDMEulerScheduler": "EDM-preconditioned models (the scheduler applies c_in/c_skip/c_out)",
    "EDMDPMSolverMultistepScheduler": "EDM-preconditioned models (the scheduler applies c_in/c_skip/c_out)",
    "CosineDPMSolverMultistepScheduler": "EDM-preconditioned models (the scheduler applies c_in/c_skip/c_out)",
    "CMStochasticIterativeScheduler": "consistency models",
    "LCMScheduler": "latent consistency models (not probability-flow ODE denoisers)",
    "TCDScheduler": "trajectory consistency distilled models",
    "FlowMatchLCMScheduler": "latent consistency distilled flow models (not probability-flow ODE denoisers)",
    "HeliosDMDScheduler": "distribution-matching distilled (DMD) models (not probability-flow ODE denoisers)",
    "VQDiffusionScheduler": "discrete (VQ) diffusion",
    "AmusedScheduler": "masked token models",
}


# a live ``scheduler.config`` (FrozenDict) carries no _class_name: recognise those families by fields that only
# their configs have.  (field, what it marks)
_UNSUPPORTED_FIELDS = (
    ("sigma_data", "EDM-preconditioned models (EDMEuler/EDMDPMSolverMultistep/CosineDPMSolverMultistep/consistency "
                   "schedulers; the scheduler applies c_in/c_skip/c_out)"),
    ("sigma_schedule", "EDM-preconditioned models (EDMEuler/EDMDPMSolverMultistep/CosineDPMSolverMultistep; the "
                       "scheduler applies c_in/c_skip/c_out)"),
    ("snr", "score-SDE VE models (ScoreSdeVeScheduler: continuous sigma input, score output)"),
    ("correct_steps", "score-SDE VE models (ScoreSdeVeScheduler: continuous sigma input, score output)"),
    ("s_churn", "Karras VE models (KarrasVeScheduler)"),
    ("original_inference_steps", "latent / trajectory consistency distilled models (LCMScheduler/TCDScheduler; "
                                 "not probability-flow ODE denoisers)"),
    ("timestep_scaling", "latent / trajectory consistency distilled models (LCMScheduler/TCDScheduler; "
                         "not probability-flow ODE denoisers)"),
    ("upscale_mode", "latent consistency distilled flow models (FlowMatchLCMScheduler; not probability-flow ODE "
                     "denoisers)"),
)

#: beta_schedule values we build betas for (the union over diffusers' VP schedulers; "exp" is HeunDiscrete's)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")

# boolean fields whose True (not their default False) changes what the network reads.  (field, what it marks)
_UNSUPPORTED_FLAGS = (
    ("invert_sigmas", "inverted flow sigma schedules (Mochi: the network reads the time of 1 - sigma, the reverse of "
                      "the flow-matching convention)"),
)


class DiffusersConfigError(ValueError):
    """A diffusers scheduler/model config that ld3_ext cannot map; the message names the field."""


#: diffusers' variance_type values (DDPM/DDIM/UnCLIP/DPM-Solver configs); the learned ones mean a 2C-channel output
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def learned_variance(variance_type) -> bool:
    """Whether ``variance_type`` means [prediction; variance] output channels; a value diffusers does not know
    (a misspelled "learned_range") is refused, as it would silently read a 2C-channel output as a C-channel one."""
    if variance_type is None:
        return False
    if not isinstance(variance_type, str):
        raise DiffusersConfigError(f"variance_type must be a string or None, got {variance_type!r}")
    if variance_type not in VARIANCE_TYPES:
        raise DiffusersConfigError(f"variance_type={variance_type!r} is not a diffusers variance type; expected None "
                                   f"or one of {list(VARIANCE_TYPES)}")
    return variance_type in ("learned", "learned_range")


def _field(cfg: Mapping[str, Any], name: str, default=None):
    v = cfg.get(name, default)
    return default if v is None and default is not None else v


def _config_dict(scheduler_config) -> Dict[str, Any]:
    """Accept a scheduler, its ``.config`` (FrozenDict), a plain dict or a path to a JSON file/folder."""
    if scheduler_config is None:
        raise DiffusersConfigError("scheduler_config is required (a diffusers scheduler, its .config, a dict "
                                   "or a path to scheduler_config.json)")
    if isinstance(scheduler_config, (str, os.PathLike)):
        p = os.fspath(scheduler_config)
        if os.path.isdir(p):
            p = os.path.join(p, "scheduler_config.json")
        with open(p) as f:
            try:
                cfg = json.load(f)
            except ValueError as exc:  # JSONDecodeError's own text names no file
                raise DiffusersConfigError(f"scheduler_config: {p} is not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise DiffusersConfigError(f"scheduler_config: {p} must hold a JSON object (a diffusers scheduler "
                                       f"config), got {type(cfg).__name__}")
        return cfg
    cfg = getattr(scheduler_config, "config", scheduler_config)
    if not isinstance(cfg, Mapping):
        raise DiffusersConfigError(f"scheduler_config must be a mapping, a scheduler or a path, got "
                                   f"{type(scheduler_config).__name__}")
    cfg = dict(cfg)
    if cfg is not scheduler_config and hasattr(scheduler_config, "config"):
        cfg.setdefault("_class_name", type(scheduler_config).__name__)  # a scheduler instance names itself
    return cfg


def _describe(cfg: Mapping[str, Any]) -> str:
    """A config's name for error messages: its class when saved, else its fields."""
    if cfg.get("_class_name"):
        return repr(cfg["_class_name"])
    return "with fields " + ", ".join(sorted(k for k in cfg if not k.startswith("_"))) if cfg else "{}"


def _is_flow_config(cfg: Mapping[str, Any]) -> bool:
    """A rectified-flow config: FlowMatch* class (saved configs name it; in-memory ones have no betas but a
    ``shift``), or a multistep scheduler with ``use_flow_sigmas``."""
    cls = str(cfg.get("_class_name") or "")
    no_betas = "beta_schedule" not in cfg and "trained_betas" not in cfg
    return cls.startswith("FlowMatch") or bool(cfg.get("use_flow_sigmas", False)) or (no_betas and "shift" in cfg)


def _num_train_timesteps(cfg: Mapping[str, Any], minimum: int = 1) -> int:
    """The config's num_train_timesteps (default 1000 when absent); diffusers has no default for a null one."""
    n = cfg.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < minimum:
        raise DiffusersConfigError(f"num_train_timesteps must be an int >= {minimum}, got {n!r}")
    return int(n)


def _snr_shift_scale(cfg: Mapping[str, Any]) -> Optional[float]:
    """CogVideoX's SNR shift s (alphas_cumprod / (s + (1 - s) alphas_cumprod)), None for other schedulers.  A
    saved config without the field gets its class's default, as diffusers' from_config does (3.0 for CogVideoX)."""
    if "snr_shift_scale" not in cfg:
        import diffusers
        cls = getattr(diffusers, str(cfg.get("_class_name") or ""), None)
        try:
            p = inspect.signature(cls.__init__).parameters.get("snr_shift_scale") if isinstance(cls, type) else None
        except (TypeError, ValueError):
            p = None
        return None if p is None or p.default is inspect.Parameter.empty else float(p.default)
    s = cfg["snr_shift_scale"]
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s <= 0:
        raise DiffusersConfigError(f"snr_shift_scale must be a finite number > 0, got {s!r}")
    return float(s)


def _config_real(cfg: Mapping[str, Any], name: str, default: float) -> float:
    """A number field of the config (float("x") named no field)."""
    v = _field(cfg, name, default)
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, str)):
        raise DiffusersConfigError(f"{name}={v!r} in the scheduler config is not a number")
    try:
        return float(v)
    except ValueError:
        raise DiffusersConfigError(f"{name}={v!r} in the scheduler config is not a number") from None


def alphas_cumprod_from_config(cfg: Mapping[str, Any]) -> torch.Tensor:
    """float64 alphas_cumprod exactly as diffusers builds them (float32 betas and cumprod, as its schedulers do)."""
    from diffusers import DDPMScheduler

    n = _num_train_timesteps(cfg, minimum=2)
    if cfg.get("rescale_betas_zero_snr", False):
        raise DiffusersConfigError("rescale_betas_zero_snr=True: the last training step has alpha = 0 (infinite "
                                   "noise), which an ODE sampling schedule cannot start from; not supported")
    trained = cfg.get("trained_betas")
    beta_schedule = _field(cfg, "beta_schedule", "linear")
    field = "trained_betas" if trained is not None else "beta_schedule"
    kw = dict(num_train_timesteps=n, beta_start=_config_real(cfg, "beta_start", 0.0001),
              beta_end=_config_real(cfg, "beta_end", 0.02), beta_schedule=beta_schedule, trained_betas=trained)
    if trained is None:
        if not isinstance(beta_schedule, str) or beta_schedule not in BETA_SCHEDULES:
            raise DiffusersConfigError(f"beta_schedule={beta_schedule!r} is not supported; expected one of "
                                       f"{list(BETA_SCHEDULES)} (or trained_betas)")
        if beta_schedule == "exp":  # only HeunDiscreteScheduler builds it (DDPMScheduler lacks it): its own betas
            from diffusers.schedulers.scheduling_heun_discrete import betas_for_alpha_bar
            kw.update(beta_schedule="linear", trained_betas=betas_for_alpha_bar(n, alpha_transform_type="exp").tolist())
    snr_shift = _snr_shift_scale(cfg)
    if snr_shift is not None and trained is None and beta_schedule == "scaled_linear":
        # the CogVideoX schedulers keep scaled_linear betas (and so alphas_cumprod) in float64
        betas = torch.linspace(kw["beta_start"] ** 0.5, kw["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, dim=0)
    else:
        try:
            ac = DDPMScheduler(**kw).alphas_cumprod
        except (NotImplementedError, ValueError, TypeError, RuntimeError) as exc:  # trained_betas="abc": torch's
            raise DiffusersConfigError(f"{field}={cfg.get(field)!r} cannot be mapped: {exc}") from exc
    if snr_shift is not None:  # CogVideoX's SD3-style SNR shift, in its schedulers' dtype
        ac = ac / (snr_shift + (1 - snr_shift) * ac)
    ac = ac.to(torch.float64)
    if ac.numel() != n:  # trained_betas too: the network's time index is read against n
        src = "trained_betas has" if trained is not None else "the config gives"
        raise DiffusersConfigError(f"num_train_timesteps={n} but {src} {ac.numel()} betas")
    if not torch.all((ac > 0) & (ac < 1)) or not torch.all(ac[1:] < ac[:-1]):
        raise DiffusersConfigError(f"{field}: alphas_cumprod must be strictly decreasing in (0, 1)")
    return ac


def schedule_from_diffusers_config(scheduler_config, shift: Optional[float] = None,
                                   t_min: Optional[float] = None, t_max: Optional[float] = None
                                   ) -> Tuple[NoiseSchedule, str]:
    """``(schedule, prediction)`` for a diffusers scheduler config (see the module docstring)."""
    cfg = _config_dict(scheduler_config)
    cls = str(cfg.get("_class_name") or "")
    if cls in _UNSUPPORTED_CLASSES:
        raise DiffusersConfigError(f"_class_name={cls!r}: {_UNSUPPORTED_CLASSES[cls]} are not supported")
    for name, what in _UNSUPPORTED_FIELDS:
        if cfg.get(name) is not None:
            raise DiffusersConfigError(f"scheduler config field {name}={cfg[name]!r}: {what} are not supported")
    for name, what in _UNSUPPORTED_FLAGS:
        if cfg.get(name) not in (None, False):
            raise DiffusersConfigError(f"scheduler config field {name}={cfg[name]!r}: {what} are not supported")
    if cfg.get("stage_range") is not None and "solver_order" not in cfg and "scheduler_type" not in cfg:
        # HeliosDMD's live config: Helios' stage fields without the UniPC/Euler solver fields of HeliosScheduler
        raise DiffusersConfigError(f"scheduler config field stage_range={cfg['stage_range']!r} without a solver "
                                   "(HeliosDMDScheduler): distribution-matching distilled (DMD) models (not "
                                   "probability-flow ODE denoisers) are not supported")
    if "beta_schedule" not in cfg and cfg.get("trained_betas") is None and not _is_flow_config(cfg):
        # without betas the old default (linear VP, 1000 steps) would silently describe another model
        raise DiffusersConfigError(f"scheduler config {_describe(cfg)} has neither a beta schedule (beta_schedule / "
                                   "trained_betas) nor a flow-matching signature (FlowMatch* _class_name, shift, "
                                   "use_flow_sigmas): its noise schedule cannot be mapped")
    ptype = cfg.get("prediction_type") or ("flow_prediction" if _is_flow_config(cfg) else "epsilon")
    if ptype not in PREDICTION_TYPES:
        raise DiffusersConfigError(f"prediction_type={ptype!r} is not supported; expected one of "
                                   f"{sorted(PREDICTION_TYPES)}")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise DiffusersConfigError(f"timestep_type={cfg.get('timestep_type')!r}: only 'discrete' (the network "
                                   "receives the training index) is supported")
    if _is_flow_config(cfg):
        _num_train_timesteps(cfg)  # the network's time scale
        if ptype != "flow_prediction":
            raise DiffusersConfigError(f"prediction_type={ptype!r} with a flow-matching config "
                                       f"({cls or 'use_flow_sigmas=True'}): expected 'flow_prediction'")
        if shift is None:
            if cfg.get("use_dynamic_shifting", False):
                raise DiffusersConfigError("use_dynamic_shifting=True: the shift depends on the image resolution "
                                           "(mu); pass shift= explicitly")
            shift = cfg.get("shift", cfg.get("flow_shift", 1.0))
            if shift is None:  # a missing or null shift is diffusers' default, 1
                shift = 1.0
        try:  # the schedule's own rule for a shift, raised as a config error
            kw = {"shift": FlowMatching.check_shift(shift)}
        except (TypeError, ValueError) as exc:
            raise DiffusersConfigError(str(exc)) from exc
        if t_min is not None:
            kw["t_min"] = t_min
        if t_max is not None:
            kw["t_max"] = t_max
        return FlowMatching(**kw), "velocity"
    if shift is not None:  # a VP beta schedule has no shift: it was dropped without a word
        raise DiffusersConfigError(f"shift={shift!r} applies to flow-matching configs only; this config is a VP beta "
                                   "schedule: drop shift")
    if ptype == "flow_prediction":
        raise DiffusersConfigError("prediction_type='flow_prediction' needs a flow-matching config (a FlowMatch* "
                                   "scheduler or use_flow_sigmas=True); a VP beta schedule cannot carry a flow model")
    ac = alphas_cumprod_from_config(cfg)
    if t_max is None and cfg.get("beta_schedule") == "squaredcos_cap_v2":
        # the cosine tail reaches lambda ~ -10; start where lambda >= -5.1 (DPM-Solver's numerical_clip_alpha)
        lam = 0.5 * torch.log(ac) - 0.5 * torch.log1p(-ac)
        keep = int((lam >= COSINE_LAMBDA_CLIP).sum())
        t_max = keep / ac.numel()
    kw = {}
    if t_min is not None:
        kw["t_min"] = t_min
    if t_max is not None:
        kw["t_max"] = t_max
    return VPDiscrete(alphas_cumprod=ac, **kw), PREDICTION_TYPES[ptype]


def network_time_fn(schedule: NoiseSchedule, num_train_timesteps: int = 1000):
    """How a diffusers network reads time: VP index t*N - 1, flow t*num_train_timesteps."""
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral) \
            or num_train_timesteps < 1:
        # 0 would feed the network time 0 at every step
        raise DiffusersConfigError(f"num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
    if isinstance(schedule, VPDiscrete):
        return "index"
    if isinstance(schedule, FlowMatching):
        n = float(num_train_timesteps)

        def flow_timestep(t):
            return t * n
        return flow_timestep
    raise DiffusersConfigError(f"schedule {type(schedule).__name__}: diffusers networks read a VP training index "
                               "or a flow time; use a VPDiscrete or FlowMatching schedule")


def _inner(net):
    """The network a ``torch.compile`` wrapper (OptimizedModule) holds: its class and its forward's parameter names
    say how to call it and what conditions it (the wrapper's forward is ``(*args, **kwargs)``)."""
    return getattr(net, "_orig_mod", net)


class _UNetCall:
    """``fn(x, time, **kw)`` around a diffusers network: dtype casts, ``.sample`` unwrapping, learned-variance split."""

    def __init__(self, net, learned_variance: bool):
        self.net = net
        self.learned_variance = learned_variance
        self.__name__ = type(_inner(net)).__name__
        # by keyword where the network names it: the transformers (SD3, PixArt, Flux) take encoder_hidden_states
        # second, so a positional time would land there; the UNets and DiT take timestep second
        try:
            params = inspect.signature(_inner(net).forward).parameters
        except (TypeError, ValueError):
            params = {}
        self.time_keyword = "timestep" in params

    def __call__(self, x, time, **kw):
        dtype = getattr(self.net, "dtype", x.dtype)
        kw = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
        if self.time_keyword:
            out = self.net(x.to(dtype), timestep=time, return_dict=False, **kw)[0]
        else:
            out = self.net(x.to(dtype), time, return_dict=False, **kw)[0]
        if out.dim() > 1 and x.dim() > 1 and out.shape[1] == 2 * x.shape[1]:
            if not self.learned_variance:
                raise DiffusersConfigError(
                    f"the {self.__name__} outputs {out.shape[1]} channels for a {x.shape[1]}-channel sample (a "
                    "learned-variance model?) but the scheduler config's variance_type is not 'learned' / "
                    "'learned_range'; set variance_type in the scheduler config")
            out = out[:, : x.shape[1]]  # [mean part; variance part]: the ODE uses only the first half
        return out.to(x.dtype)


class DiffusersModel(DiffusionModel):
    """A ``DiffusionModel`` around a diffusers network (see the module docstring)."""

    def _call(self, x, t, kwargs):
        kw = {**self.model_kwargs, **kwargs}
        b = x.shape[0]
        # one stored prompt embedding / label (and SDXL's added_cond_kwargs) serves any batch
        for k in (self.cond_key, "uncond", "added_cond_kwargs", "uncond_kwargs", "pooled_projections"):
            if k in kw:
                kw[k] = _expand_batch_one(kw[k], b)
        return super()._call(x, t, kw)


def _expand_batch_one(v, b: int):
    if torch.is_tensor(v):
        return v.expand(b, *v.shape[1:]) if v.dim() >= 1 and v.shape[0] == 1 and b > 1 else v
    if isinstance(v, dict):
        return {k: _expand_batch_one(x, b) for k, x in v.items()}
    return v


def _conditioning(net) -> Tuple[bool, str]:
    """(is_conditional, the kwarg that carries the condition) for a diffusers network."""
    net = _inner(net)
    cfg = getattr(net, "config", {}) or {}
    name = type(net).__name__
    if name == "UNet2DModel":
        cond = cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None
        return cond, "class_labels"
    # SD3/Flux/AuraFlow MMDiTs attend jointly to the text (joint_attention_dim), no cross_attention_dim
    if name == "UNet2DConditionModel" or cfg.get("cross_attention_dim") is not None \
            or cfg.get("joint_attention_dim") is not None:
        return True, "encoder_hidden_states"
    return False, "encoder_hidden_states"


def from_diffusers(unet, scheduler_config, guidance_scale: Optional[float] = None, cond_key: Optional[str] = None,
                   shift: Optional[float] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                   freeze: bool = True) -> Tuple[DiffusersModel, NoiseSchedule]:
    """``(model, schedule)`` from a diffusers network and its scheduler config, for any solver and the trainer.

    ``guidance_scale`` turns on classifier-free guidance (conditional networks only: pass ``cond_key``'s
    kwarg and ``uncond=`` at sampling time, or store them in ``model_kwargs``).  ``freeze`` sets
    ``requires_grad=False`` on the network's parameters (LD3 trains only the time grid).
    """
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"unet must be a diffusers network (torch.nn.Module), got {type(unet).__name__}")
    guidance_scale = guidance("guidance_scale", guidance_scale)  # "7.5" is refused, as LD3Scheduler refuses it
    cfg = _config_dict(scheduler_config)
    schedule, prediction = schedule_from_diffusers_config(cfg, shift=shift)
    conditional, default_key = _conditioning(unet)
    # an explicit cond_key names the condition of a network the heuristic does not know (DiT's class_labels)
    conditional = conditional or cond_key is not None
    if guidance_scale is not None and not conditional:
        raise DiffusersConfigError(
            f"guidance_scale={guidance_scale} but the {type(_inner(unet)).__name__} is unconditional (no class "
            "embedding / "
            "cross-attention): classifier-free guidance needs a conditional network; drop guidance_scale, or name "
            "the network's condition argument with cond_key (e.g. cond_key='class_labels')")
    ucfg = getattr(unet, "config", {}) or {}
    if ucfg.get("time_embedding_type", "positional") == "fourier":
        raise DiffusersConfigError("time_embedding_type='fourier' (a score-SDE VE network reading sigma) is not "
                                   "supported")
    if not isinstance(freeze, bool):  # "no" is truthy: the network was frozen
        raise TypeError(f"freeze must be True or False, got {freeze!r}")
    if freeze:
        unet.requires_grad_(False)
    fn = _UNetCall(unet, learned_variance(cfg.get("variance_type")))
    n_train = _num_train_timesteps(cfg)
    model = DiffusersModel(fn, schedule, prediction=prediction, time_input=network_time_fn(schedule, n_train),
                           guidance_scale=guidance_scale, cond_key=cond_key or default_key,
                           model_kwargs=model_kwargs, name=f"diffusers:{type(_inner(unet)).__name__}")
    model.net = unet  # registered submodule: model.to()/.eval() reach the UNet
    model.default_cond_key = default_key  # the keyword this kind of network takes (teacher caches key only others)
    model.scheduler_config = cfg
    model.num_train_timesteps = n_train
    if ucfg.get("sample_size") is not None and ucfg.get("in_channels") is not None:
        ss = ucfg["sample_size"]
        ss = (ss, ss) if isinstance(ss, int) else tuple(ss)
        model.sample_shape = (int(ucfg["in_channels"]), *ss)  # what `ld3 sample/train` draws noise for
    return model, schedule


_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def _find_parts(path: str) -> Tuple[str, Optional[str], str]:
    """(unet folder, its subfolder or None, scheduler config path) in a pipeline or model folder."""
    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"diffusers folder {path!r} {what} (only local folders are supported; "
                                "no network access)")
    if os.path.isfile(os.path.join(path, "unet", "config.json")):
        unet_dir, sub = path, "unet"
    elif os.path.isfile(os.path.join(path, "config.json")):
        unet_dir, sub = path, None
    else:
        raise FileNotFoundError(f"{path!r}: no unet/config.json (pipeline folder) or config.json (model folder)")
    for cand in (os.path.join(path, "scheduler", "scheduler_config.json"),
                 os.path.join(path, "scheduler_config.json")):
        if os.path.isfile(cand):
            return unet_dir, sub, cand
    raise FileNotFoundError(f"{path!r}: no scheduler/scheduler_config.json or scheduler_config.json "
                            "(the noise schedule comes from it)")


def load_diffusers_model(path: str, guidance_scale: Optional[float] = None, device: Union[str, torch.device] = "cpu",
                         dtype: Optional[torch.dtype] = None, shift: Optional[float] = None,
                         model_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[DiffusersModel, NoiseSchedule]:
    """``(model, schedule)`` from a LOCAL diffusers folder (pipeline folder with unet/ + scheduler/, or a model
    folder with config.json + scheduler_config.json).  Never touches the network (``local_files_only``).

    Backs ``ld3 train --model diffusers:PATH``.  For a UNet2DConditionModel the caller supplies the text
    conditioning (``encoder_hidden_states`` / ``uncond``) as model kwargs or through ``model_kwargs``.
    """
    import diffusers

    unet_dir, sub, sched_path = _find_parts(os.fspath(path))
    cfg_path = os.path.join(unet_dir, sub or "", "config.json")
    with open(cfg_path) as f:
        ucfg = json.load(f)
    if not isinstance(ucfg, dict):
        raise DiffusersConfigError(f"{cfg_path} must hold a JSON object (a diffusers model config), got "
                                   f"{type(ucfg).__name__}")
    cls_name = ucfg.get("_class_name")
    cls = getattr(diffusers, str(cls_name), None)
    # a denoising network: a diffusers model class (ModelMixin), not a VAE's or a pipeline's folder
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)) or "Autoencoder" in str(cls_name) \
            or "VQModel" in str(cls_name):
        raise DiffusersConfigError(f"_class_name={cls_name!r} in {cfg_path} is not a diffusers denoising network "
                                   f"class (supported: {', '.join(_UNET_CLASSES)})")
    kw = {"local_files_only": True}
    if sub:
        kw["subfolder"] = sub
    if dtype is not None:
        kw["torch_dtype"] = dtype
    unet = cls.from_pretrained(unet_dir, **kw)
    unet = unet.to(device).eval()
    model, schedule = from_diffusers(unet, sched_path, guidance_scale=guidance_scale, shift=shift,
                                     model_kwargs=model_kwargs)
    model.source_path = os.fspath(path)
    return model, schedule


__all__ = ["from_diffusers", "load_diffusers_model", "schedule_from_diffusers_config", "alphas_cumprod_from_config",
           "DiffusersModel", "DiffusersConfigError", "PREDICTION_TYPES", "network_time_fn"]
