"""LD3's parameterisation of the time grid (LD3.md 1.2): logits xi -> timesteps, xi^c -> model times.

Work in a coordinate ``y`` that increases along the sampling direction:

* ``time_mode="lambda"``: y = lambda(t) (half log-SNR); uniform gaps give the logSNR grid;
* ``time_mode="time"``:   y = -t; uniform gaps give the time-uniform grid.

Neither is better everywhere (the gaps, and the decoupling window below, are measured in different units, so
the same optimiser takes different paths): ``LD3Trainer(time_mode="auto")``, its default, trains in both and
keeps the one with the lower loss on its validation pairs.

The N interval lengths are fractions of the fixed span y(t_min) - y(t_max):

    g = softmax(xi[1:]) * (1 - N*floor) + floor,    y_k = y_0 + span * sum_{j<=k} g_j,

which is the original's cumsum-of-softmax rescaled to the endpoints, written in a form that makes the
inert logit explicit: in the original, xi_0 only enters c_0 and the normalisation cancels it, so its
gradient is zero.  We keep xi of length N+1, as the original does, and leave xi_0 exactly inert.  The
logits are not interchangeable with the original's in time mode: there its first gap comes from xi_N
(reverse xi[1:] and negate xi^c to convert); in lambda mode they agree.  The small ``floor`` on each fraction guarantees a strictly decreasing grid whatever
the logits are (softmax entries can underflow to 0 with large learning rates).

Decoupled model times (LD3 Sec. 4.3): y~_k = y_k + clamp(xi^c_k, -m, m) for 0 < k < N (the endpoints
never move), with the window m = win_rate * min_k (y_{k+1} - y_k), detached.  **We deliberately
differ from the original code in lambda mode**: it computed m from differences of the raw logits xi
(which is 0 at its all-ones initialisation and has no unit), whereas we take it on the lambda gaps,
so the shift is bounded by half the smallest lambda step and xi^c is measured in lambda units.  With
win_rate <= 0.5 the shifted times never cross.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

from .._checks import flag, real

from .. import discretizations
from ..schedules import NoiseSchedule

TIME_MODES = ("lambda", "time")
InitSpec = Union[str, torch.Tensor, Sequence[float]]


def _endpoints(schedule: NoiseSchedule) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(schedule.t_max, dtype=torch.float64), torch.tensor(schedule.t_min, dtype=torch.float64))


_GRID = "a grid of timesteps (a list or tensor of numbers)"


def _time_grid(value, name: str, expected: str) -> torch.Tensor:
    """``value`` as a 1-D float64 CPU tensor of its own, or an error naming ``name``: torch's message for None, a
    dict or strings ("must be real number, not NoneType") named no argument, and a [1, N+1] or [2, k] table was
    flattened silently (LearnedSchedule refuses it alike)."""
    try:
        t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().clone()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}") from None
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (a grid of times), got shape {tuple(t.shape)}")
    return t


def init_timesteps(schedule: NoiseSchedule, num_steps: int, init: InitSpec) -> torch.Tensor:
    """The float64 grid an initialisation names: a discretization name or an explicit list."""
    if isinstance(init, str):
        name = init.lower().replace("-", "_")
        aliases = {"uniform": "time_uniform", "time": "time_uniform", "quadratic": "time_quadratic",
                   "logsnr_uniform": "logsnr", "lambda": "logsnr"}
        name = aliases.get(name, name)
        if name not in discretizations.DISCRETIZATIONS:
            raise ValueError(f"init must be one of {sorted(discretizations.DISCRETIZATIONS)} or a list of "
                             f"timesteps, got {init!r}")
        return discretizations.get_discretization(name, schedule, num_steps)
    t = _time_grid(init, "init", "a discretization name or " + _GRID)
    if t.numel() != num_steps + 1:
        raise ValueError(f"init: a list of timesteps for {num_steps} steps needs {num_steps + 1} values "
                         f"(t_max first, t_min last), got {t.numel()}")
    return t


class NonFiniteParameterError(FloatingPointError):
    """The learned logits xi or model-time shifts xi_c hold a NaN/Inf (a diverged optimiser step): the trainer
    saves the last good schedule and raises NonFiniteLossError, as for a non-finite loss."""


class TimeParameterization(torch.nn.Module):
    """Learnable grid: ``forward() -> (timesteps, model_timesteps)``, float64, t_0 = t_max > ... > t_N = t_min.

    Parameters
    ----------
    schedule : the model's noise schedule (gives the fixed endpoints and lambda).
    num_steps : N, the number of grid intervals.
    time_mode : "lambda" (gaps in lambda) or "time" (gaps in t).
    init : "logsnr", "time_uniform", "time_quadratic", "edm", or an explicit grid of N+1 times; xi is set
        so that the grid is reproduced exactly (to float64 round-off).
    decoupled : learn the network-time shifts xi^c (else model_timesteps == timesteps).
    win_rate : the shift window as a fraction of the smallest gap, in (0, 0.5].
    min_gap_fraction : floor on each gap as a fraction of the whole span (strict monotonicity).
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int, time_mode: str = "lambda",
                 init: InitSpec = "logsnr", decoupled: bool = True, win_rate: float = 0.5,
                 min_gap_fraction: float = 1e-9):
        super().__init__()
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if time_mode not in TIME_MODES:
            raise ValueError(f"time_mode must be one of {TIME_MODES}, got {time_mode!r}")
        win_rate = real("win_rate", win_rate)  # a string "0.3" went through float()
        if not (0.0 < win_rate <= 0.5):
            raise ValueError(f"win_rate must be in (0, 0.5] so that shifted model times keep their order, "
                             f"got {win_rate}")
        min_gap_fraction = real("min_gap_fraction", min_gap_fraction)  # "1e-9" failed in the comparison below
        if not (0.0 <= min_gap_fraction < 1.0 / (2 * num_steps)):
            raise ValueError(f"min_gap_fraction must be in [0, 1/(2N)), got {min_gap_fraction}")
        self.schedule = schedule
        self.num_steps = num_steps
        self.time_mode = time_mode
        self.decoupled = flag("decoupled", decoupled)  # bool("no") is True
        self.win_rate = float(win_rate)
        self.floor = float(min_gap_fraction)
        t_max, t_min = _endpoints(schedule)
        self.register_buffer("_y0", self._coord(t_max).detach().clone(), persistent=False)
        self.register_buffer("_y1", self._coord(t_min).detach().clone(), persistent=False)
        self.xi = torch.nn.Parameter(torch.zeros(num_steps + 1, dtype=torch.float64))
        self.xi_c = torch.nn.Parameter(torch.zeros(num_steps + 1, dtype=torch.float64))
        self.init_spec = init if isinstance(init, str) else "timesteps"
        self.set_timesteps(init_timesteps(schedule, num_steps, init))

    # --- coordinate maps ---------------------------------------------------------------------
    def _coord(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.lambda_(t) if self.time_mode == "lambda" else -t

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.schedule.inverse_lambda(y) if self.time_mode == "lambda" else -y

    def _with_endpoints(self, t: torch.Tensor) -> torch.Tensor:
        # exact endpoints whatever the round-off of the inverse map; they carry no gradient anyway
        t_max, t_min = _endpoints(self.schedule)
        return torch.cat([t_max.to(t).reshape(1), t[1:-1], t_min.to(t).reshape(1)])

    # --- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def set_timesteps(self, timesteps) -> None:
        """Set xi (and zero xi^c) so that ``forward()`` reproduces ``timesteps``."""
        t = _time_grid(timesteps, "timesteps", _GRID)
        n = self.num_steps
        if t.numel() != n + 1:
            raise ValueError(f"timesteps must hold {n + 1} values, got {t.numel()}")
        if not torch.isfinite(t).all():
            raise ValueError("timesteps contain NaN/Inf")
        t_max, t_min = _endpoints(self.schedule)
        tol = self.schedule.time_slack()
        if abs(float(t[0] - t_max)) > tol or abs(float(t[-1] - t_min)) > tol:
            raise ValueError(f"timesteps must start at t_max={float(t_max):.6g} and end at t_min={float(t_min):.6g} "
                             f"(the endpoints are fixed), got {float(t[0]):.6g} ... {float(t[-1]):.6g}")
        if not (t[1:] < t[:-1]).all():
            raise ValueError(f"timesteps must be strictly decreasing, got {t.tolist()}")
        y = self._coord(self._with_endpoints(t))
        frac = (y[1:] - y[:-1]) / (self._y1 - self._y0)
        if not (frac > self.floor).all():
            raise ValueError(f"timesteps have a gap below min_gap_fraction={self.floor:g} of the span in "
                             f"{self.time_mode} units; lower min_gap_fraction")
        soft = (frac - self.floor) / (1.0 - n * self.floor)
        self.xi.zero_()
        self.xi[1:] = torch.log(soft)
        self.xi_c.zero_()

    # --- forward -----------------------------------------------------------------------------
    def coordinates(self) -> torch.Tensor:
        """y_0..y_N (differentiable in xi)."""
        if not torch.isfinite(self.xi).all():
            raise NonFiniteParameterError("the logits xi are not finite")
        n = self.num_steps
        g = torch.softmax(self.xi[1:], dim=0) * (1.0 - n * self.floor) + self.floor
        span = self._y1 - self._y0
        inner = self._y0 + span * torch.cumsum(g, 0)[:-1]
        return torch.cat([self._y0.reshape(1), inner, self._y1.reshape(1)])

    def window(self, y: torch.Tensor) -> torch.Tensor:
        """m = win_rate * smallest gap, in y units, detached (no gradient through the clamp bounds)."""
        return (self.win_rate * (y[1:] - y[:-1]).min()).detach()

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor]:
        y = self.coordinates()
        t = self._with_endpoints(self._inverse(y))
        if not self.decoupled:
            return t, t
        # clamp keeps a NaN: a NaN model time reached the solver.  The end entries are masked (never read)
        if not torch.isfinite(self.xi_c[1:-1]).all():
            raise NonFiniteParameterError("the model-time shifts xi_c are not finite")
        m = self.window(y)
        shift = torch.clamp(self.xi_c, -m, m)
        mask = torch.ones_like(shift, dtype=torch.bool)
        mask[0] = False
        mask[-1] = False
        # where, not a product with a 0/1 mask: a NaN end entry (never read) gave NaN * 0 = NaN there
        tm = self._with_endpoints(self._inverse(y + torch.where(mask, shift, torch.zeros_like(shift))))
        return t, tm

    def timesteps(self) -> torch.Tensor:
        return self.forward()[0]

    def extra_repr(self) -> str:
        return (f"num_steps={self.num_steps}, time_mode={self.time_mode!r}, decoupled={self.decoupled}, "
                f"win_rate={self.win_rate}")


__all__ = ["TimeParameterization", "NonFiniteParameterError", "init_timesteps", "TIME_MODES"]
