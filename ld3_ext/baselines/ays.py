"""Align Your Steps (Sabour et al. 2024): the published 10-step noise levels and their NFE interpolation.

AYS optimises the sampling schedule per model offline; the authors publish the resulting 10-step
sigma lists (sigma = sigma/alpha, the EDM noise level) for Stable Diffusion 1.5 and SDXL and
recommend, for other step counts, interpolating log sigma linearly over a normalised step index.
Both lists belong to SD's "scaled linear" discrete VP schedule (``VPDiscrete.linear()``,
sigma from 14.6146 down to 0.02917).
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch

from .._checks import count, flag
from ..discretizations import _check
from ..schedules import NoiseSchedule

#: published 10-step (11-value) sigma lists, noisiest first
AYS_SIGMAS = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def loglinear_interp(sigmas, n_points: int) -> np.ndarray:
    """Resample a decreasing sigma list to ``n_points`` values by interpolating log sigma linearly
    over the index normalised to [0, 1] (endpoints kept exactly)."""
    try:
        s = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError):
        s = None
    # inf passed "positive" and came back as two infs
    if s is None or s.ndim != 1 or s.size < 2 or not np.all(np.isfinite(s)) or not np.all(s > 0) \
            or not np.all(np.diff(s) < 0):
        raise ValueError(f"sigmas must be a 1-D, finite, positive, strictly decreasing list, got {sigmas!r}")
    n_points = count("n_points", n_points, 2, type_error=False)  # a float or str reached np.linspace
    if n_points == s.size:
        return s.copy()
    # np.interp needs increasing x: run over the reversed (increasing) list
    xs = np.linspace(0.0, 1.0, s.size)
    new = np.exp(np.interp(np.linspace(0.0, 1.0, n_points), xs, np.log(s[::-1])))[::-1]
    new[0], new[-1] = s[0], s[-1]
    return new


def ays_sigmas(model: str, nfe: int) -> List[float]:
    """The AYS sigma list for ``model`` ("sd15" or "sdxl") with ``nfe`` intervals (nfe + 1 values)."""
    if not isinstance(model, str) or model not in AYS_SIGMAS:  # a list failed as "unhashable type"
        raise ValueError(f"AYS lists exist for {sorted(AYS_SIGMAS)}, got {model!r}")
    count("nfe", nfe, 1, type_error=False)
    return loglinear_interp(AYS_SIGMAS[model], nfe + 1).tolist()


def ays(schedule: NoiseSchedule, nfe: int, model: str = "sd15", fit_range="auto") -> torch.Tensor:
    """AYS timesteps (float64, t_max..t_min, length nfe + 1) on ``schedule``.

    ``fit_range``: the published lists span sigma 14.615..0.029 (SD's range).  With "auto", when the
    schedule's sigma range matches within 2 % at both ends the published inner values are used as they are
    (the list's ends replaced by the schedule's before interpolating, so every value lies in the range);
    otherwise log sigma is mapped affinely onto the schedule's range (True forces that mapping, False never
    maps and errors if the list leaves the range).
    """
    _check(schedule, nfe)
    sig = np.asarray(ays_sigmas(model, nfe))
    tmax = torch.tensor(schedule.t_max, dtype=torch.float64)
    tmin = torch.tensor(schedule.t_min, dtype=torch.float64)
    smax, smin = float(schedule.edm_sigma(tmax)), float(schedule.edm_sigma(tmin))
    p0, p1 = AYS_SIGMAS[model][0], AYS_SIGMAS[model][-1]
    matches = abs(math.log(smax / p0)) < 0.02 and abs(math.log(smin / p1)) < 0.02
    # 1 or numpy's True equal True but are not it: they passed a membership test and then mapped like False
    if not (isinstance(fit_range, str) and fit_range == "auto"):
        try:
            fit_range = flag("fit_range", fit_range)
        except TypeError:
            raise ValueError(f"fit_range must be 'auto', True or False, got {fit_range!r}") from None
    if fit_range is True or (fit_range == "auto" and not matches):
        u = (np.log(sig) - math.log(p1)) / (math.log(p0) - math.log(p1))
        sig = np.exp(math.log(smin) + u * (math.log(smax) - math.log(smin)))
    elif matches:
        # the list's ends are the schedule's (within 2 %): interpolate from the schedule's own ends, so no value
        # lands outside the range -- at large NFE the values next to an end did, past the snapped end, and the
        # grid was refused as non-monotone.  The inner published knots are kept exactly.
        knots = np.asarray(AYS_SIGMAS[model], dtype=np.float64)
        knots[0], knots[-1] = smax, smin
        sig = loglinear_interp(knots, nfe + 1)
    elif sig.size > 2 and (sig[1:-1].max() >= smax or sig[1:-1].min() <= smin):
        raise ValueError(f"AYS {model} sigmas ({p0}..{p1}) leave the schedule's range ({smax:.4g}..{smin:.4g}); "
                         "use fit_range=True")
    t = schedule.t_from_edm_sigma(torch.from_numpy(np.ascontiguousarray(sig)).to(torch.float64))
    t[0], t[-1] = schedule.t_max, schedule.t_min
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"AYS grid is not strictly decreasing on this schedule: {t.tolist()}")
    return t


def ays_sd15(schedule: NoiseSchedule, nfe: int, **kw) -> torch.Tensor:
    return ays(schedule, nfe, model="sd15", **kw)


def ays_sdxl(schedule: NoiseSchedule, nfe: int, **kw) -> torch.Tensor:
    return ays(schedule, nfe, model="sdxl", **kw)


__all__ = ["AYS_SIGMAS", "loglinear_interp", "ays_sigmas", "ays", "ays_sd15", "ays_sdxl"]
