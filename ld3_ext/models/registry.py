"""Resolve a ``--model`` string to ``(DiffusionModel, NoiseSchedule)``.

Accepted forms:
  * ``gmm:ring2d`` / ``gmm:digits64`` / ``gmm:random3072`` (or the bare names) -- analytic Gaussian
    mixtures with their exact denoiser on an EDM schedule (``gmm:NAME@vp_linear`` etc. picks another);
  * ``digits`` -- the small pretrained denoiser on sklearn's 8x8 digits shipped with the package;
  * ``diffusers:PATH`` -- a local diffusers folder (UNet + scheduler config), no network;
  * ``package.module:factory`` -- any importable factory returning ``(model, schedule)``; a module in the
    working folder is found as ``python -m`` would find it, also from the ``ld3`` console script.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Tuple

from ..schedules import EDM, FlowMatching, NoiseSchedule, VPCosine, VPLinear
from ..wrappers import DiffusionModel

GMM_SCHEDULES = {"edm": EDM, "vp_linear": VPLinear, "vp_cosine": VPCosine, "flow": FlowMatching}


class ModelSpecError(ValueError):
    """The --model string cannot be resolved."""


def _gmm(name: str):
    from ..testbeds import MIXTURES, get_mixture

    mix_name, _, sched_name = name.partition("@")
    if mix_name not in MIXTURES:
        raise ModelSpecError(f"--model: unknown mixture {mix_name!r}; built-ins are "
                             f"{', '.join('gmm:' + k for k in sorted(MIXTURES))}")
    sched_name = sched_name or "edm"
    if sched_name not in GMM_SCHEDULES:
        raise ModelSpecError(f"--model: unknown schedule {sched_name!r} after '@'; expected one of {sorted(GMM_SCHEDULES)}")
    mix = get_mixture(mix_name)
    schedule = GMM_SCHEDULES[sched_name]()
    model = mix.model(schedule)
    model.testbed = mix  # gives callers the exact teacher (mix.reference_solution)
    return model, schedule


def canonical_spec(spec: str) -> str:
    """The one spelling of a model string (what schedule files and caches record): a bare mixture name
    (``ring2d``, ``ring2d@vp_linear``) is ``gmm:NAME``, and the default noise schedule is not spelled
    (``gmm:ring2d@edm`` and ``gmm:ring2d@`` are ``gmm:ring2d``); ``diffusers:PATH`` gets an absolute PATH (a
    schedule file records it: ``ld3 eval`` must find the model from any folder); any other string is returned
    as it is."""
    from ..testbeds import MIXTURES
    if isinstance(spec, str) and spec.startswith("diffusers:") and len(spec) > len("diffusers:"):
        return "diffusers:" + os.path.abspath(os.path.expanduser(spec[len("diffusers:"):]))
    if isinstance(spec, str) and spec.split("@")[0] in MIXTURES:
        spec = "gmm:" + spec
    if isinstance(spec, str) and spec.startswith("gmm:") and spec.partition("@")[2] in ("", "edm"):
        return spec.partition("@")[0]  # one model, one name: else a schedule warns it was learned for another
    return spec


def is_builtin(spec: str) -> bool:
    """A model shipped with the package (the digits denoiser, the Gaussian-mixture test beds)."""
    spec = canonical_spec(spec)
    return isinstance(spec, str) and (spec == "digits" or spec.startswith("gmm:"))


def _import_factory_module(mod_name: str):
    """``import mod_name``; failing that, from the working folder when it holds the module: the ``ld3`` console
    script's sys.path starts at its own bin folder, not at the folder it runs in (as ``python -m`` does)."""
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        cwd, top = os.getcwd(), mod_name.split(".")[0]
        here = os.path.isfile(os.path.join(cwd, top + ".py")) or os.path.isdir(os.path.join(cwd, top))
        if exc.name != top or not here or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)  # appended: never shadows an installed package
        return importlib.import_module(mod_name)


def load_model(spec: str, device: str = "cpu", guidance_scale=None) -> Tuple[DiffusionModel, NoiseSchedule]:
    """``(model, schedule)`` for a model string (see the module docstring; bare mixture names as ``gmm:NAME``)."""
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(f"--model must be a non-empty string, got {spec!r}")
    spec = canonical_spec(spec)
    if guidance_scale is not None and is_builtin(spec):
        raise ModelSpecError(f"--guidance-scale: the built-in model {spec!r} is unconditional")
    if spec.startswith("gmm:"):
        return _gmm(spec[4:])
    if spec == "digits":
        from .digits import load_digits_model
        model, schedule = load_digits_model(device=device)
        model.sample_shape = (1, 8, 8)
        return model, schedule
    if spec.startswith("diffusers:"):
        from ..integrations.diffusers import load_diffusers_model
        try:
            return load_diffusers_model(spec[len("diffusers:"):], device=device, guidance_scale=guidance_scale)
        except (FileNotFoundError, NotADirectoryError) as exc:  # a mistyped folder is a flag mistake: name it
            raise ModelSpecError(f"--model {spec!r}: {exc}") from exc
    if ":" not in spec:
        raise ModelSpecError(f"--model {spec!r}: expected a built-in name (digits, gmm:ring2d, gmm:digits64, "
                             "gmm:random3072), diffusers:PATH or package.module:factory")
    mod_name, _, attr = spec.partition(":")
    try:
        mod = _import_factory_module(mod_name)
    except Exception as exc:
        raise ModelSpecError(f"--model {spec!r}: cannot import module {mod_name!r}: {exc}") from exc
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"--model {spec!r}: module {mod_name!r} has no callable {attr!r}")
    if guidance_scale is not None:
        raise ModelSpecError("--guidance-scale applies to diffusers models only; set it in your factory instead")
    try:
        out = factory()
    except Exception as exc:  # the factory's own failure: one line naming it (LD3_TRACEBACK=1 shows the rest)
        raise ModelSpecError(f"--model {spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], DiffusionModel)
            and isinstance(out[1], NoiseSchedule)):
        raise ModelSpecError(f"--model {spec!r}: the factory must return (DiffusionModel, NoiseSchedule) -- wrap "
                             f"your network with ld3_ext.wrap_model; got {type(out).__name__}")
    # every command draws noise of this shape (sample, the teacher, eval): said here, before any work
    shape = getattr(out[0], "sample_shape", None)
    if getattr(out[0], "testbed", None) is None and not (isinstance(shape, (tuple, list)) and shape
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ModelSpecError(f"--model {spec!r}: the factory's model must say the shape of one sample: set "
                             f"`model.sample_shape = (C, H, W)` before returning it (got {shape!r})")
    return out
