"""DMN: model-free optimised time steps (Xue et al. 2024, "Accelerating Diffusion Sampling with
Optimized Time Steps"), as used as a baseline by LD3 (``skip_type dmn``).

The objective
-------------
Work in lambda = log(alpha/sigma).  A data-prediction multistep solver (DPM-Solver++ / UniPC family)
advances from lambda_s to lambda_{s+1} as

    x_{s+1} = (sigma_{s+1}/sigma_s) x_s + sigma_{s+1} sum_j J_{s,j} D_j,
    J_{s,j} = integral over [lambda_s, lambda_{s+1}] of e^lambda l_{s,j}(lambda) d lambda,

where D_j is the network's data prediction at an earlier node j and l_{s,j} the Lagrange basis
polynomial (in lambda) through the k_s nodes the step uses (k_s = the step's order).  Because the
x-coefficients telescope, an error e_j in D_j reaches the final state as sigma_N * J_{s,j} * e_j.
DMN assumes the network's error at node j scales like a fixed power of the noise level,

    |e_j| ~ w(lambda_j),  w = sigma/alpha (pixel models)  or  sigma^2/alpha (latent models),

with (alpha, sigma) the variance-preserving pair for lambda.  The bound to minimise over the
interior lambdas is then (dropping the constant sigma_N):

    sum over the first ``trunc_num`` steps of || (w_j J_{s,j})_j ||_2      (errors of a step's nodes
                                                                         treated as independent)
  + sum over the first-order steps of | w_s J_{s,s} |                    (always on their own)
  + sum over nodes j of | sum over the other steps s of w_j J_{s,j} |    (the same node's error
                                                                         re-used by several steps,
                                                                         signed, so they may cancel)

as LD3's port (``StepOptim``) writes it: a first-order step (the first and, with the lower final
orders, the last) never joins the signed sums, whatever ``trunc_num`` is.

Steps use order min(order, s + 1, N - s) (warm-up, then lower order at the end, as DPM-Solver++(3M)
with ``lower_order_final``).  ``trunc_num`` defaults to 3 for N <= 7 and 0 above (the original's
choice for few steps).  The minimisation uses scipy ``trust-constr`` with linear constraints
lambda_0 < lambda_1 < ... < lambda_N (a margin keeps steps apart), started from uniform lambda (pixel)
or uniform t (latent).  The result depends only on the schedule's lambda range, not on a model.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from .._checks import count, real
from ..discretizations import _check
from ..schedules import NoiseSchedule

# Gauss-Legendre nodes on [0, 1]: exact for e^u times a polynomial up to round-off for the step
# sizes that occur (h < ~10), and free of the cancellation that closed forms suffer for small h.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(24)
_GL_X = 0.5 * (_GL_X + 1.0)
_GL_W = 0.5 * _GL_W


def _check_order(order):
    count("order", order, 1, 3, type_error=False)


def step_orders(n: int, order: int) -> list:
    """Order of each of the n steps: warm-up min(s+1, order), lowered to N - s at the end."""
    return [max(1, min(order, s + 1, n - s)) for s in range(n)]


def exp_lagrange_weights(nodes: np.ndarray, a: float, b: float) -> np.ndarray:
    """J_j = integral_a^b e^lam l_j(lam) d lam for the Lagrange basis l_j through ``nodes``."""
    h = b - a
    lam = a + h * _GL_X                                   # quadrature points
    k = nodes.size
    basis = np.ones((k, lam.size))
    for j in range(k):
        for m in range(k):
            if m != j:
                basis[j] *= (lam - nodes[m]) / (nodes[j] - nodes[m])
    return h * (basis * (np.exp(lam) * _GL_W)).sum(1)


def error_weight(lam: np.ndarray, space: str) -> np.ndarray:
    """The assumed data-prediction error at lambda: sigma/alpha (pixel) or sigma^2/alpha (latent)."""
    # variance-preserving alpha, sigma for this lambda (the bound is stated for VP; sigma/alpha = e^-lam
    # is the same for every schedule)
    alpha = 1.0 / np.sqrt(1.0 + np.exp(-2.0 * lam))
    sigma = 1.0 / np.sqrt(1.0 + np.exp(2.0 * lam))
    if space == "pixel":
        return sigma / alpha
    if space == "latent":
        return sigma ** 2 / alpha
    raise ValueError(f"space must be 'pixel' or 'latent', got {space!r}")


def dmn_objective(lams: np.ndarray, order: int = 3, space: str = "pixel", trunc_num: int = 0) -> float:
    """The DMN error bound for a full increasing lambda grid lambda_0 (noisiest) .. lambda_N."""
    _check_order(order)  # step_orders would silently clamp 0 or 7 to a valid order
    try:
        lams = np.asarray(lams, dtype=np.float64)
    except (TypeError, ValueError):
        lams = None
    # [] and [0.0] scored 0.0, a decreasing grid a number, a 2-D one failed in a broadcast
    if lams is None or lams.ndim != 1 or lams.size < 2 or not np.all(np.isfinite(lams)) \
            or not np.all(np.diff(lams) > 0):
        raise ValueError("lams must be a 1-D grid of at least 2 finite, strictly increasing lambdas (noisiest first)")
    return _error_bound(lams, order, space, count("trunc_num", trunc_num, 0, type_error=False))


def _error_bound(lams: np.ndarray, order: int, space: str, trunc_num: int) -> float:
    """dmn_objective without its checks: trust-constr evaluates it at points outside its constraints too
    (unsorted lambdas), where the bound is still a number it can step from."""
    n = lams.size - 1
    w = error_weight(lams, space)
    total = 0.0
    acc = np.zeros(n + 1)
    for s, k in enumerate(step_orders(n, order)):
        nodes_idx = np.arange(s - k + 1, s + 1)               # the k most recent nodes, ending at s
        contrib = w[nodes_idx] * exp_lagrange_weights(lams[nodes_idx], lams[s], lams[s + 1])
        if s < trunc_num or k == 1:  # a first-order step's term stands alone (LD3's StepOptim)
            total += float(np.sqrt((contrib ** 2).sum()))
        else:
            acc[nodes_idx] += contrib
    return total + float(np.abs(acc).sum())


def dmn_lambdas(lambda_min: float, lambda_max: float, nfe: int, order: int = 3, space: str = "pixel",
                trunc_num: Optional[int] = None, init: Optional[np.ndarray] = None, min_gap: float = 1e-3,
                maxiter: int = 200) -> np.ndarray:
    """Optimised increasing lambda grid (length nfe + 1) between lambda_min and lambda_max.

    ``init``: the start, nfe + 1 strictly increasing lambdas from lambda_min to lambda_max (default uniform).
    The result is always a valid grid no worse (in the bound) than the start: where trust-constr ends outside
    its constraints, the best valid iterate it passed is returned (or the start, with a RuntimeWarning)."""
    from scipy.optimize import LinearConstraint, minimize

    lambda_min, lambda_max = real("lambda_min", lambda_min), real("lambda_max", lambda_max)  # "a" failed in isfinite
    if not (np.isfinite(lambda_min) and np.isfinite(lambda_max) and lambda_max > lambda_min):
        raise ValueError(f"need finite lambda_min < lambda_max, got lambda_min={lambda_min}, lambda_max={lambda_max}")
    count("nfe", nfe, 1, type_error=False)  # nfe=0 divides by zero below
    _check_order(order)
    # both were used unchecked: maxiter <= 0 returned the unoptimised start, trunc_num -1 or 2.5 acted as 0 or 3
    maxiter = count("maxiter", maxiter, 1, type_error=False)
    trunc_num = count("trunc_num", trunc_num, 0, none_ok=True, type_error=False)
    if trunc_num is None:
        trunc_num = 3 if nfe <= 7 else 0
    min_gap = real("min_gap", min_gap, above=0)
    init = _check_init(init, lambda_min, lambda_max, nfe)
    if nfe == 1:
        return np.array([lambda_min, lambda_max])
    gap = min(min_gap, 0.1 * (lambda_max - lambda_min) / nfe)
    m = nfe - 1                                             # free interior lambdas
    # rows: x_0 - lmin >= gap, x_{i+1} - x_i >= gap, lmax - x_{m-1} >= gap
    A = np.zeros((nfe, m))
    lb = np.full(nfe, gap)
    A[0, 0] = 1.0
    lb[0] = lambda_min + gap
    for i in range(1, m):
        A[i, i], A[i, i - 1] = 1.0, -1.0
    A[m, m - 1] = -1.0
    lb[m] = gap - lambda_max
    cons = LinearConstraint(A, lb, np.full(nfe, np.inf))

    def f(x):
        return _error_bound(np.concatenate([[lambda_min], x, [lambda_max]]), order, space, trunc_num)

    def valid(x):
        # trust-constr may end (and pass through) points that break its constraints: at NFE 150 (EDM, latent)
        # it returned lambdas below lambda_min, a grid leaving the schedule's range
        return bool(np.all(np.isfinite(x)) and x[0] > lambda_min and x[-1] < lambda_max and np.all(np.diff(x) > 0))

    start = init[1:-1]
    f_start = f(start)
    seen = {"x": start, "f": f_start}  # the best valid iterate, used only if the optimiser ends on an invalid point

    def callback(xk, state):
        if float(state.fun) < seen["f"] and valid(xk):  # xk unsorted: state.fun is the bound at xk as it is
            seen["x"], seen["f"] = np.array(xk, dtype=np.float64), float(state.fun)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trust-constr warns about the (expected) non-smooth |.|
        res = minimize(f, start, method="trust-constr", constraints=[cons],
                       options={"maxiter": maxiter, "verbose": 0}, callback=callback)
    x = np.sort(res.x)
    if valid(x):
        best = x if f(x) <= f_start else start                 # never return worse than the start
    else:
        best = seen["x"]
        if best is start:
            warnings.warn(f"dmn_lambdas: the optimiser ended outside its constraints and met no valid grid better "
                          f"than its start (nfe={nfe}, maxiter={maxiter}); returning the start", RuntimeWarning,
                          stacklevel=2)
    return np.concatenate([[lambda_min], best, [lambda_max]])


def _check_init(init, lambda_min: float, lambda_max: float, nfe: int) -> np.ndarray:
    """``init`` as a float64 grid lambda_min = l_0 < ... < l_nfe = lambda_max (default: uniform in lambda).  A bad
    one was used unchecked: the wrong length failed in trust-constr's shapes, a decreasing or out-of-range one
    started the search outside its constraints and could come back as an invalid grid."""
    if init is None:
        return np.linspace(lambda_min, lambda_max, nfe + 1)
    try:
        arr = np.asarray(init.detach().cpu() if isinstance(init, torch.Tensor) else init)
    except Exception:
        raise TypeError(f"init must be a 1-D array of nfe + 1 = {nfe + 1} increasing lambdas, "
                        f"got {type(init).__name__}") from None
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"init must hold real numbers (lambdas), got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.shape != (nfe + 1,):
        raise ValueError(f"init must be a 1-D array of nfe + 1 = {nfe + 1} lambdas, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("init contains NaN or Inf")
    tol = 1e-6 * (lambda_max - lambda_min)
    if abs(arr[0] - lambda_min) > tol or abs(arr[-1] - lambda_max) > tol:
        raise ValueError(f"init must run from lambda_min={lambda_min:.6g} to lambda_max={lambda_max:.6g}, got "
                         f"{arr[0]:.6g}..{arr[-1]:.6g}")
    arr[0], arr[-1] = lambda_min, lambda_max
    if not np.all(np.diff(arr) > 0):
        raise ValueError(f"init must be strictly increasing in lambda (noisiest first), got {arr.tolist()}")
    return arr


def order_for(solver) -> int:
    """The bound's order for ``solver``: its own, at most 3 (the highest the bound is written for; Euler and Heun
    give 1 and 2).  The trainer's DMN start and ``ld3 eval``'s DMN row both use it, so they are one grid."""
    order = getattr(solver, "order", None)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise TypeError(f"solver must be an ld3_ext solver (with an int order >= 1), got {type(solver).__name__}")
    return min(3, order)


def dmn(schedule: NoiseSchedule, nfe: int, order: int = 3, space: str = "pixel", init: Optional[str] = None,
        trunc_num: Optional[int] = None, maxiter: int = 200) -> torch.Tensor:
    """DMN timesteps (float64, t_max..t_min, length nfe + 1; endpoints exact) on ``schedule``.

    ``space``: "pixel" (error weight sigma/alpha) or "latent" (sigma^2/alpha).  ``init``: "logsnr"
    (uniform lambda, the pixel default) or "time" (uniform t, the latent default).  ``order``: the order
    of the multistep solver the bound is written for (1-3).  ``maxiter``: trust-constr iterations (about 1-2 s
    at NFE 10).  Below NFE 8 the grid is a smooth local minimum of the bound, settled (to 1e-5 in lambda)
    within ~100 iterations.  From NFE 8 on (``trunc_num`` 0) the signed |.| sums make the bound non-smooth and
    trust-constr, as in LD3's port, stops at a kink that is not a local minimum, at a point that depends on
    ``maxiter`` only slightly (EDM, pixel, NFE 10, scipy 1.17: bound 21.23 at 200 iterations and at 1000);
    restarting the optimiser from the result lowers the bound further, by how much depending on the restart's
    iterations.
    """
    _check(schedule, nfe)
    _check_order(order)
    if space not in ("pixel", "latent"):
        raise ValueError(f"space must be 'pixel' or 'latent', got {space!r}")
    if init is None:  # only None picks the default: an empty string is a mistake, named below
        init = "logsnr" if space == "pixel" else "time"
    lmin, lmax = schedule.lambda_min, schedule.lambda_max
    if init == "logsnr":
        lam0 = np.linspace(lmin, lmax, nfe + 1)
    elif init == "time":
        t0 = torch.linspace(schedule.t_max, schedule.t_min, nfe + 1, dtype=torch.float64)
        lam0 = schedule.lambda_(t0).numpy()
        lam0[0], lam0[-1] = lmin, lmax
    else:
        raise ValueError(f"init must be 'logsnr' or 'time', got {init!r}")
    lam = dmn_lambdas(lmin, lmax, nfe, order=order, space=space, trunc_num=trunc_num, init=lam0, maxiter=maxiter)
    t = schedule.inverse_lambda(torch.from_numpy(lam).to(torch.float64))
    t[0], t[-1] = schedule.t_max, schedule.t_min
    if not bool((t[1:] < t[:-1]).all()):
        raise RuntimeError(f"DMN produced a non-monotone grid (schedule inverse too coarse?): {t.tolist()}")
    return t


__all__ = ["dmn", "order_for", "dmn_lambdas", "dmn_objective", "exp_lagrange_weights", "error_weight", "step_orders"]
