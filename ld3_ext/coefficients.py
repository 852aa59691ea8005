"""Solver coefficients as plain, differentiable PyTorch (the reference for the native code).

Every multistep solver step in this library is the same linear update

    x_next = a * x + sum_k b_k * m_k                                   (k = 0..3)

where m_k are earlier network outputs (data predictions D for DPM-Solver++/UniPC/Euler,
noise predictions eps for iPNDM) and (a, b_k) depend only on the solver time grid t_0 > ... > t_N.
This module computes the whole coefficient table of a sample call at once:

    table[i-1, 0, :] = [a, b_0, b_1, b_2, b_3]   main (or UniPC predictor) update of step i,
                       b_k multiplies the output made at grid point i-1-k;
    table[i-1, 1, :] = [a, c_0, c_1, c_2, c_3]   UniPC corrector of step i (zeros for other solvers),
                       c_0 multiplies the NEW output D_i (made at the predictor point),
                       c_k (k >= 1) multiplies the output made at grid point i-k.

Step i of every solver reads only t_{i-3}..t_i, so the native code returns the Jacobian of each row
w.r.t. those four times.  This file is the float64-capable reference; ``csrc/solver_coefficients.h``
holds the same formulas in C++ (for CPU and CUDA) and ``tests/test_fused_ops.py`` checks both.

Formulas follow ``shared/reference/LD3.md`` section 2 (DPM-Solver++ 1-3M with midpoint or heun-type
second order, UniPC bh1/bh2, iPNDM 1-4, Euler = DDIM in data prediction).
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Dict, List

import torch

from ._checks import flag as check_flag  # the library's flag rule (kept importable here)
from .device_constants import cached_constants

MAX_HISTORY = 4  # history terms a single update may combine
TABLE_WIDTH = 1 + MAX_HISTORY

# Solver kind ids shared with csrc/solver_coefficients.h
SOLVER_IDS = {"euler": 0, "dpmpp": 1, "unipc": 2, "ipndm": 3}
MAX_ORDER = {"euler": 1, "dpmpp": 3, "unipc": 3, "ipndm": 4}

# Adams-Bashforth weights of iPNDM, newest first
IPNDM_WEIGHTS = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


@dataclass(frozen=True)
class SolverSpec:
    """What a coefficient table depends on besides the time grid."""

    kind: str                     # "euler" | "dpmpp" | "unipc" | "ipndm"
    order: int = 1
    lower_order_final: bool = True
    solver_type: str = "midpoint"  # DPM-Solver++ second-order flavour: "midpoint" | "heun"
    variant: str = "bh1"           # UniPC B(h): "bh1" | "bh2"
    use_corrector: bool = True     # UniPC: apply UniC after every step but the last

    def __post_init__(self):
        if self.kind not in SOLVER_IDS:
            raise ValueError(f"kind must be one of {sorted(SOLVER_IDS)}, got {self.kind!r}")
        if not isinstance(self.order, int) or isinstance(self.order, bool):
            raise TypeError(f"order must be an int, got {type(self.order).__name__}")
        if not 1 <= self.order <= MAX_ORDER[self.kind]:
            top = MAX_ORDER[self.kind]
            allowed = "1 (it is a first-order method)" if top == 1 else f"in 1..{top}"
            raise ValueError(f"order must be {allowed} for {self.kind}, got {self.order}")
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {self.solver_type!r}")
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(f"variant must be 'bh1' or 'bh2', got {self.variant!r}")
        # frozen: store numpy bools as plain bools (the native call and to_dict() want Python bools)
        object.__setattr__(self, "lower_order_final", check_flag("lower_order_final", self.lower_order_final))
        object.__setattr__(self, "use_corrector", check_flag("use_corrector", self.use_corrector))

    @property
    def uses_noise_prediction(self) -> bool:
        return self.kind == "ipndm"

    @property
    def has_corrector(self) -> bool:
        return self.kind == "unipc" and self.use_corrector

    def to_dict(self) -> dict:
        return asdict(self)


def step_orders(spec: SolverSpec, nfe: int) -> List[int]:
    """Order p_i of steps i = 1..N: warm-up p_i = min(i, K), then (optionally) lower order at the end."""
    orders = []
    for i in range(1, nfe + 1):
        p = min(i, spec.order)
        if spec.lower_order_final and spec.kind in ("dpmpp", "unipc", "ipndm"):
            p = min(p, nfe + 1 - i)
        orders.append(p)
    return orders


#: below this |x| the phi functions come from their Taylor series (``phi_functions``); csrc/solver_coefficients.h
#: splits at the same place
PHI_SERIES_BELOW = 2.0
#: terms of every phi_k's series: the first left out, 2^28/29!, is 3e-23 and its derivatives' 5e-20 (22 terms cut
#: phi_1's first derivative at 1.2e-14 near |x| = 2; the C++ code sums phi_4's series and recurs down, so it
#: carries phi_1 to x^24 with 22)
PHI_SERIES_TERMS = 28


def _inverse_factorials(n: int) -> List[float]:
    inv = [1.0]  # inv[m] = 1/m!
    for m in range(1, n):
        inv.append(inv[-1] / m)
    return inv


_INV = _inverse_factorials(PHI_SERIES_TERMS + 4)
# made into tensors on a device once (device_constants: not kept when made under a torch.func level, a trace or
# a FakeTensorMode, whose tensors would break every later call outside it)
_ON_DEVICE: Dict = {}
_PHI_SERIES_COEF = [[_INV[j + k] for k in range(1, 5)] for j in range(PHI_SERIES_TERMS)]  # x^j -> phi_k
_PHI_PARTIAL_COEF = [[_INV[j] if 1 <= j < k else 0.0 for k in range(1, 5)] for j in range(5)]  # sum_{1<=j<k} x^j/j!


def phi_functions(x: torch.Tensor) -> torch.Tensor:
    """phi_k(x) = sum_{j>=0} x^j/(j+k)! for k = 1..4, stacked on a new last axis (phi_1 = expm1(x)/x).

    The exponential-integrator functions every multistep row is made of.  LD3.md writes them as the recursion
    phi_{k+1} = (phi_k - 1/k!)/x, which cancels as x -> 0 (a fine grid's steps): UniPC(3)'s corrector row lost
    8 digits at steps h = 1e-4 and its Jacobian 12.  Below |x| = 2 the series; above it the recursion unrolled,
    (expm1(x) - sum_{1<=j<k} x^j/j!)/x^k, which there costs a few ulps.  Each is a matrix product over powers of
    x, for every step at once, so the reference table stays a handful of autograd nodes.  Differentiable, also
    twice, for 1e-150 < |x| < 700 (a grid's steps in lambda lie in 1e-17 < h < 1500, and h > 700 only where
    e^-h underflows anyway); x = 0 gives NaN.  float16/bfloat16 x is computed in float32 (x^27 overflows half)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"phi_functions: x must be a real floating torch.Tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype in (torch.float16, torch.bfloat16):
        return phi_functions(x.float()).to(x.dtype)
    like = dict(dtype=x.dtype, device=x.device)
    small = x.abs() < PHI_SERIES_BELOW
    # each branch sees a harmless stand-in where the other is used: every derivative stays finite there, so the
    # where() passes 0, not NaN (x = 0 would make pow's second derivative 0 * inf)
    xs = torch.where(small, x, 1.0)
    xr = torch.where(small, 1.0, x)
    series_coef, partial_coef = cached_constants(_ON_DEVICE, "phi", x.device, x.dtype, lambda device, dtype: (
        torch.tensor(_PHI_SERIES_COEF, dtype=dtype, device=device),
        torch.tensor(_PHI_PARTIAL_COEF, dtype=dtype, device=device)))
    series = (xs.unsqueeze(-1) ** torch.arange(PHI_SERIES_TERMS, **like)) @ series_coef
    powers = xr.unsqueeze(-1) ** torch.arange(5, **like)
    unrolled = (torch.expm1(xr).unsqueeze(-1) - powers @ partial_coef) / powers[..., 1:]
    return torch.where(small.unsqueeze(-1), series, unrolled)


def _expm1_exact_grad(x: torch.Tensor) -> torch.Tensor:
    """expm1(x) for x <= 0 whose derivatives are exp(x) itself.  torch.expm1's backward forms (result + 1), which
    keeps only 1e-16/e^x of e^x's digits for large negative x: the reference table's Jacobian was off by 6e-9 at
    a step h = 20 (an EDM grid from 80 to 1e-7), where the native Dual arithmetic is exact.  The value is
    torch.expm1's: e - e.detach() adds an exact zero that carries exp's derivative, at every order (for x > 709
    it would be inf - inf: the reference passes x = -h < 0)."""
    e = torch.exp(x)
    return torch.expm1(x.detach()) + (e - e.detach())


def _solve(R: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R^-1 b for UniPC's small Vandermonde systems.  solve_ex without its error check: linalg.solve reads the
    factorisation's status back to the host, a stream sync on a GPU at every UniPC step of order >= 2 (and refused
    under CUDA-graph capture).  R is singular only where two of the grid's lambdas coincide, which the grid check
    refuses."""
    return torch.linalg.solve_ex(R, b, check_errors=False)[0]


def _step_phis(lam, spec: SolverSpec, orders: List[int]):
    """For every step, what DPM-Solver++ and UniPC rows take from the phi functions: LD3.md's phi_1 = e^-h - 1,
    and (None where no step reads it) DPM-Solver++'s (phi_2, phi_3) or UniPC's vector b_1..b_3.  Computed for all
    steps at once, so a longer grid adds no autograd nodes here."""
    n = len(orders)
    h = lam[1:] - lam[:-1]
    phi1 = list(_expm1_exact_grad(-h).unbind(0))
    if spec.kind in ("dpmpp", "euler"):
        need = any(p == 3 or (p == 2 and spec.solver_type == "heun") for p in orders)
    else:
        need = any(p >= 3 or (p == 2 and spec.has_corrector and i < n) for i, p in enumerate(orders, 1))
    if not need:
        return phi1, [None] * n
    phi = phi_functions(-h)
    if spec.kind == "unipc":
        # b_k = g_k k!/B(h) with g_1 = phi/hh - 1, g_{k+1} = g_k/hh - 1/(k+1)! (LD3.md), i.e. g_k = hh phi_{k+1}(hh):
        # b_k = phi_{k+1}(hh) k! hh/B, and hh/B = 1 (bh1) or 1/phi_1(hh) (bh2)
        (factorials,) = cached_constants(_ON_DEVICE, "k!", phi.device, phi.dtype, lambda device, dtype: (
            torch.tensor([1.0, 2.0, 6.0], dtype=dtype, device=device),))  # k!, k = 1..3
        b = phi[:, 1:] * factorials
        if spec.variant == "bh2":
            b = b / phi[:, :1]
        return phi1, list(b.unbind(0))
    # phi_2 = phi_1/h + 1 = h phi_2(-h) and phi_3 = phi_2/h - 1/2 = -h phi_3(-h), without their cancellation
    return phi1, list(zip((h * phi[:, 1]).unbind(0), (-h * phi[:, 2]).unbind(0)))


def _dpmpp_row(lam, alpha, sigma, log_sigma, i, p, solver_type, phi1, phi23):
    """``phi1``, ``phi23`` = this step's phi_1 and (phi_2, phi_3) from ``_step_phis``."""
    h = lam[i] - lam[i - 1]
    a = torch.exp(log_sigma[i] - log_sigma[i - 1])
    al = alpha[i]
    zero = torch.zeros_like(h)
    if p == 1:
        return [a, -al * phi1, zero, zero, zero]
    r0 = (lam[i - 1] - lam[i - 2]) / h
    if p == 2:
        if solver_type == "midpoint":
            return [a, -al * phi1 * (1.0 + 0.5 / r0), al * phi1 * 0.5 / r0, zero, zero]
        phi2 = phi23[0]
        return [a, -al * phi1 + al * phi2 / r0, -al * phi2 / r0, zero, zero]
    r1 = (lam[i - 2] - lam[i - 3]) / h
    phi2, phi3 = phi23
    # first differences as coefficient vectors over (D_{i-1}, D_{i-2}, D_{i-3})
    d10 = [1.0 / r0, -1.0 / r0, zero]
    d11 = [zero, 1.0 / r1, -1.0 / r1]
    diff = [u - v for u, v in zip(d10, d11)]
    dd1 = [u + r0 / (r0 + r1) * v for u, v in zip(d10, diff)]
    dd2 = [v / (r0 + r1) for v in diff]
    b = [al * phi2 * u - al * phi3 * v for u, v in zip(dd1, dd2)]
    b[0] = b[0] - al * phi1
    return [a] + b + [zero]


def _unipc_rows(lam, alpha, log_sigma, i, p, variant, corrector, h_phi_1, bvec):
    """(predictor row, corrector row) of UniPC step i with order p (data prediction); ``h_phi_1`` = e^-h - 1 and
    ``bvec`` = b_1..b_3 of this step from ``_step_phis``."""
    h = lam[i] - lam[i - 1]
    hh = -h
    a = torch.exp(log_sigma[i] - log_sigma[i - 1])
    al = alpha[i]
    B = hh if variant == "bh1" else h_phi_1
    zero = torch.zeros_like(h)
    rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)]  # r_k for history m_k, k = 1..p-1
    # predictor over (m_0 .. m_{p-1})
    pred = [a, -al * h_phi_1] + [zero] * (MAX_HISTORY - 1)
    if p >= 2:
        if p == 2:
            rho_p = [torch.full_like(h, 0.5)]
        else:
            R = torch.stack([torch.stack([rk ** j for rk in rks]) for j in range(p - 1)])
            rho_p = list(_solve(R, bvec[: p - 1]))
        for k in range(1, p):
            w = -al * B * rho_p[k - 1] / rks[k - 1]  # coefficient of Delta_k = (m_k - m_0)/r_k
            pred[1 + k] = pred[1 + k] + w
            pred[1] = pred[1] - w
    if not corrector:
        return pred, [zero] * TABLE_WIDTH
    # corrector over (D_i, m_0, m_1, m_2)
    if p == 1:
        rho_c = [torch.full_like(h, 0.5)]
    else:
        rall = rks + [torch.ones_like(h)]
        R = torch.stack([torch.stack([rk ** j for rk in rall]) for j in range(p)])
        rho_c = list(_solve(R, bvec[:p]))
    corr = [a, zero, -al * h_phi_1] + [zero] * (MAX_HISTORY - 2)
    for k in range(1, p):
        w = -al * B * rho_c[k - 1] / rks[k - 1]
        corr[2 + k] = corr[2 + k] + w
        corr[2] = corr[2] - w
    w = -al * B * rho_c[p - 1]  # coefficient of (D_i - m_0)
    corr[1] = corr[1] + w
    corr[2] = corr[2] - w
    return pred, corr


IPNDM_DIFFERENCE_ABOVE = 0.6931471805599453  # ln 2: a sigma_{i-1} >= 2 sigma_i there, so the difference loses < 1 bit


def _ipndm_steps(lam, sigma, log_alpha):
    """(a, scale) of every iPNDM step at once: x_{i+1} = a x_i + scale * (Adams-Bashforth combination of eps)."""
    h = lam[1:] - lam[:-1]
    a = torch.exp(log_alpha[1:] - log_alpha[:-1])
    # -sigma_i (e^h - 1) = sigma_i - a sigma_{i-1}: the second form has no e^h to cancel in the derivatives
    # (d/dt_i of the first is -expm1(h) + e^h, exact 1 for EDM, lost 6e-8 of it at h = 20), the first none in
    # the value as h -> 0; each is used where it is exact (csrc/solver_coefficients.h splits the same way)
    large = h > IPNDM_DIFFERENCE_ABOVE
    # expm1 of 0 where unused: e^h overflows above h = 709, and inf there would make the where()'s gradient NaN
    scale = torch.where(large, sigma[1:] - a * sigma[:-1], -sigma[1:] * torch.expm1(torch.where(large, 0.0, h)))
    return a.unbind(0), scale.unbind(0)


def _ipndm_row(a, scale, p):
    zero = torch.zeros_like(a)
    w = IPNDM_WEIGHTS[p]
    return [a] + [scale * w[k] if k < p else zero for k in range(MAX_HISTORY)]


def coefficient_table_reference(schedule, timesteps: torch.Tensor, spec: SolverSpec, *,
                                validate: bool = True) -> torch.Tensor:
    """The [N, 2, 5] coefficient table of a solve on ``timesteps`` (t_0 > ... > t_N), differentiable in t.

    The grid must be strictly decreasing, finite and where the schedule is defined (``ops.check_grid``), else
    ``ValueError`` naming timesteps; ``validate=False`` skips these checks (they read the grid back), for
    callers that checked the grid already."""
    if validate:
        from .ops import check_grid, check_table_args
        check_table_args(schedule, timesteps, spec)
        check_grid(schedule, timesteps, in_range=False, spec=spec,
                   lambda_dtype=timesteps.dtype if timesteps.is_floating_point() else torch.float64)
    t = timesteps
    n = t.numel() - 1
    orders = step_orders(spec, n)
    log_alpha = schedule.log_alpha(t)
    log_sigma = schedule.log_sigma(t)
    lam = log_alpha - log_sigma
    alpha, sigma = torch.exp(log_alpha), torch.exp(log_sigma)
    if spec.kind != "ipndm" and n:
        phi1, phis = _step_phis(lam, spec, orders)
    elif n:
        ipndm_a, ipndm_scale = _ipndm_steps(lam, sigma, log_alpha)
    zero_row = [torch.zeros_like(t[0])] * TABLE_WIDTH
    rows = []
    for i in range(1, n + 1):
        p = orders[i - 1]
        if spec.kind in ("dpmpp", "euler"):
            main = _dpmpp_row(lam, alpha, sigma, log_sigma, i, p, spec.solver_type, phi1[i - 1], phis[i - 1])
            corr = zero_row
        elif spec.kind == "unipc":
            main, corr = _unipc_rows(lam, alpha, log_sigma, i, p, spec.variant, spec.has_corrector and i < n,
                                     phi1[i - 1], phis[i - 1])
        else:
            main = _ipndm_row(ipndm_a[i - 1], ipndm_scale[i - 1], p)
            corr = zero_row
        rows.append(torch.stack([torch.stack(main), torch.stack(corr)]))
    return torch.stack(rows)


__all__ = ["SolverSpec", "check_flag", "step_orders", "coefficient_table_reference", "MAX_HISTORY", "TABLE_WIDTH",
           "SOLVER_IDS", "MAX_ORDER", "IPNDM_WEIGHTS", "phi_functions"]
