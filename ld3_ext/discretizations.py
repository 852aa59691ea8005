"""Hand-made time grids (the baselines LD3 is compared with), each ``(schedule, nfe) -> timesteps``.

All return a float64 tensor t_0 = t_max > ... > t_N = t_min of length nfe + 1 (N = nfe intervals).
"""
from __future__ import annotations

import torch

from ._checks import count
from .schedules import FlowMatching, NoiseSchedule, _num


def _check(schedule, nfe):
    """The (schedule, nfe) arguments of every hand-made grid and baseline."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    count("nfe", nfe, 1, type_error=False)


def _finite_decreasing(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all()) and bool((t[1:] < t[:-1]).all())


def _finish(schedule, t: torch.Tensor, check: bool = True) -> torch.Tensor:
    t = t.to(torch.float64)
    t[0], t[-1] = schedule.t_max, schedule.t_min  # exact endpoints whatever the round-off
    # a range too narrow for nfe + 1 distinct float64 times (EDM(1, 1 + 1e-13) at nfe 1000) rounded neighbours
    # together: the grid was returned as it was and refused later as a bad "timesteps", far from the cause
    if check and not _finite_decreasing(t):
        raise ValueError(f"nfe={t.numel() - 1} gives a grid that is not finite and strictly decreasing on {schedule!r}: "
                         f"its range [t_min, t_max] holds too few distinct float64 times; use a smaller nfe")
    return t


def _shift(schedule, t):
    """SD3/Flux resolution shift for flow models: t' = s t / (1 + (s - 1) t).

    The shift moves the end points too (s(t_max) > t_max for s > 1, s(t_min) < t_min for s < 1), so the
    shifted grid is mapped affinely back onto [t_min, t_max]: the map stays strictly increasing, the end
    points are exact and no interior point leaves the schedule's range (a plain shift followed by
    overwriting the end points produced out-of-range, non-monotone grids for large N or s < 1).
    """
    if isinstance(schedule, FlowMatching) and schedule.shift != 1.0:
        s = schedule.shift

        def f(u):
            return s * u / (1.0 + (s - 1.0) * u)

        lo, hi = f(schedule.t_min), f(schedule.t_max)
        t = schedule.t_min + (f(t) - lo) * ((schedule.t_max - schedule.t_min) / (hi - lo))
    return t


def time_uniform(schedule: NoiseSchedule, nfe: int) -> torch.Tensor:
    _check(schedule, nfe)
    t = torch.linspace(schedule.t_max, schedule.t_min, nfe + 1, dtype=torch.float64)
    return _finish(schedule, _shift(schedule, t))


def time_quadratic(schedule: NoiseSchedule, nfe: int) -> torch.Tensor:
    """t_i = t_min + (t_max - t_min) ((N - i)/N)^2 (quadratic in the index, as LD3's code)."""
    _check(schedule, nfe)
    u = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * u ** 2
    return _finish(schedule, _shift(schedule, t))


def logsnr_uniform(schedule: NoiseSchedule, nfe: int) -> torch.Tensor:
    """Uniform in lambda = log(alpha/sigma) between the endpoints."""
    _check(schedule, nfe)
    lam = torch.linspace(schedule.lambda_min, schedule.lambda_max, nfe + 1, dtype=torch.float64)
    return _finish(schedule, schedule.inverse_lambda(lam))


def edm(schedule: NoiseSchedule, nfe: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al.'s rho-spacing in the EDM noise level sigma/alpha (for VP schedules too,
    unlike LD3's code, which applies it to t)."""
    _check(schedule, nfe)
    rho = _num("rho", rho)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    tmax = torch.tensor(schedule.t_max, dtype=torch.float64)
    tmin = torch.tensor(schedule.t_min, dtype=torch.float64)
    smax, smin = schedule.edm_sigma(tmax), schedule.edm_sigma(tmin)
    u = torch.linspace(0.0, 1.0, nfe + 1, dtype=torch.float64)
    sig = (smax ** (1.0 / rho) + u * (smin ** (1.0 / rho) - smax ** (1.0 / rho))) ** rho
    t = _finish(schedule, schedule.t_from_edm_sigma(sig), check=False)  # checked below, naming rho
    # a tiny rho overflows sigma^(1/rho) (NaN) and a huge one rounds neighbours together (duplicates)
    if not _finite_decreasing(t):
        raise ValueError(f"rho={rho} gives a grid that is not finite and strictly decreasing for nfe={nfe} "
                         f"on this schedule: {t.tolist()}")
    return t


DISCRETIZATIONS = {
    "time_uniform": time_uniform,
    "time_quadratic": time_quadratic,
    "logsnr": logsnr_uniform,
    "logsnr_uniform": logsnr_uniform,
    "edm": edm,
}


def get_discretization(name: str, schedule: NoiseSchedule, nfe: int) -> torch.Tensor:
    if not isinstance(name, str) or name not in DISCRETIZATIONS:  # a list/dict would fail as "unhashable type"
        raise ValueError(f"discretization must be one of {sorted(DISCRETIZATIONS)}, got {name!r}")
    return DISCRETIZATIONS[name](schedule, nfe)


__all__ = ["time_uniform", "time_quadratic", "logsnr_uniform", "edm", "get_discretization", "DISCRETIZATIONS"]
