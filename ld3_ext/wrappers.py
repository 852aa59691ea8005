"""Model wrappers: one interface (data prediction and noise prediction at a time t) for any network.

``wrap_model(fn, schedule, prediction=...)`` returns a :class:`DiffusionModel`.  Solvers call
``model.predict(x, t)`` which returns ``(x0_hat, eps_hat)`` computed from ONE network call; the
conversion between them uses alpha(t), sigma(t) at that same t (LD3's decoupled model times).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import contextlib
import numbers
import threading

import numpy as np
import torch

from ._checks import flag, guidance
from ._finite import all_finite, all_finite_tensor
from .device_constants import capturing as _capturing  # the solvers and ld3_ext.sample read it as wrappers._capturing
from .device_constants import tracing
from .ops import _opmath, _vmapped
from .schedules import FlowMatching, NoiseSchedule, VPDiscrete

PREDICTIONS = ("eps", "x0", "v", "score", "velocity", "edm")
TIME_INPUTS = ("t", "sigma", "index", "edm_noise")


def _compiling() -> bool:
    return tracing()  # this thread traces (device_constants.tracing: not torch's process-wide compile flag)


def _map_tensors(value, fn):
    """``fn`` on every tensor in ``value`` (tensors, and lists, tuples and dicts of them, rebuilt as their own type:
    a namedtuple from its fields, an OrderedDict as one); the rest as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple: type(value)(generator) failed
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        items = [(k, _map_tensors(v, fn)) for k, v in value.items()]
        try:
            return type(value)(items)
        except TypeError:  # a dict subclass that takes no pairs (defaultdict's factory first): a plain dict
            return dict(items)
    return value




def _time_text(t: torch.Tensor) -> str:
    """A model time for an error message; a vmapped time has one value per mapped sample and cannot be read."""
    return "vmapped" if _vmapped(t) else f"{float(t.detach()):.6g}"


class ModelOutputError(RuntimeError):
    """A wrapped network returned something unusable (wrong shape, NaN/Inf)."""


# per thread, {id(model): on}: DiffusionModel.output_checks' overrides of check_output (a module-level
# thread-local, not an attribute: a model stays copyable and picklable)
_CHECK_OVERRIDES = threading.local()
# per thread, {id(model): queue}: deferred_output_checks' queues.  An attribute shared by the threads using one
# model put one thread's checks in another's block: a NaN sample came back silently and the error was raised in
# the other thread (concurrency audit; on CUDA every sample() opens a block)
_DEFERRED = threading.local()
_HALF = (torch.float16, torch.bfloat16)


def default_network_name(fn: Callable) -> str:
    """The name a DiffusionModel wrapping ``fn`` gets without ``name=``: a function's own, else its class's (a
    torch.compile'd module's is the class of the network it compiles, not OptimizedModule)."""
    return getattr(fn, "__name__", type(getattr(fn, "_orig_mod", fn)).__name__)


class DiffusionModel(torch.nn.Module):
    """A network bound to its noise schedule, its prediction type and how it reads time.

    Parameters
    ----------
    fn : callable ``fn(x, time, **kwargs) -> tensor``
    schedule : NoiseSchedule
    prediction : what ``fn`` predicts: "eps" (noise), "x0" (data), "v" (v = alpha eps - sigma x0; exact for any
        alpha/sigma, the usual v-prediction on VP schedules),
        "score" (grad log p), "velocity" (flow matching, v = eps - x0) or "edm" (a k-diffusion style
        denoiser ``fn(x_scaled, sigma) -> x0`` working in the variance-exploding view x/alpha).
    time_input : how t is fed to ``fn``: "t" (schedule time), "sigma" (sigma/alpha), "index"
        (VPDiscrete's 0..N-1 training index, as a float), "edm_noise" (EDM's c_noise = log(sigma)/4),
        or a callable ``t -> time``.  Default: "sigma" for "edm", "index" for VPDiscrete, else "t".  The network
        gets its time as a [B] tensor (one entry per sample, all equal, as diffusers UNets and k-diffusion
        denoisers take it: reshape it to broadcast over x), in x's dtype, but never below float32 (a half time
        moves SD's index 999 to 1000); a callable
        that returns a float16/bfloat16 time asks for it (a half network with a time-embedding layer) and gets it.
    guidance_scale : classifier-free guidance scale; when set, ``cond``/``uncond`` kwarg names are
        batched into one call as [uncond; cond] (tensors of the same shape, dicts of them per key, or
        lists/tuples concatenated) and the outputs combined as u + s (c - u).  Every other model kwarg goes
        to both halves: tensors (also inside dicts, e.g. SDXL's ``added_cond_kwargs``, and lists/tuples,
        e.g. ControlNet's residuals) with the batch of x are repeated; pass ``uncond_kwargs={name: value}``
        among the call's keyword arguments (``sample(..., uncond_kwargs=...)``) where the unconditional half
        needs its own value (SDXL's negative pooled ``text_embeds``).
    cond_key : the keyword the conditioning comes under (default "cond"; e.g. "encoder_hidden_states"); with
        guidance, ``uncond=`` holds the unconditional value for it.
    model_kwargs : extra keyword arguments passed to every call.
    check_output : raise ``ModelOutputError`` naming the step when the network returns NaN/Inf; default True
        (an output of the wrong shape or type is refused either way).
    name : how a network without weights is identified in teacher caches and checkpoints (default: the
        function's name); one with weights is identified by their hash.
    backend : "auto" (fused when the extension is built), "fused" or "reference": how ``predict`` converts
        between x0 and eps for a float32/float64 state -- one fused pass whose time gradient is the same for any
        thread count, or the plain PyTorch formulas (the two agree to rounding).
    """

    # unguided, the guidance keywords (uncond, uncond_kwargs) are refused: a network taking **kwargs would swallow
    # them.  ld3_ext.sample's wrapper of a k-diffusion denoiser clears it: there they are the denoiser's own
    _refuse_guidance_kwargs = True

    def __init__(self, fn: Callable, schedule: NoiseSchedule, prediction: str = "eps",
                 time_input: Union[str, Callable, None] = None, guidance_scale: Optional[float] = None,
                 cond_key: str = "cond", model_kwargs: Optional[Dict[str, Any]] = None,
                 check_output: bool = True, name: Optional[str] = None, backend: str = "auto"):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable (the network), got {type(fn).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be an ld3_ext.schedules.NoiseSchedule, got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if prediction == "velocity" and not isinstance(schedule, FlowMatching):
            raise ValueError("prediction='velocity' (flow matching) needs a FlowMatching schedule, "
                             f"got {type(schedule).__name__}")
        if prediction == "v" and isinstance(schedule, FlowMatching):
            raise ValueError("prediction='v' is the VP v-parameterisation; for a flow-matching model use "
                             "prediction='velocity'")
        if time_input is None:
            time_input = "sigma" if prediction == "edm" else ("index" if isinstance(schedule, VPDiscrete) else "t")
        if not callable(time_input) and time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS} or a callable, got {time_input!r}")
        if time_input == "index" and not isinstance(schedule, VPDiscrete):
            raise ValueError("time_input='index' needs a VPDiscrete schedule")
        if not isinstance(cond_key, str) or not cond_key:
            raise TypeError(f"cond_key must be a non-empty str (the network's condition keyword), got {cond_key!r}")
        if cond_key in ("uncond", "uncond_kwargs"):  # guidance pops these by name: the condition would be lost
            raise ValueError(f"cond_key must not be {cond_key!r}: 'uncond' and 'uncond_kwargs' are the guidance "
                             "keywords; name the condition otherwise")
        check_output = flag("check_output", check_output)  # bool("no") is True: a string is refused
        from .ops import BACKENDS, resolve_backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._fused_conversion = resolve_backend(backend) == "fused"
        guidance_scale = guidance("guidance_scale", guidance_scale)  # True is no scale of 1.0, "7.5" no number
        self.fn = fn  # a module is registered as ``net`` (__setattr__): .to()/.eval()/state_dict reach it once
        self.schedule = schedule
        self.prediction = prediction
        self.time_input = time_input
        self.guidance_scale = guidance_scale
        self.cond_key = cond_key
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):  # dict() of a list names nothing
            raise TypeError(f"model_kwargs must be a dict of keyword arguments for the network, got "
                            f"{type(model_kwargs).__name__}")
        self.model_kwargs = dict(model_kwargs or {})
        self.check_output = check_output
        # a torch.compile'd module is named by the network it holds (its class is OptimizedModule)
        self.name = name or default_network_name(fn)

    @contextlib.contextmanager
    def output_checks(self, on: bool):
        """Inside, in this thread, the NaN/Inf check of the network's outputs is on (or off) whatever
        ``check_output`` says (which stays as it is: other threads, and this one afterwards, see it).
        ``ld3_ext.sample(check_output=...)`` wraps each evaluation of its call in it, a backward's too."""
        on = flag("check_output", on)
        overrides = _CHECK_OVERRIDES.__dict__.setdefault("by_model", {})
        key = id(self)
        before = overrides.get(key)
        overrides[key] = on
        try:
            yield self
        finally:
            if before is None:
                overrides.pop(key, None)
            else:
                overrides[key] = before

    def _checks_on(self) -> bool:
        """check_output, or this thread's override of it (``output_checks``)."""
        overrides = getattr(_CHECK_OVERRIDES, "by_model", None)
        on = overrides.get(id(self)) if overrides else None
        return self.check_output if on is None else on

    @property
    def _deferred(self) -> Optional[List[Tuple[Optional[int], torch.Tensor, torch.Tensor, Optional[tuple]]]]:
        """This thread's queue of deferred_output_checks (None: check at once): (step, t, all-finite flag on the
        device, overflow); overflow is None, or (the network's own output all-finite flag, its dtype, the state's
        dtype) when the output was cast to the state's dtype."""
        queues = getattr(_DEFERRED, "by_model", None)
        return queues.get(id(self)) if queues else None

    @_deferred.setter
    def _deferred(self, queue) -> None:
        queues = _DEFERRED.__dict__.setdefault("by_model", {})
        if queue is None:
            queues.pop(id(self), None)
        else:
            queues[id(self)] = queue

    @contextlib.contextmanager
    def deferred_output_checks(self):
        """Inside, the NaN/Inf check of each network output is queued on the device instead of read back
        at once; leaving the block reads all of them in one host sync and raises ModelOutputError for
        the first bad step.  A solver's ``sample()`` uses it on CUDA, so a sampler step never waits for
        the GPU.  During CUDA-graph capture nothing can be read back: the checks are skipped there."""
        if not self._checks_on() or self._deferred is not None:  # off, or an outer block checks
            yield
            return
        self._deferred = []
        try:
            yield
            pending = self._deferred
        finally:
            self._deferred = None
        if pending and not _capturing():
            ok = torch.stack([flag.to(pending[0][2].device) for _, _, flag, _ in pending])
            if not bool(ok.all()):
                step, t, _, overflow = pending[int((~ok).nonzero()[0, 0])]
                where = f" at step {step}" if step is not None else ""
                why = _range_note(overflow[1], overflow[2]) if overflow is not None and bool(overflow[0]) else ""
                raise ModelOutputError(f"model returned NaN/Inf{where} (t={_time_text(t)}){why}")

    # -------------------------------------------------------------------------------------------
    # the network's time in op-math (float32 for a half state); ld3_ext.sample's k-diffusion denoisers take x's dtype
    _time_in_opmath = True
    # a network's time of one value is an expanded [B] view (no copy); k-diffusion's denoisers get a tensor of
    # their own (sigma * s_in), which one may write in place (an expanded view raises on that)
    _fresh_time = False

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        ti = self.time_input
        if callable(ti):
            out = ti(t)
            if not isinstance(out, torch.Tensor):  # a float or None failed later as "'float' has no attribute"
                raise TypeError(f"time_input: the callable must return a torch.Tensor (the network's time), got "
                                f"{type(out).__name__}")
            return out
        if ti == "t":
            return t
        if ti == "sigma":
            return self.schedule.edm_sigma(t)
        if ti == "edm_noise":
            return 0.25 * torch.log(self.schedule.edm_sigma(t))
        return self.schedule.model_index(t)

    def _call(self, x: torch.Tensor, t: torch.Tensor, kwargs: Dict[str, Any]) -> torch.Tensor:
        b = x.shape[0]
        tt = self.network_time(t)
        # the network reads time in x's dtype, but never below float32: a float16/bfloat16 time would move
        # SD's index 999 to 1000 (bfloat16 has 8 bits of mantissa); diffusers passes float32 times too
        tdt = _opmath(x.dtype) if self._time_in_opmath else x.dtype
        if tt.dtype != tdt and not (callable(self.time_input) and tt.dtype in _HALF):
            # skip no-op conversions: each is a dispatcher call (and a graph node); a callable's half time is asked for
            tt = tt.to(tdt)
        if tt.numel() == 1:
            tt = (tt if tt.dim() == 0 else tt.reshape(())).expand(b)
            if self._fresh_time:
                tt = tt.contiguous()
        xin = x
        if self.prediction == "edm":
            # divided in op-math: in float16 the backward's x/alpha^2 terms overflow when alpha is small
            op, alpha = _opmath(x.dtype), self.schedule.alpha(t)
            xin = x / alpha.to(x.dtype) if op == x.dtype else (x.to(op) / alpha.to(op)).to(x.dtype)
        kw = {**self.model_kwargs, **kwargs}
        if self.guidance_scale is None and not self._refuse_guidance_kwargs:
            return self.fn(xin, tt, **kw)
        if self.guidance_scale is None:
            if "uncond_kwargs" in kw:
                raise ValueError("uncond_kwargs is only used with classifier-free guidance: set guidance_scale")
            if "uncond" in kw:  # a network taking **kwargs would swallow it: an unguided result, silently
                raise ValueError("uncond is the unconditional input of classifier-free guidance, which is off: set "
                                 "guidance_scale (wrap_model(..., guidance_scale=...)) to guide")
            return self.fn(xin, tt, **kw)
        if self.cond_key not in kw or "uncond" not in kw:
            raise ValueError(f"guidance_scale is set: pass both '{self.cond_key}' and 'uncond' as model kwargs")
        cond, uncond = kw.pop(self.cond_key), kw.pop("uncond")
        # one condition per sample, or one for all (expanded, as a network broadcasts it unguided); any other batch
        # failed inside the network on the doubled batch, naming no argument
        cond, uncond = _cfg_batch(cond, b, repr(self.cond_key)), _cfg_batch(uncond, b, "uncond")
        uncond_kw = kw.pop("uncond_kwargs", None) or {}
        if not isinstance(uncond_kw, dict):
            raise TypeError(f"uncond_kwargs must be a dict of model kwargs, got {type(uncond_kw).__name__}")
        unknown = sorted(set(uncond_kw) - set(kw))
        if unknown:
            raise ValueError(f"uncond_kwargs names {unknown}, which are not among the model kwargs {sorted(kw)}: "
                             "give the conditional value as a model kwarg too")
        both = _cfg_cond(uncond, cond, self.cond_key)
        rest = {k: (_cfg_pair(uncond_kw[k], v, k) if k in uncond_kw else _cfg_repeat(v, b))
                for k, v in kw.items()}
        out = self.fn(torch.cat([xin, xin]), torch.cat([tt, tt]), **{self.cond_key: both}, **rest)
        if not isinstance(out, torch.Tensor):  # predict's check, before chunk() would raise AttributeError
            raise ModelOutputError(f"model returned {type(out).__name__} under classifier-free guidance, "
                                   "expected a tensor")
        if out.dim() == 0 or out.shape[0] != 2 * b:
            raise ModelOutputError(f"model output has shape {tuple(out.shape)} under classifier-free guidance, "
                                   f"expected a batch of {2 * b} ([uncond; cond], each of the input's batch {b})")
        out_u, out_c = out.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    # --- the wrapped network: a module is the registered child ``net``, once -------------------------------------
    # It was registered as ``fn`` and ``net``: every weight sat in state_dict twice (an edit to fn.* was overwritten
    # by net.* on load, safetensors refused the shared tensors, repr printed the network twice; serialization
    # audit).  State dicts and pickles of that layout still load; weights hashes keep it (``legacy_state_dict``).
    @property
    def fn(self) -> Callable:
        """The wrapped network (a module is ``self.net``)."""
        f = self.__dict__.get("_fn")
        return self._modules["net"] if f is None and "net" in self._modules else f

    def __setattr__(self, name, value):
        if name == "fn":
            if isinstance(value, torch.nn.Module):
                self.__dict__["_fn"] = None
                super().__setattr__("net", value)
            elif self._network_is_net() or not callable(value):
                # as when the module was a registered child fn: a plain callable in its place would have left its
                # weights in state_dict and in the weights hash (two models with one identity; diff review)
                raise TypeError(f"fn: cannot replace the wrapped network module with a {type(value).__name__}: "
                                "wrap the new network with wrap_model(...)")
            else:
                self.__dict__["_fn"] = value
            return
        super().__setattr__(name, value)

    def _network_is_net(self) -> bool:
        return self.__dict__.get("_fn") is None and self._modules.get("net") is not None

    def _fresh_checks_on(self) -> bool:
        """Whether solvers refuse an output in the memory of an earlier one (``check_fresh_output``): with the output
        checks (a wrapper over another model asks that one)."""
        return self._checks_on()

    def __setstate__(self, state):
        modules = state.get("_modules") or {}
        if "fn" in modules and modules.get("net") is modules["fn"]:  # pickled by an older ld3_ext
            del modules["fn"]
            state["_fn"] = None
        elif "_fn" not in state:  # an older pickle of a plain callable: stored as the attribute fn
            state["_fn"] = state.pop("fn", None)
        super().__setstate__(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state dict of the older layout holds the network under fn. too: net.'s entries are the ones loaded (as
        # they were then: loaded last), fn.'s alone stand in for them
        if self._network_is_net():
            old = prefix + "fn."
            for k in [k for k in state_dict if k.startswith(old)]:
                v = state_dict.pop(k)
                state_dict.setdefault(prefix + "net." + k[len(old):], v)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        """What a user checks first: the schedule, the prediction type and how time reaches the network."""
        ti = self.time_input
        ti = getattr(ti, "__name__", type(ti).__name__) if callable(ti) else repr(ti)
        parts = [f"schedule={self.schedule!r}", f"prediction={self.prediction!r}", f"time_input={ti}"]
        if not isinstance(self.fn, torch.nn.Module):  # a module shows as the (net) child below
            parts.insert(0, f"fn={getattr(self.fn, '__name__', type(self.fn).__name__)}")
        if self.guidance_scale is not None:
            parts.append(f"guidance_scale={self.guidance_scale:g}, cond_key={self.cond_key!r}")
        if self.model_kwargs:
            parts.append(f"model_kwargs={sorted(self.model_kwargs)}")
        return ", ".join(parts)

    def _apply(self, fn, *args, **kwargs):
        """.to()/.cuda()/.half() reach the tensors in ``model_kwargs`` too (a prompt's embeddings, an uncond), as
        they reach the network's buffers: left behind, every call on the GPU failed on a device mismatch."""
        # the kwargs first: a failure there leaves nothing converted (the weights were, and the kwargs not)
        kwargs_after = {k: _map_tensors(v, fn) for k, v in self.model_kwargs.items()}
        out = super()._apply(fn, *args, **kwargs)
        self.model_kwargs = kwargs_after
        return out

    def predict(self, x: torch.Tensor, t: torch.Tensor, step: Optional[int] = None, returns: str = "both",
                **kwargs):
        """(x0_hat, eps_hat) at time t (a 0-d tensor in schedule units).

        ``returns="x0"`` or ``"eps"`` computes only that view (the other entry is None): a solver that
        needs one view saves the full-tensor passes of the conversion.  Both come in x's dtype; for a
        float16/bfloat16 x the conversion runs in float32, from the network's output as it was returned.
        """
        if returns not in ("both", "x0", "eps"):
            raise ValueError(f"returns must be 'both', 'x0' or 'eps', got {returns!r}")
        # attribute checks only (no read-back): an integer x would give truncated integer predictions
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"predict: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"predict: x must be a floating tensor, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError("predict: x must have a batch dimension, got a 0-d tensor")
        if not isinstance(t, torch.Tensor):
            try:  # torch's own errors ("new(): invalid data type 'str'") name nothing
                t = torch.as_tensor(t, dtype=torch.float64 if x.dtype != torch.float32 else x.dtype, device=x.device)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise TypeError(f"predict: t must be a number or a tensor (schedule time), got "
                                f"{type(t).__name__}") from None
        if t.is_complex() or t.dtype == torch.bool:  # cast to a real time silently otherwise
            raise TypeError(f"predict: t must be a real time, got {t.dtype}")
        if t.device != x.device and t.device.type != "cpu":  # a CPU time is read as a scalar anywhere
            # a meta time failed later naming the solver's internal "coef"
            raise ValueError(f"predict: t is on {t.device} but x is on {x.device} (give t on x's device or the CPU)")
        if t.device != x.device:
            # a CPU time for a GPU state: alpha/sigma made from it fed the fused conversion CPU coefficients (refused)
            # and the network a CPU [B] time (desk check of the CUDA-only paths)
            t = t.to(x.device, non_blocking=True)
        if t.numel() != 1:  # one time for the whole batch: a [B] time would broadcast over x's last dimension
            raise ValueError(f"predict: t must hold one time for the whole batch, got shape {tuple(t.shape)}; "
                             "k-diffusion samplers pass per-sample sigmas (sigma/alpha): give them "
                             "ld3_ext.to_denoiser(model)")
        if t.dim() > 0:  # a [1, 1] time broadcast x0 to one more dimension than x (eps kept x's shape)
            t = t.reshape(())
        if not t.is_floating_point():  # an integer time: the schedules' knot tables would be cast to integers
            t = t.to(torch.float64 if x.dtype != torch.float32 else x.dtype)
        if t.dtype in _HALF:
            # converted in float64: in half, SD's model_index(t) read 1000 for 999 and alpha(0.5) was 0.08 % off (the
            # solvers' coefficients use float64 of the same value, so the two disagreed); and an end rounded past
            # the range (bfloat16 makes FlowMatching's t_max 0.999 a 1.0, where alpha = 0: x0 was inf) is that end
            t = half_time_on_range(self.schedule, t)
        if t.is_floating_point() and t.dtype != x.dtype:
            # the time -> alpha/sigma/network-time conversions must be at least as precise as x:
            # a float32 time grid with a float64 state is evaluated in float64 (not rounded to float32)
            wider = torch.promote_types(t.dtype, x.dtype)
            if wider != t.dtype:
                t = t.to(wider)
        out = self._call(x, t, kwargs)
        where = f" at step {step}" if step is not None else ""
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError(f"model returned {type(out).__name__}{where}, expected a tensor")
        if out.shape != x.shape:
            raise ModelOutputError(f"model output has shape {tuple(out.shape)}{where} (t={_time_text(t)}), "
                                   f"expected the input's shape {tuple(x.shape)}")
        if out.device != x.device:  # else torch's own error later names no model ("item() on meta tensors")
            raise ModelOutputError(f"model returned a tensor on {out.device}{where}, expected the input's device "
                                   f"{x.device}")
        if out.layout != torch.strided:  # a sparse output failed inside the finite check naming an aten op
            raise ModelOutputError(f"model returned a {out.layout} tensor{where}, expected a dense (strided) tensor")
        if not out.is_floating_point():
            # an integer/bool/complex output would be cast silently and carry no gradient: the
            # solve would be wrong and LD3 training would get zero network gradients without a word
            raise ModelOutputError(f"model returned a {out.dtype} tensor{where}, expected a floating tensor")
        raw = out  # the network's own precision, which the conversion below reads
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        # checked after the cast, on the values the solver uses: a float32 output beyond float16's range
        # becomes Inf in a float16 state.  The finite check syncs with the device, and cannot be traced:
        # skipped inside torch.compile, and for a vmapped output (no value to read back)
        if self._checks_on() and not _compiling() and not _vmapped(out):
            if self._deferred is not None:  # read back once, when the sample call ends
                overflow = (all_finite_tensor(raw), raw.dtype, x.dtype) if raw is not out else None
                self._deferred.append((step, t.detach(), all_finite_tensor(out), overflow))
            elif not _capturing() and not all_finite(out):  # nothing can be read back while capturing
                why = ""
                if raw is not out and all_finite(raw):  # finite, but not in the state's dtype
                    why = _range_note(raw.dtype, x.dtype)
                raise ModelOutputError(f"model returned NaN/Inf{where} (t={_time_text(t)}){why}")
        s = self.schedule
        p = self.prediction
        want_x0, want_eps = returns != "eps", returns != "x0"
        if p in ("x0", "edm") and not want_eps:
            return out, None  # nothing to convert: skip the schedule's scalar work
        if p == "eps" and not want_x0:
            return None, out
        # the conversion runs in op-math (float32 for a half state, from the network's own output where that is
        # wider; float32/float64 states unchanged) and returns the state's dtype: in float16 it divides by a
        # small alpha (alpha^2 ~ 4e-5 near VPLinear's t=1), whose backward overflowed the time gradients to -inf
        op = _opmath(x.dtype)
        if self._fused_conversion and out.dtype == x.dtype == op:
            return _convert_fused(s, p, x, out, t, want_x0, want_eps)
        if op == x.dtype:  # no-op casts skipped: each is a dispatcher call per network evaluation
            xo, outo, state = x, out, _same
        else:
            xo, outo, state = x.to(op), raw.to(op), (lambda v: v.to(x.dtype))
        if p == "velocity":  # x_t = (1-t) x0 + t eps, v = eps - x0
            tt = t.to(op)
            return (state(xo - tt * outo) if want_x0 else None), (state(xo + (1.0 - tt) * outo) if want_eps else None)
        alpha, sigma = s.alpha(t).to(op), s.sigma(t).to(op)
        if p == "v":  # v = alpha eps - sigma x0; alpha^2 + sigma^2 = 1 for VP, divide for any other schedule
            norm = alpha * alpha + sigma * sigma
            return (state((alpha * xo - sigma * outo) / norm) if want_x0 else None,
                    state((sigma * xo + alpha * outo) / norm) if want_eps else None)
        if p in ("eps", "score"):
            eps = outo if p == "eps" else -sigma * outo
            return (state((xo - sigma * eps) / alpha) if want_x0 else None), \
                ((out if p == "eps" else state(eps)) if want_eps else None)
        # "x0" and "edm": out is the denoised x0 (for "edm" in the VE view x/alpha, the same x0)
        return (out if want_x0 else None), (state((xo - alpha * outo) / sigma) if want_eps else None)

    def x0(self, x, t, **kw):
        return self.predict(x, t, returns="x0", **kw)[0]

    def eps(self, x, t, **kw):
        return self.predict(x, t, returns="eps", **kw)[1]

    def forward(self, x, t, **kw):
        """x0 at schedule time ``t`` (one time for the batch): ``model(x, t)``.  Not a k-diffusion denoiser, which
        takes per-sample sigmas (sigma/alpha): a sampler calling it so gets a ValueError pointing to
        ``ld3_ext.to_denoiser(model)`` (it read sigma as t, extrapolated past t_max, silently, at batch size 1)."""
        # one read-back: on a GPU only where the output checks read back anyway (a model(x, t) loop stays sync-free
        # with check_output=False)
        if isinstance(t, (np.generic, np.ndarray)):
            t = self._numpy_time(t)
        if isinstance(t, (np.generic, np.ndarray)):  # one number, checked: predict converts it as it does a float
            return self.x0(x, t, **kw)
        if isinstance(t, torch.Tensor) and _real_time_dtype(t) and t.numel() >= 1 \
                and (t.device.type == "cpu" or self._checks_on()) and not (_compiling() or _capturing() or _vmapped(t)):
            _check_call_time(self.schedule, t)  # a half t an ulp past an end passes: predict puts it on that end
        elif isinstance(t, numbers.Real) and not isinstance(t, bool) and not _compiling():
            # the same check for a plain number (let through before; diff review), in Python: no tensor read back
            _check_time_value(self.schedule, float(t), torch.finfo(torch.float64).eps)
        return self.x0(x, t, **kw)

    def _numpy_time(self, t):
        """``forward``'s numpy time (np.float32(80.8) and a 0-d array skipped every check; diff review).  One
        integer or float number is range-checked with its dtype's round-off and returned as it is: predict converts
        it as it converts a float (x's dtype and device).  Anything else becomes the tensor it is, for the tensor
        checks: a bool or complex one refused by predict, several times by the call check, a half one put on the
        range's end it was rounded past (in float16 FlowMatching's 0.9999 is 1.0)."""
        arr = np.asarray(t)
        if arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and arr.dtype != np.float16):
            if arr.size == 1:
                if not _compiling():
                    eps = float(np.finfo(arr.dtype).eps) if arr.dtype.kind == "f" else 0.0
                    _check_time_value(self.schedule, float(arr.reshape(-1)[0]), eps)
                return t
        try:
            return torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError) as exc:  # object arrays, another byte order, a flip
            raise TypeError(f"predict: t must be a number or a tensor (schedule time), got {type(t).__name__} "
                            f"of {arr.dtype} ({str(exc).splitlines()[0]})") from None


def _legacy_prefixes(module: torch.nn.Module) -> List[str]:
    """The prefixes of the DiffusionModels inside ``module`` whose network is their registered ``net``."""
    return [name + "." if name else "" for name, m in module.named_modules(remove_duplicate=False)
            if isinstance(m, DiffusionModel) and m._network_is_net()]


def legacy_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` in the layout of ld3_ext before a DiffusionModel registered its network once: the
    network of every DiffusionModel inside under ``fn.`` as well as ``net.`` (first), in state_dict's order.  The
    weights hashes that key teacher caches, training checkpoints and schedule files are computed over it, so those
    written before stay valid.  Built from ``state_dict()`` itself (its hooks run: FSDP's, a user's), with the
    ``fn.`` copies put before the ``net.`` entries they copy."""
    state = module.state_dict()
    if any("_orig_mod." in k for k in state):
        # a torch.compile wrapper (OptimizedModule) holds its network's weights under "_orig_mod.": the network
        # compiled or not is one model (its teacher cache and checkpoints were refused as "weights_hash" differing)
        state = type(state)((k.replace("_orig_mod.", ""), v) for k, v in state.items())
    # the prefixes in the keys' spelling: a DiffusionModel inside a compiled network sits under "_orig_mod." in
    # named_modules, and its fn. copies were left out (its identity differed from the uncompiled network's)
    queue = sorted(dict.fromkeys(q.replace("_orig_mod.", "") for q in _legacy_prefixes(module)),
                   key=lambda q: q.count("."))
    if not queue:
        return state
    items = list(state.items())
    done = set()
    while queue:
        p = queue.pop(0)
        if p in done:
            continue
        done.add(p)
        net, fn = p + "net.", p + "fn."
        at = next((k for k, (name, _) in enumerate(items) if name.startswith(net)), None)
        if at is not None:
            copies = [(fn + name[len(net):], v) for name, v in items if name.startswith(net)]
            items[at:at] = copies
        # the DiffusionModels inside this network sat under fn. too: their own aliases come next
        queue += sorted({fn + q[len(net):] for q in list(done) + queue if q.startswith(net)} - done,
                        key=lambda q: q.count("."))
    return dict(items)


def legacy_parameter_name(module: torch.nn.Module, name: str) -> str:
    """A ``named_parameters()`` name as the older layout gave it: a parameter shared under fn. and net. was named
    by its first registration, fn."""
    parts, m, out = name.split("."), module, []
    for part in parts[:-1]:
        is_net = isinstance(m, DiffusionModel) and m._network_is_net() and part == "net"
        out.append("fn" if is_net else part)
        m = m._modules.get(part) if isinstance(m, torch.nn.Module) else None
    return ".".join(out + parts[-1:])


def half_time_on_range(schedule: NoiseSchedule, t):
    """A float16/bfloat16 time (or grid) in float64, with values rounded past the schedule's range by up to the half
    dtype's round-off put on that end (tensor ops: no read-back; gradients flow to the other entries); anything else
    as it is.  FlowMatching's t_max 0.999 is 1.0 in bfloat16 (alpha = 0 there), VPCosine's 0.9946 is 0.99609375:
    a solver refused such grids, and predict() evaluated x0 = inf."""
    if not isinstance(t, torch.Tensor) or t.dtype not in _HALF or not isinstance(schedule, NoiseSchedule):
        return t
    lo, hi = schedule.t_min, schedule.t_max
    tol = torch.finfo(t.dtype).eps * max(abs(lo), abs(hi), 1.0)  # times: absolute (t_min may be 0)
    return snap_onto_ends(t, lo, hi, lo - tol, hi + tol)


def snap_onto_ends(v: torch.Tensor, lo: float, hi: float, below: float, above: float) -> torch.Tensor:
    """``v`` in float64 with values in [below, lo) put on lo and in (hi, above] on hi: a round-off past the range
    (the caller's tolerance rule says how far) is the range's end, anything further stays to be refused."""
    v = v.to(torch.float64)
    v = torch.where((v > hi) & (v <= above), torch.full_like(v, hi), v)
    return torch.where((v < lo) & (v >= below), torch.full_like(v, lo), v)


def check_fresh_output(entry: torch.Tensor, read: Sequence[torch.Tensor], step: Optional[int] = None) -> None:
    """ModelOutputError when a network output entering a solver's history lies in the memory of an earlier output
    that is still read (``read``): by the next updates and, when gradients are taken, by the backward, which reads
    every saved output (``outputs_read_later`` says which).

    A network that returns one static buffer (CUDA-graph replay, TensorRT or ONNX Runtime IO binding) overwrites
    the outputs a multistep solver keeps: every history term became the newest output, a silently wrong sample (or
    gradient).  The overwrite has happened by the time the new output arrives, so it can only be refused.  Any
    overlap is refused, written or not: IO binding writes without bumping torch's version counter (and hands back a
    new tensor each call), so "not written since" cannot be known.  Exempt: an expanded output (a stride-0 dimension
    of size > 1: a constant broadcast over the batch), which no runtime writes into.  Byte ranges are compared
    within one allocation: outputs in separate leading-dimension slots of one tensor are fine, and a strided view
    (``out[:, :C]`` of a static buffer) is compared by the span of its elements.  A pointer comparison per entry;
    skipped where there is no storage to compare (compiling, torch.func transforms).  Solvers skip it for a model
    wrapped with ``check_output=False`` (a network returning one constant tensor at batch size 1 is dense and
    overlaps itself: nothing tells it from a static buffer)."""
    if _compiling() or not read:
        return
    try:
        if any(st == 0 and n > 1 for n, st in zip(entry.shape, entry.stride())):
            return  # an expanded (broadcast) output, e.g. a constant: no runtime writes its outputs into one
        ptr = entry.untyped_storage().data_ptr()
        same = [h for h in read if h.untyped_storage().data_ptr() == ptr] if ptr else []
        if not same:
            return
        lo, hi = _byte_span(entry)
        overlapped = any(_overlaps(h, lo, hi) for h in same)
    except (RuntimeError, NotImplementedError, AttributeError):  # wrapped tensors (vmap, grad) have no storage
        return
    if overlapped:
        where = f" at step {step}" if step is not None else ""
        raise ModelOutputError(f"model returned{where} a tensor in the memory of an earlier output, which the solver "
                               "still reads (a static output buffer: CUDA-graph replay, TensorRT/ONNX Runtime IO "
                               "binding): return a copy (out.clone()); a network that returns one constant tensor "
                               "on purpose can be wrapped with check_output=False")


def outputs_read_later(x: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> bool:
    """Will a backward read this solve's network outputs (so a later output may overlap none of them)?  When
    gradients are recorded and the state, the coefficient table or the output requires grad."""
    return torch.is_grad_enabled() and (x.requires_grad or table.requires_grad or out.requires_grad)


class OutputLedger:
    """The network outputs one solve keeps, checked as each arrives (``check_fresh_output``), in one place for
    every solver loop: when a backward will read every output (``outputs_read_later``) the new one may overlap none
    saved so far, else only those the next updates read (``still_read``, the caller's history slice).  ``on``
    False (a model wrapped with ``check_output=False``) admits everything unchecked."""

    __slots__ = ("on", "saved")

    def __init__(self, on: bool, saved: Sequence[torch.Tensor] = ()):
        self.on = on
        self.saved: List[torch.Tensor] = list(saved)  # every output so far, while a backward will read them

    def admit(self, out: torch.Tensor, step: int, x: torch.Tensor, table: torch.Tensor,
              still_read: Sequence[torch.Tensor]) -> None:
        """Refuse ``out`` (the output of evaluation ``step``, read with state ``x`` and coefficient ``table``) if
        it lies in the memory of an output still read; keep it while a backward will read it."""
        if not self.on:
            return
        if outputs_read_later(x, table, out):
            check_fresh_output(out, self.saved, step)
            self.saved.append(out)
        else:
            check_fresh_output(out, still_read, step)


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """[first byte, one past the last byte] that ``t``'s elements occupy (empty for a tensor without elements)."""
    if t.numel() == 0:
        return 0, 0
    lo = t.data_ptr()
    extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return lo, lo + extent * t.element_size()


def _overlaps(h: torch.Tensor, lo: int, hi: int) -> bool:
    a, b = _byte_span(h)
    return a < hi and lo < b


def default_state_dtype(model) -> torch.dtype:
    """The precision a model's solver states take when none is asked for (LD3Trainer, the teacher, gits, the CLI's
    ``--dtype auto``): its weights' dtype; float64 for an analytic test bed (exact denoiser); else float32 (a plain
    function may close over a float32 network we cannot see)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    if getattr(model, "testbed", None) is not None:
        return torch.float64
    return torch.float32


def require_diffusion_model(model, name: str = "model") -> None:
    """TypeError unless ``model`` is a DiffusionModel, saying what it got and how to wrap it."""
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"{name} must be a DiffusionModel, got {type(model).__name__}: wrap your network with "
                        "ld3_ext.wrap_model(fn, schedule, prediction=...) -- prediction='eps', 'x0', 'v' or "
                        "'velocity' for what it returns; a k-diffusion denoiser D(x, sigma) -> x0 is prediction='edm'")


_CALL_TIME_HINT = ("DiffusionModel(x, t) takes one schedule time t for the batch; k-diffusion samplers pass "
                   "per-sample sigmas (sigma/alpha): give them ld3_ext.to_denoiser(model)")


def _check_call_time(schedule: NoiseSchedule, t: torch.Tensor) -> None:
    """DiffusionModel.forward's t: one time, inside the schedule's [t_min, t_max] (one read-back)."""
    hint = _CALL_TIME_HINT
    td = t.detach().to(torch.float64).reshape(-1)
    if td.numel() > 1 and not bool((td == td[0]).all()):
        raise ValueError(f"t holds {td.numel()} different times: {hint}")
    # a half-precision t rounds an end by up to an ulp there (bfloat16 makes FlowMatching's t_max 0.999 a 1.0)
    _check_time_value(schedule, float(td[0]), torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0)


def _real_time_dtype(t: torch.Tensor) -> bool:
    """A floating or integer time (an integer one is read as that number, as predict reads it); bool and complex
    are predict's to refuse."""
    return t.is_floating_point() or not (t.is_complex() or t.dtype == torch.bool)


def _check_time_value(schedule: NoiseSchedule, v: float, eps: float) -> None:
    """``_check_call_time`` on one number, with the round-off ``eps`` of the dtype it came in."""
    lo, hi = schedule.t_min, schedule.t_max
    tol = max(schedule.time_slack(), eps * max(abs(lo), abs(hi), 1.0))
    if not (lo - tol <= v <= hi + tol):  # NaN too
        raise ValueError(f"t={v:.6g} is outside the schedule's times [{lo:.6g}, {hi:.6g}] ({schedule!r}): "
                         f"{_CALL_TIME_HINT}")


def _convert_fused(s: NoiseSchedule, p: str, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, want_x0: bool,
                   want_eps: bool):
    """``DiffusionModel.predict``'s conversion on the native update kernel (``backend="fused"``, a float32/float64
    state): the time gradient's dot products reduce in the kernels' fixed chunks, so they do not change with the
    thread count (torch's sum does, above ~32k elements).  Each step mirrors an op of the plain formulas in
    ``predict`` (the reference, ``backend="reference"``): (x - sigma*eps) first, then the division, so the time
    gradient reads <g, x0> as the reference does -- a*x + b*eps with a = 1/alpha, b = -sigma/alpha in one pass
    would subtract two terms ~1/alpha^2 larger than their difference (0.4 % off in float32 near alpha = 0.007)."""
    from . import fused

    def lin(u, a, w=None, b=None):  # a*u (+ b*w), coefficients 0-d functions of t
        if w is None:
            return fused.multistep_update(u, a.reshape(1).to(torch.float64), [])
        return fused.multistep_update(u, torch.stack([a, b]).to(torch.float64), [w])

    if p == "v":
        alpha, sigma = s.alpha(t), s.sigma(t)
        norm = alpha * alpha + sigma * sigma
        return (lin(lin(x, alpha, out, -sigma), 1.0 / norm) if want_x0 else None), \
            (lin(lin(x, sigma, out, alpha), 1.0 / norm) if want_eps else None)
    one = torch.ones_like(t)  # the coefficient of x in the steps below
    if p == "velocity":  # x_t = (1-t) x0 + t eps, v = eps - x0
        return (lin(x, one, out, -t) if want_x0 else None), (lin(x, one, out, 1.0 - t) if want_eps else None)
    alpha, sigma = s.alpha(t), s.sigma(t)
    if p in ("eps", "score"):
        eps = out if p == "eps" else lin(out, -sigma)
        return (lin(lin(x, one, eps, -sigma), 1.0 / alpha) if want_x0 else None), (eps if want_eps else None)
    # "x0" and "edm": out is x0
    return (out if want_x0 else None), (lin(lin(x, one, out, -alpha), 1.0 / sigma) if want_eps else None)


def _range_note(raw_dtype: torch.dtype, state_dtype: torch.dtype) -> str:
    """Why a finite network output is NaN/Inf in the state: it was cast to a narrower dtype."""
    return (f": its {raw_dtype} output is finite but exceeds the {state_dtype} state's range (largest "
            f"{torch.finfo(state_dtype).max:g}); solve in a wider state dtype")


def _same(v: torch.Tensor) -> torch.Tensor:
    return v


def _cfg_repeat(v: Any, batch: int) -> Any:
    """A kwarg shared by both guidance halves: batched tensors (also inside dicts, lists and tuples, e.g.
    ControlNet's ``down_block_additional_residuals``) repeated to 2*batch; containers keep their type."""
    if isinstance(v, torch.Tensor):
        return torch.cat([v, v]) if v.dim() >= 1 and v.shape[0] == batch else v
    if isinstance(v, dict):
        return {k: _cfg_repeat(x, batch) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        items = [_cfg_repeat(x, batch) for x in v]
        return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)  # a namedtuple takes fields
    return v


def _cfg_pair(u: Any, c: Any, name: str, root: str = "uncond_kwargs") -> Any:
    """[unconditional; conditional] of one kwarg (tensors, or dicts of them with the same keys); errors call
    the unconditional value ``root[name]`` (``uncond_kwargs['added_cond_kwargs.text_embeds']``), or ``root``
    when ``name`` is empty (the guidance condition ``uncond`` itself)."""
    label = f"{root}[{name!r}]" if name else root
    if isinstance(c, torch.Tensor):
        if not isinstance(u, torch.Tensor) or u.shape != c.shape:
            raise ValueError(f"{label} must be a tensor shaped like the conditional value "
                             f"{tuple(c.shape)}, got {tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
        return torch.cat([u, c])
    if isinstance(c, dict):
        if not isinstance(u, dict) or set(u) != set(c):
            raise ValueError(f"{label} must be a dict with the keys {sorted(c)}")
        return {k: _cfg_pair(u[k], c[k], f"{name}.{k}" if name else str(k), root) for k in c}
    raise TypeError(f"{label}: only tensors (or dicts of tensors) can differ between the halves")


def _cfg_batch(v: Any, batch: int, name: str) -> Any:
    """A guidance condition tensor of ``batch`` samples: a batch of 1 expanded to it, another batch refused."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] == batch:
        return v
    if v.shape[0] == 1:
        return v.expand(batch, *v.shape[1:])
    raise ValueError(f"{name} holds a batch of {v.shape[0]} (shape {tuple(v.shape)}) but x a batch of {batch}: give one "
                     "condition per sample, or one for all (a batch of 1)")


def _cfg_cond(u: Any, c: Any, cond_key: str) -> Any:
    """The guidance condition of both halves, [uncond; cond]: tensors and dicts (per key) as :func:`_cfg_pair`,
    lists/tuples (e.g. prompts, one per sample) concatenated in cond's container type."""
    if isinstance(c, (torch.Tensor, dict)):
        return _cfg_pair(u, c, "", "uncond")
    if isinstance(c, (list, tuple)):
        if not isinstance(u, (list, tuple)):
            raise TypeError(f"uncond must be a list/tuple like {cond_key!r}, got {type(u).__name__}")
        if len(u) != len(c):
            raise ValueError(f"uncond must hold {len(c)} entries like {cond_key!r}, got {len(u)}")
        return type(c)([*u, *c]) if type(c) in (list, tuple) else [*u, *c]
    raise TypeError(f"{cond_key!r} (the guidance condition) must be a tensor, a dict of tensors or a list/tuple, "
                    f"got {type(c).__name__}")


def wrap_model(fn: Callable, schedule: NoiseSchedule, prediction: Optional[str] = None, **kwargs) -> DiffusionModel:
    """Wrap a network ``fn(x, time, **kw)`` so that every solver can use it (see :class:`DiffusionModel`);
    ``prediction`` defaults to "eps".  A DiffusionModel is returned as it is, so any setting that would change
    it (another schedule or prediction, any other keyword) is refused rather than silently dropped."""
    if isinstance(fn, DiffusionModel):
        clash = [f"prediction={prediction!r} (it has {fn.prediction!r})"] if prediction not in (None, fn.prediction) \
            else []
        if schedule is not None and (not isinstance(schedule, NoiseSchedule)
                                     or not schedule.same_as(fn.schedule)):
            clash.append(f"schedule={schedule!r} (it has {fn.schedule!r})")
        clash += [f"{k}=..." for k in kwargs]
        if clash:
            raise ValueError(f"wrap_model: fn is already a DiffusionModel, which would be returned unchanged, but "
                             f"{', '.join(clash)} asks for another one: wrap its network (model.fn) instead")
        return fn
    return DiffusionModel(fn, schedule, prediction="eps" if prediction is None else prediction, **kwargs)


__all__ = ["DiffusionModel", "wrap_model", "ModelOutputError", "PREDICTIONS", "TIME_INPUTS"]
