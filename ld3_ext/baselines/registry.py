"""One entry point for every baseline schedule: ``baseline_timesteps(name, schedule, nfe, model=None, **kw)``."""
from __future__ import annotations

import torch

from ..schedules import NoiseSchedule
from .ays import ays
from .dmn import dmn
from .gits import GITS_PRESETS, gits, gits_preset

#: name -> (needs a model?, description)
BASELINES = {
    "dmn": (False, "DMN optimised steps (Xue et al. 2024), model-free; kw: order, space, init, trunc_num"),
    "gits": (True, "GITS dynamic programming on teacher trajectories of `model`; kw: solver, n_samples, "
                   "fine_steps, spacing, seed, sample_shape / x_T"),
    "ays_sd15": (False, "Align Your Steps SD1.5 list, log-linear interpolation to nfe"),
    "ays_sdxl": (False, "Align Your Steps SDXL list, log-linear interpolation to nfe"),
    **{f"gits_{d}": (False, f"published GITS list for {d} (nfe {min(v)}..{max(v)})") for d, v in GITS_PRESETS.items()},
}


def baseline_timesteps(name: str, schedule: NoiseSchedule, nfe: int, model=None, **kw) -> torch.Tensor:
    """Timesteps (float64, t_max..t_min, length nfe + 1) of baseline ``name`` on ``schedule``."""
    if not isinstance(name, str) or name not in BASELINES:  # a list failed as "unhashable type"
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(BASELINES)}")
    needs_model, _ = BASELINES[name]
    if needs_model and model is None:
        raise ValueError(f"baseline {name!r} needs the model (model=...): it searches on the model's own "
                         "teacher trajectories; the published lists are 'gits_<dataset>'")
    if not needs_model and model is not None:
        raise ValueError(f"baseline {name!r} is model-free; do not pass model=")
    if name == "dmn":
        return dmn(schedule, nfe, **kw)
    if name == "gits":
        return gits(model, schedule, nfe, **kw)
    if name.startswith("ays_"):
        return ays(schedule, nfe, model=name[4:], **kw)
    return gits_preset(name[5:], schedule, nfe, **kw)


__all__ = ["BASELINES", "baseline_timesteps"]
