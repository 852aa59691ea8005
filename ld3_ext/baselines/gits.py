"""GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling").

GITS observes that sampling trajectories of one model are very similar to each other, so a time
schedule found on a handful of trajectories transfers to all.  The search:

1. choose a fine candidate grid g_0 = t_max > g_1 > ... > g_M = t_min (EDM rho = 7 spacing by
   default, as GITS; "logsnr" and "time" are options);
2. integrate a small batch of teacher trajectories accurately along it, keeping the state X_k at
   every g_k;
3. cost(i -> j) of ONE coarse solver step from (X_i, g_i) to g_j: by default (``metric="dev"``, the
   cost GITS ships as its default and recommends) the batch mean of the step's end's distance from the
   trajectory's chord X_0 -> X_M, less the teacher state X_j's own; with ``metric="l2"`` the batch mean
   of its RMSE against X_j (the local error of jumping from i to j);
4. dynamic programming: the path 0 = p_0 < p_1 < ... < p_N = M with exactly N = nfe jumps and the
   least weighted cost sum_k coeff^k cost(p_k -> p_{k+1}); GITS' coeff (1.15 here) > 1 favours a
   large first jump, where the trajectory is straight and errors are later contracted.

Measured on the built-in digits model with the "l2" cost (NFE 5, 512 noises, teacher UniPC(3) 20 logSNR
steps), with Euler sampling GITS cut teacher-RMSE to 0.113 from 0.186 (logSNR) / 0.181 (EDM rho=7); under
DPM-Solver++(3M) the Euler-tuned search was worse than EDM rho=7 (0.138 vs 0.103).  With the "dev" cost
(README, "LD3 vs baselines") DPM-Solver++(3M) at NFE 5 reaches 0.0572 on 256 held-out noises.

The coarse step is ``solver`` on the one-interval grid [g_i, g_j]; multistep solvers take their
first-order step there (history does not fit a pairwise cost), so Euler (= DDIM = DPM-Solver++(1))
is the natural choice, as in the paper.  ``GITS_PRESETS`` holds the published GITS lists that LD3
compares with (EDM sigma units; LD3.md section 4).
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import math
import numbers

import numpy as np
import torch

from .._checks import count, real, seed as check_seed
from .._finite import all_finite
from ..discretizations import _check
from ..schedules import NoiseSchedule
from ..solvers import as_solver
from ..wrappers import DiffusionModel, ModelOutputError, default_state_dtype, wrap_model

# σ lists (sigma/alpha, noisiest first) keyed by dataset then nfe, as listed in LD3.md section 4
GITS_PRESETS: Dict[str, Dict[int, List[float]]] = {
    "cifar10": {
        4: [80, 5.1092, 1.584, 0.47, 0.002],
        5: [80, 5.8389, 2.1632, 0.8119, 0.2107, 0.002],
        6: [80, 9.7232, 3.3686, 1.3482, 0.5666, 0.1698, 0.002],
        7: [80, 10.9836, 3.8811, 1.8543, 0.8119, 0.3183, 0.1079, 0.002],
        8: [80, 10.9836, 3.8811, 1.8543, 0.9654, 0.47, 0.2107, 0.0665, 0.002],
        9: [80, 12.3816, 4.459, 2.1632, 1.1431, 0.5666, 0.2597, 0.1079, 0.03, 0.002],
        10: [80, 13.9293, 5.1092, 2.5152, 1.3482, 0.6799, 0.3183, 0.1698, 0.0665, 0.0225, 0.002],
    },
    "ffhq": {
        4: [80, 7.5699, 2.1632, 0.5666, 0.002],
        5: [80, 9.7232, 2.9152, 0.9654, 0.2597, 0.002],
        6: [80, 10.9836, 3.8811, 1.584, 0.5666, 0.1698, 0.002],
        7: [80, 12.3816, 4.459, 1.8543, 0.8119, 0.3183, 0.1079, 0.002],
        8: [80, 12.3816, 5.1092, 2.1632, 0.9654, 0.47, 0.2107, 0.0665, 0.002],
        9: [80, 13.9293, 5.8389, 2.9152, 1.3482, 0.6799, 0.3183, 0.1359, 0.0515, 0.002],
        10: [80, 13.9293, 5.8389, 2.9152, 1.584, 0.8119, 0.3878, 0.2107, 0.0851, 0.03, 0.002],
    },
    "afhqv2": {
        4: [80, 7.5699, 2.1632, 0.3878, 0.002],
        5: [80, 8.5888, 2.9152, 0.9654, 0.2107, 0.002],
        6: [80, 9.7232, 3.8811, 1.584, 0.47, 0.1359, 0.002],
        7: [80, 10.9836, 4.459, 1.8543, 0.6799, 0.2597, 0.0851, 0.002],
        8: [80, 12.3816, 5.1092, 2.5152, 1.1431, 0.47, 0.2107, 0.0665, 0.002],
        9: [80, 13.9293, 5.8389, 2.9152, 1.3482, 0.6799, 0.3183, 0.1359, 0.0515, 0.002],
        10: [80, 13.9293, 5.8389, 2.9152, 1.584, 0.8119, 0.3878, 0.2107, 0.1079, 0.0395, 0.002],
    },
    "lsun": {
        4: [83.8225, 2.1307, 0.9556, 0.425, 0.0388],
        5: [83.8225, 2.4793, 1.1629, 0.5745, 0.2411, 0.0388],
        6: [83.8225, 2.4793, 1.2928, 0.7324, 0.3678, 0.1578, 0.0388],
        7: [83.8225, 2.9282, 1.4464, 0.8717, 0.4929, 0.2586, 0.109, 0.0388],
        8: [83.8225, 3.5196, 1.854, 1.1629, 0.7324, 0.425, 0.2249, 0.1009, 0.0388],
        9: [83.8225, 3.5196, 1.854, 1.1629, 0.7324, 0.4574, 0.2773, 0.1578, 0.0731, 0.0388],
        10: [83.8225, 4.3198, 2.1307, 1.2928, 0.8717, 0.5745, 0.3678, 0.2411, 0.1365, 0.0672, 0.0388],
    },
    "sd": {
        3: [14.6146, 1.7083, 0.532, 0.0292],
        4: [14.6146, 3.1131, 1.0421, 0.3811, 0.0292],
        5: [14.6146, 4.39, 1.5286, 0.6526, 0.2667, 0.0292],
        6: [14.6146, 4.7242, 1.9132, 0.9324, 0.4557, 0.1801, 0.0292],
        7: [14.6146, 6.4477, 2.2797, 1.1629, 0.6114, 0.3058, 0.1258, 0.0292],
        8: [14.6146, 6.4477, 2.7391, 1.4467, 0.8319, 0.4936, 0.2667, 0.1258, 0.0292],
        9: [14.6146, 6.4477, 3.3251, 1.9132, 1.1629, 0.7391, 0.4557, 0.2667, 0.1258, 0.0292],
        10: [14.6146, 5.9489, 3.3251, 2.0267, 1.2969, 0.8319, 0.5712, 0.3811, 0.2255, 0.1258, 0.0292],
        11: [14.6146, 6.4477, 3.8092, 2.2797, 1.5286, 1.0421, 0.7391, 0.4936, 0.3437, 0.2255, 0.1258, 0.0292],
    },
}




def gits_preset(dataset: str, schedule: NoiseSchedule, nfe: int, tol: float = 0.02) -> torch.Tensor:
    """A published GITS list as timesteps on ``schedule`` via t = schedule.t_from_edm_sigma(sigma).

    The list's end noise levels must match the schedule's within ``tol`` (relative, in sigma); they are
    then snapped to t_max / t_min exactly (the lists are rounded to 4 decimals).
    """
    _check(schedule, nfe)
    tol = real("tol", tol, at_least=0)
    if not isinstance(dataset, str) or dataset not in GITS_PRESETS:  # a list failed as "unhashable type"
        raise ValueError(f"GITS presets exist for {sorted(GITS_PRESETS)}, got {dataset!r}")
    table = GITS_PRESETS[dataset]
    if nfe not in table:
        raise ValueError(f"GITS preset {dataset!r} has NFE {sorted(table)}, not {nfe}")
    sig = torch.tensor(table[nfe], dtype=torch.float64)
    smax = float(schedule.edm_sigma(torch.tensor(schedule.t_max, dtype=torch.float64)))
    smin = float(schedule.edm_sigma(torch.tensor(schedule.t_min, dtype=torch.float64)))
    if abs(math.log(float(sig[0]) / smax)) > tol or abs(math.log(float(sig[-1]) / smin)) > tol:
        raise ValueError(f"GITS preset {dataset!r} spans sigma {float(sig[0])}..{float(sig[-1])}, but the schedule "
                         f"spans {smax:.6g}..{smin:.6g}: it was made for another schedule")
    t = schedule.t_from_edm_sigma(sig)
    t[0], t[-1] = schedule.t_max, schedule.t_min
    # a list whose ends lie just outside the range (within tol) can put an inner value past a snapped end
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"GITS preset {dataset!r} is not strictly decreasing on this schedule once its ends are "
                         f"snapped to t_max/t_min: {t.tolist()} (it was made for another schedule)")
    return t


# ------------------------------------------------------------------------------------------------
def fine_grid(schedule: NoiseSchedule, fine_steps: int, spacing: str = "logsnr") -> torch.Tensor:
    """The candidate grid (float64, t_max..t_min, fine_steps + 1 points)."""
    from .. import discretizations as disc

    if spacing in ("logsnr", "lambda"):
        return disc.logsnr_uniform(schedule, fine_steps)
    if spacing == "edm":
        return disc.edm(schedule, fine_steps)
    if spacing == "time":
        return disc.time_uniform(schedule, fine_steps)
    raise ValueError(f"spacing must be 'logsnr', 'edm' or 'time', got {spacing!r}")


@torch.no_grad()
def teacher_states(model: DiffusionModel, x_T: torch.Tensor, grid: torch.Tensor, teacher_solver=None,
                   substeps: int = 4, model_kwargs: Optional[Dict[str, Any]] = None) -> List[torch.Tensor]:
    """States of the accurate trajectory at every grid point (grid[0] state is x_T).

    Each fine interval is refined into ``substeps`` log-SNR-uniform sub-intervals and integrated by
    ``teacher_solver`` (default DPM-Solver++(2M)); restarting the multistep history per interval costs
    little accuracy at this resolution and keeps the states exactly on the grid.  ``model_kwargs`` go to every
    network call (a conditional model's per-sample conditions, one per row of ``x_T``).
    """
    from ..solvers import DPMSolverPP

    solver = as_solver(teacher_solver, name="teacher_solver") or DPMSolverPP(order=2)
    s = model.schedule
    states = [x_T]
    x = x_T
    for k in range(grid.numel() - 1):
        lam = torch.linspace(float(s.lambda_(grid[k])), float(s.lambda_(grid[k + 1])), substeps + 1,
                             dtype=torch.float64)
        sub = s.inverse_lambda(lam)
        sub[0], sub[-1] = grid[k], grid[k + 1]
        x = solver.sample(model, x, sub, **(model_kwargs or {}))
        states.append(x)
    return states


GITS_METRICS = ("dev", "l2")


def line_deviation(points: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Per sample, the distance of ``points`` from the straight line through ``start`` and ``end`` (all
    [B, ...]): GITS' measure of how far a state strays from the trajectory's chord, whose small size is the
    "trajectory regularity" the method rests on.  A sample whose start and end coincide measures the distance
    to that point."""
    for name, v in (("points", points), ("start", start), ("end", end)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            got = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else type(v).__name__
            raise TypeError(f"line_deviation: {name} must be a real floating tensor [B, ...], got {got}")
        if v.dim() < 1 or v.shape != points.shape:
            raise ValueError(f"line_deviation: {name} must have the shape of points [B, ...] ({tuple(points.shape)}), "
                             f"got {tuple(v.shape)}")
    # [B] (scalar samples) too, empty or not: flatten(1) of a 1-D tensor raised an IndexError naming no argument
    rows = (lambda v: v.unsqueeze(1)) if points.dim() == 1 else (lambda v: v.flatten(1))
    a = rows(end - points)
    d = rows(end - start)
    norm = d.norm(dim=1, keepdim=True)
    u = torch.where(norm > 0, d / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(d))
    return (a - (a * u).sum(dim=1, keepdim=True) * u).norm(dim=1)


def _check_metric(metric) -> str:
    if not isinstance(metric, str) or metric not in GITS_METRICS:
        raise ValueError(f"metric must be one of {GITS_METRICS} ('dev': GITS' default, the deviation from the "
                         f"trajectory's chord; 'l2': the per-sample error against the teacher state), got {metric!r}")
    return metric


@torch.no_grad()
def gits_cost_matrix(model: DiffusionModel, grid: torch.Tensor, states: List[torch.Tensor], solver=None,
                     max_jump: Optional[int] = None, metric: str = "dev",
                     model_kwargs: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """cost[i, j] (i < j) of one ``solver`` step from (states[i], grid[i]) to grid[j]; +inf elsewhere.

    ``metric="dev"`` (GITS' default): the batch mean of the step's end's :func:`line_deviation` from the chord
    states[0] -> states[-1], less the teacher state's own (states[j]); ``"l2"``: the mean per-sample RMSE against
    states[j].  One network call per i (the prediction at (X_i, g_i) is shared by every jump that starts there;
    ``model_kwargs`` go to it)."""
    return _cost_matrix(model, grid, states, solver, max_jump, metric=_check_metric(metric),
                        model_kwargs=_check_model_kwargs(model_kwargs))


@torch.no_grad()
def _cost_matrix(model, grid, states, solver=None, max_jump=None, x0_start=None, metric="dev",
                 model_kwargs=None) -> np.ndarray:
    # x0_start: the prediction at (states[0], grid[0]) when the caller already has it; no_grad here, not only in
    # gits_cost_matrix: gits() calls this directly, and a network with trainable weights built a graph per call
    from ..solvers import Euler
    from ..metrics import teacher_rmse

    solver = as_solver(solver) or Euler()
    if solver.nfe(1) != 1:
        # the cached stand-in answers every call with the prediction at (x_i, g_i): a solver that evaluates
        # the network twice a step (Heun) would get it back at its predictor point and score Euler steps
        raise ValueError(f"solver: GITS scores one-evaluation steps; {type(solver).__name__} makes {solver.nfe(1)} "
                         "network calls a step (use a one-evaluation solver, e.g. Euler or DPMSolverPP(order=1))")
    s = model.schedule
    m = grid.numel() - 1
    # int() would truncate 2.7 to 2 and search a smaller graph than asked, silently
    max_jump = m if max_jump is None else count("max_jump", max_jump, 1)
    cost = np.full((m + 1, m + 1), np.inf)
    if metric == "dev":
        start, end = states[0], states[-1]
        teacher_dev = [float(line_deviation(x, start, end).mean()) for x in states]
    for i in range(m):
        x_i = states[i]
        x0_i = x0_start if i == 0 and x0_start is not None else model.x0(x_i, grid[i], **(model_kwargs or {}))
        # a stand-in model that replays the real prediction made at (x_i, g_i): the coarse step only
        # evaluates there, so this is exact and saves (M - i - 1) network calls
        cached = wrap_model(lambda x, t, _x0=x0_i: _x0, s, prediction="x0", time_input="t", check_output=False)
        for j in range(i + 1, min(m, i + max_jump) + 1):
            x_j = solver.sample(cached, x_i, torch.stack([grid[i], grid[j]]))
            if metric == "dev":
                cost[i, j] = float(line_deviation(x_j, start, end).mean()) - teacher_dev[j]
            else:
                cost[i, j] = float(teacher_rmse(x_j, states[j]).mean())
    return cost


def gits_dp(cost: np.ndarray, nfe: int, coeff: float = 1.0) -> List[int]:
    """Indices 0 = p_0 < ... < p_nfe = M minimising sum_k coeff^k cost[p_k, p_{k+1}] (exactly nfe jumps).

    ``coeff`` > 1 weighs later jumps (closer to the data) more, as in GITS, whose recursion is
    V(i, k) = cost(i -> j) + coeff * V(j, k - 1); coeff = 1 is the plain least-total-cost path.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square matrix, got shape {cost.shape}")
    m = cost.shape[0] - 1
    count(f"nfe (the fine grid has {m} intervals)", nfe, 1, m, type_error=False)
    coeff = real("coeff", coeff, above=0)
    if np.isnan(cost).any():
        raise ValueError("cost contains NaN (use +inf for jumps that are not allowed)")
    # backward recursion: togo[k, i] = least weighted cost from i to M in exactly k jumps, where the
    # first of those k jumps has weight 1 and the rest are scaled by coeff (GITS' recursion)
    togo = np.full((nfe + 1, m + 1), np.inf)
    nxt = np.zeros((nfe + 1, m + 1), dtype=np.int64)
    togo[0, m] = 0.0
    # only forward jumps (j > i): a finite cost on or below the diagonal would repeat or reverse indices
    backward = np.tril(np.ones((m + 1, m + 1), dtype=bool))
    for k in range(1, nfe + 1):
        cand = cost + coeff * togo[k - 1][None, :]          # [i, j]
        cand[backward] = np.inf
        nxt[k] = np.argmin(cand, axis=1)
        togo[k] = cand[np.arange(m + 1), nxt[k]]
    if not np.isfinite(togo[nfe, 0]):
        raise ValueError(f"no path with {nfe} jumps exists under this cost (max_jump too small?)")
    path = [0]
    for k in range(nfe, 0, -1):
        path.append(int(nxt[k, path[-1]]))
    return path


def path_cost(cost: np.ndarray, path, coeff: float = 1.0) -> float:
    """sum_k coeff^k cost[p_k, p_{k+1}]: the quantity ``gits_dp`` minimises."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square [M+1, M+1] matrix, got shape {cost.shape}")
    idx = list(path)
    if len(idx) < 2 or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in idx):
        raise ValueError(f"path must hold at least 2 int indices into cost, got {path!r}")
    if not all(0 <= a < b < cost.shape[0] for a, b in zip(idx[:-1], idx[1:])):  # an IndexError, or a backwards path
        raise ValueError(f"path must be strictly increasing indices in 0..{cost.shape[0] - 1}, got {idx}")
    path = idx
    return float(sum(coeff ** k * cost[a, b] for k, (a, b) in enumerate(zip(path[:-1], path[1:]))))


@dataclass
class GITSResult:
    timesteps: torch.Tensor      # float64, t_max..t_min, nfe + 1
    path: List[int]              # indices into grid
    grid: torch.Tensor           # the fine candidate grid
    cost: np.ndarray             # [M+1, M+1] pairwise cost (inf where undefined)
    total_cost: float            # path_cost(cost, path, coeff)
    coeff: float


def _check_model_kwargs(model_kwargs) -> Dict[str, Any]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError(f"model_kwargs must be a dict of keyword arguments for the network, got "
                        f"{type(model_kwargs).__name__}")
    return dict(model_kwargs)


def _model_sample_shape(model) -> Optional[tuple]:
    """The per-sample shape the model says it takes (a testbed's event_shape, or model.sample_shape), if any."""
    tb = getattr(model, "testbed", None)
    shape = getattr(tb, "event_shape", None) if tb is not None else getattr(model, "sample_shape", None)
    try:
        return None if shape is None else tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def _start_noise(model, schedule, x_T, sample_shape, n_samples, seed, dtype):
    """The teacher batch's start (x_T, or seeded noise of ``sample_shape``), checked; also the name of the
    argument it came from.  A bad one failed inside torch.randn, inside the model's reshape, or was cast
    silently (an integer or complex x_T)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a real floating torch.dtype (e.g. torch.float64), got {dtype!r}")
    if sample_shape is not None:
        if isinstance(sample_shape, (str, bytes)) or not isinstance(sample_shape, (tuple, list, torch.Size)) or \
                not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in sample_shape):
            raise TypeError(f"sample_shape must be a tuple of ints (the shape of one sample, e.g. (1, 8, 8)), "
                            f"got {sample_shape!r}")
        if not all(d >= 1 for d in sample_shape):
            raise ValueError(f"sample_shape must hold sizes >= 1, got {tuple(sample_shape)}")
        sample_shape = tuple(int(d) for d in sample_shape)
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor):
            raise TypeError(f"x_T must be a real floating torch.Tensor [batch, *sample_shape], got {type(x_T).__name__}")
        if not x_T.is_floating_point():  # was cast to dtype: an int/bool start silently, a complex one lost a part
            raise TypeError(f"x_T must be a real floating torch.Tensor, got dtype {x_T.dtype}")
        if x_T.layout != torch.strided or x_T.device.type == "meta":
            raise ValueError(f"x_T must be a dense tensor with values, got layout {x_T.layout} on {x_T.device}")
        if x_T.dim() < 1 or x_T.shape[0] == 0 or x_T.numel() == 0:
            raise ValueError(f"x_T must be [batch >= 1, *sample_shape] with values, got shape {tuple(x_T.shape)}")
        if sample_shape is not None and tuple(x_T.shape[1:]) != sample_shape:
            raise ValueError(f"x_T has samples of shape {tuple(x_T.shape[1:])} but sample_shape is {sample_shape}; "
                             "pass one of them, or make them agree")
        if not all_finite(x_T):
            raise ValueError("x_T contains NaN or Inf")
        arg, shape = "x_T", tuple(x_T.shape[1:])
    want = _model_sample_shape(model)
    if x_T is None:
        if sample_shape is None and want is None:
            raise ValueError("gits: pass x_T or sample_shape (the shape of one sample, e.g. (1, 8, 8))")
        # the model's own shape when it says one (it was required here even then; LD3Trainer reads it)
        arg, shape = "sample_shape", sample_shape if sample_shape is not None else want
    if want is not None and shape != want:
        raise ValueError(f"{arg}: the model's samples have shape {want}, got {shape}"
                         + (f" (x_T has shape {tuple(x_T.shape)})" if arg == "x_T" else ""))
    if x_T is None:
        g = torch.Generator().manual_seed(seed)
        x_T = schedule.prior_std() * torch.randn(n_samples, *shape, generator=g, dtype=torch.float64)
    return x_T, arg


def _first_x0(model, x_T, grid, arg, model_kwargs=None) -> torch.Tensor:
    """The prediction at (x_T, grid[0]), made before the teacher so that a sample shape the network cannot take is
    named as the argument it came from (a model that does not say its shape failed inside its reshape or conv,
    naming nothing); the cost matrix reuses it, so it costs no extra call."""
    with torch.no_grad():
        try:
            return model.x0(x_T, grid[0], **(model_kwargs or {}))
        except ModelOutputError:  # the wrapper's own message already says what is wrong
            raise
        except (RuntimeError, IndexError) as e:
            also = f" (or model_kwargs {sorted(model_kwargs)} do not fit the network)" if model_kwargs else ""
            raise ValueError(f"{arg}: the model fails on samples of shape {tuple(x_T.shape[1:])} ({e}); is that "
                             f"the shape of the model's samples?{also}") from e


def gits(model: DiffusionModel, schedule: Optional[NoiseSchedule] = None, nfe: int = 5, solver=None,
         n_samples: int = 64, fine_steps: int = 60, spacing: str = "edm", seed: int = 0,
         teacher_solver=None, teacher_substeps: int = 4, max_jump: Optional[int] = None,
         coeff: float = 1.15, x_T: Optional[torch.Tensor] = None, sample_shape=None,
         dtype: Optional[torch.dtype] = None, return_info: bool = False, metric: str = "dev",
         model_kwargs: Optional[Dict[str, Any]] = None):
    """GITS timesteps for ``model`` (float64, t_max..t_min, length nfe + 1).

    ``x_T``: the teacher batch's starting noise; by default ``n_samples`` draws of
    N(0, prior_std^2) with ``sample_shape`` (e.g. (1, 8, 8); default the model's own ``sample_shape`` or test
    bed's event shape, as ``LD3Trainer``; required when the model has neither), seeded by ``seed``.
    ``coeff``: GITS' weight on later jumps in the DP (1.15 by default, 1 = plain minimum total cost);
    with coeff = 1 the search spends steps where the trajectory is nearly straight at high noise,
    because an error made there is counted in full although the ODE shrinks it later.
    ``metric``: the cost of a jump (:func:`gits_cost_matrix`): ``"dev"``, GITS' default and recommended setting,
    scores how far the jump's end strays from the trajectory's chord beyond the teacher's own deviation there;
    ``"l2"`` its error against the teacher state (the only cost before 2026-12-07; ``ld3 eval`` uses the default).
    ``dtype``: the precision of the teacher trajectories and the cost steps (x_T is cast to it); default the network's
    weights' dtype, float64 for the test beds and float32 for other models without weights (as ``LD3Trainer``).
    ``model_kwargs``: keyword arguments for every network call, e.g. a conditional model's conditions
    (``{model.cond_key: labels}``, one per teacher sample: ``n_samples`` of them, or one per row of ``x_T``).
    ``return_info=True`` returns a :class:`GITSResult` (path, grid, cost matrix, total cost).
    """
    if not isinstance(model, DiffusionModel):
        raise TypeError("gits needs the model (a DiffusionModel from wrap_model): it searches on teacher "
                        "trajectories of that model")
    schedule = model.schedule if schedule is None else schedule
    _check(schedule, nfe)
    if schedule is not model.schedule and not schedule.same_as(model.schedule):
        raise ValueError("schedule differs from the model's schedule")
    # named here, before the teacher trajectories: fine_steps was only checked deep inside the fine grid (as
    # "nfe"), and a bad n_samples failed inside torch.randn
    fine_steps = count("fine_steps", fine_steps, 1, type_error=False)
    n_samples = count("n_samples", n_samples, 1, type_error=False)
    coeff = real("coeff", coeff, above=0)
    metric = _check_metric(metric)
    seed = check_seed("seed", seed)
    max_jump = count("max_jump", max_jump, 1, none_ok=True)  # before the teacher trajectories, not after
    teacher_substeps = count("teacher_substeps", teacher_substeps, 1, type_error=False)
    model_kwargs = _check_model_kwargs(model_kwargs)
    if fine_steps < nfe:
        raise ValueError(f"fine_steps ({fine_steps}) must be >= nfe ({nfe})")
    if max_jump is not None and nfe * max_jump < fine_steps:  # found by the search only after the teacher
        raise ValueError(f"no path of nfe={nfe} jumps of at most max_jump={max_jump} fine intervals covers the "
                         f"fine_steps={fine_steps} intervals: need nfe * max_jump >= fine_steps")
    solver = as_solver(solver)  # before the (costly) teacher trajectories
    teacher_solver = as_solver(teacher_solver, name="teacher_solver")
    grid = fine_grid(schedule, fine_steps, spacing)
    if dtype is None:
        # the weights' dtype: a float64 start fed a float32 network failed ("mat1 and mat2 must have the same dtype"),
        # reported as a sample shape the model cannot take
        dtype = default_state_dtype(model)
    x_T, arg = _start_noise(model, schedule, x_T, sample_shape, n_samples, seed, dtype)
    dev = next((p.device for p in model.parameters()), x_T.device)
    x_T = x_T.to(device=dev, dtype=dtype)
    grid_d = grid.to(dev)
    cond = model_kwargs.get(getattr(model, "cond_key", None))
    if isinstance(cond, torch.Tensor) and cond.dim() >= 1 and cond.shape[0] not in (1, x_T.shape[0]):
        # else the network's own size mismatch, reported below as a sample shape the model cannot take
        raise ValueError(f"model_kwargs[{model.cond_key!r}] holds {cond.shape[0]} conditions for the {x_T.shape[0]} "
                         f"teacher samples ({'the rows of x_T' if arg == 'x_T' else 'n_samples'}): one per sample")
    # the conditions go where x_T went (the model's device): CPU labels for a CUDA network failed as a "shape"
    model_kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()}
    x0_start = _first_x0(model, x_T, grid_d, arg, model_kwargs)
    states = teacher_states(model, x_T, grid_d, teacher_solver, teacher_substeps, model_kwargs)
    cost = _cost_matrix(model, grid_d, states, solver, max_jump, x0_start, metric, model_kwargs)
    path = gits_dp(cost, nfe, coeff)
    t = grid[path].clone()
    t[0], t[-1] = schedule.t_max, schedule.t_min
    if return_info:
        return GITSResult(t, path, grid, cost, path_cost(cost, path, coeff), coeff)
    return t


__all__ = ["GITS_PRESETS", "GITS_METRICS", "gits_preset", "gits", "gits_cost_matrix", "gits_dp", "path_cost",
           "fine_grid", "teacher_states", "line_deviation", "GITSResult"]
