"""Heun's second-order method (EDM, Karras et al. 2022, Algorithm 2 without churn) on any schedule.

It integrates in the variance-exploding view y = x/alpha, sigma_edm = sigma/alpha, so with the EDM
schedule it is exactly EDM's sampler.  NFE = 2N for N intervals (the grid ends at t_min > 0, so
there is no final Euler-only step).

Both backends run it as a chain of 2N multistep updates (``heun_multistep_table``) on the states the
network sees: ``backend="reference"`` in plain PyTorch, the fused one with the fused update kernel and,
when gradients are wanted, the whole-sampler backward (ld3_ext/adjoint.py).  The textbook loop in
y = x/alpha is not used: y starts at x_T/alpha(t_0), up to 1/alpha larger than the sample it ends at
(1000x for flow matching at t = 0.999), so a float16 state lost all of the sample's digits.
"""
from __future__ import annotations

import numbers

from typing import List, Tuple

import torch

from .. import adjoint, ops
from .._checks import count, flag
from ..wrappers import OutputLedger
from .base import Solver, table_rows


def heun_multistep_table(schedule, t: torch.Tensor, view: str = "x0", *,
                         validate: bool = True) -> Tuple[torch.Tensor, List[int]]:
    """Heun as 2N multistep updates on the states the network sees.

    With s_i = sigma_i/alpha_i (EDM sigma), dt = s_{i+1} - s_i, m_i the network's prediction at x_i and m'_i
    at the predictor state z_i = alpha_{i+1} (y_i + dt d_0) (y = x/alpha), step i of Algorithm 2 is, with
    ``view="x0"`` (m = the x0 prediction)

        z_i     = (alpha_{i+1} s_{i+1} / (alpha_i s_i)) x_i - (alpha_{i+1} dt / s_i) m_i
        x_{i+1} = z_i + (alpha_{i+1} dt / (2 s_{i+1})) (m_i - m'_i)

    (the corrector y_{i+1} = y_i + dt (d_0 + d_1)/2 rewritten from z_i: d_1 - d_0 = (m_i - m'_i)/s_{i+1}), and
    with ``view="eps"`` (m = the noise prediction, which is EDM's d = (y - x0)/s exactly)

        z_i     = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} dt m_i
        x_{i+1} = z_i + (alpha_{i+1} dt / 2) (m'_i - m_i).

    With the network evaluated at the solver's times the two are the same map in exact arithmetic and differ
    only in what rounding they amplify (with decoupled model times they are different maps: ``heun_view``).
    The x0 form weighs m by dt/s_{i+1}, large once the grid reaches small sigma, so an x0 made from a noise
    prediction (x0 = (x - sigma eps)/alpha, its rounding ~ ulp(x)) came back amplified: in float32, one EDM
    step 80 -> 0.002 was 1.2e-3 off and some time gradients had the wrong sign
    (``tests/test_heun_prediction_view.py``).  For a noise (or score) network the eps form weighs its raw
    output; at high noise its a = alpha_{i+1}/alpha_i is large, but the x0 form meets the same cancellation
    there inside x0 = (x - sigma eps)/alpha, so it is never the worse one.  For x0, EDM-denoiser, v and flow
    velocity networks the x0 form stays: the eps form's large a at small alpha (flow matching at t = 0.999)
    cost a float32 flow solve 3.5e-4 where the x0 form's was 8e-6 (``tests/test_diffusers_scheduler.py``).
    Returns the [2N, 2, 5] float64 table (row [k, 0] = [a, b_0, b_1, ...], newest output first; built
    with differentiable ops, so gradients reach ``t``) and the update orders [1, 2, 1, 2, ...].

    The grid must be strictly decreasing, finite and where the schedule is defined, as for
    ``ops.coefficient_table`` (``ValueError`` naming timesteps); ``validate=False`` skips these checks (they read
    the grid back), for callers that checked it already.
    """
    from ..schedules import NoiseSchedule
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be an ld3_ext NoiseSchedule, got {type(schedule).__name__}")
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() < 2 or not t.is_floating_point():
        raise ValueError(f"t must be a 1-D floating tensor with at least 2 times, got "
                         f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if view not in ("x0", "eps"):
        raise ValueError(f"view must be 'x0' or 'eps', got {view!r}")
    if flag("validate", validate):  # "no" is truthy: it skipped the checks
        from ..ops import check_grid
        check_grid(schedule, t, in_range=False)
    t64 = t.to(torch.float64)
    sig, alp = schedule.edm_sigma(t64), schedule.alpha(t64)
    n = t64.numel() - 1
    dt = sig[1:] - sig[:-1]
    zero, one = torch.zeros_like(dt), torch.ones_like(dt)
    if view == "x0":
        # a = alpha_{i+1} s_{i+1} / (alpha_i s_i) = sigma_{i+1}/sigma_i, from the log sigmas: the product's derivative
        # cancels two terms of size 1/alpha^2 (3e-8 relative off at flow matching's t = 1 - 1e-8)
        log_sig = schedule.log_sigma(t64)
        pred = torch.stack([torch.exp(log_sig[1:] - log_sig[:-1]), -alp[1:] * dt / sig[:-1], zero, zero, zero], 1)
        half = alp[1:] * dt / (2.0 * sig[1:])
        corr = torch.stack([one, -half, half, zero, zero], 1)  # history newest first: [m'_i, m_i]
    else:
        pred = torch.stack([alp[1:] / alp[:-1], alp[1:] * dt, zero, zero, zero], 1)
        half = alp[1:] * dt / 2.0
        corr = torch.stack([one, half, -half, zero, zero], 1)
    rows = torch.stack([pred, corr], 1).reshape(2 * n, 5)
    return torch.stack([rows, torch.zeros_like(rows)], 1), [1, 2] * n


def heun_view(prediction, coupled: bool = True) -> str:
    """The history view Heun takes for a network predicting ``prediction`` (a DiffusionModel.prediction or a
    diffusers-side name): the noise prediction for noise and score networks, x0 otherwise (see
    ``heun_multistep_table``).

    ``coupled``: the network is evaluated at the solver's own times.  With decoupled model times (LD3's t~_i)
    Heun is *defined* by the x0 form -- EDM's d = (y - x0(t~_i))/s(t_i) -- and the eps form would be another
    sampler (d = eps(t~_i): 0.8 relative apart at a 15 % shift), so the x0 view is kept there, for any network:
    a schedule learned with decoupled times samples what it was fitted to."""
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a prediction name (str), got {type(prediction).__name__}")
    if not isinstance(coupled, bool):
        raise TypeError(f"coupled must be True or False, got {coupled!r}")
    return "eps" if coupled and prediction in ("eps", "score") else "x0"


class Heun(Solver):
    """Heun's second-order method (EDM's Algorithm 2 without churn) on any schedule: two network evaluations
    a step, every step (the grid ends at t_min > 0: no Euler-only last step), so ``nfe = 2 * steps`` and only
    an even NFE runs exactly.  Both backends run it as 2N multistep updates on the states the network sees
    (``heun_multistep_table``); see the module docstring."""

    name = "heun"
    max_order = 2

    def __init__(self, **kw):
        # order is accepted (configs carry it) but must be Heun's own: any other would be silently dropped
        order = kw.pop("order", 2)
        if isinstance(order, numbers.Integral) and not isinstance(order, bool) and order != 2:
            raise ValueError(f"order must be 2 for Heun (a second-order method), got {order}")
        super().__init__(order, **kw)  # its type checks

    def nfe(self, num_steps: int) -> int:
        return 2 * count("num_steps", num_steps, 0, type_error=False)

    def steps_for_nfe(self, nfe: int) -> int:
        if count("nfe", nfe, 1, type_error=False) < 2:  # one step costs two evaluations: a budget of 1 cannot run
            raise ValueError(f"nfe must be >= 2 for Heun (each step costs 2 network evaluations), got {nfe}")
        return nfe // 2  # an odd budget runs one evaluation fewer (exact_steps refuses it)

    def config(self):
        return {"name": self.name, "order": 2}

    def _solve(self, model, x, t, tm, kwargs):
        # model times coupled only when they are the grid itself (sample() passes timesteps as model_timesteps when
        # none are given): equal values in another tensor that requires grad differentiate as the decoupled map
        view = heun_view(getattr(model, "prediction", "x0"), coupled=tm is t)
        table, orders = heun_multistep_table(model.schedule, t, view, validate=False)  # sample() checked t
        idx = 0 if view == "x0" else 1
        tm2 = tm.repeat_interleave(2)[1:]  # update k evaluates the network at tm[(k + 1) // 2]
        first = None  # step 0's evaluation, made once for whichever path runs
        if ops.resolve_backend(self.backend) == "fused" and adjoint.applicable(x, table, tm2):
            def evaluate(xx, tt, step):
                return model.predict(xx, tt, step=step, returns=view, **kwargs)[idx]
            first = self._evaluate(model, x, tm2[0], 0, kwargs, view)[idx]
            try:
                return adjoint.whole_sampler(evaluate, orders, 2, self.checkpoint_model, x, table, tm2,
                                             self._backward_checks(model, x), first=first,
                                             check_outputs=model._fresh_checks_on())
            except adjoint.ForeignGradients:
                pass
        history: List[torch.Tensor] = []  # newest first
        ledger = OutputLedger(model._fresh_checks_on())
        rows = table_rows(table, 0)
        entry = self._history_entry_fn()
        for k, p in enumerate(orders):
            out = first if k == 0 and first is not None else self._evaluate(model, x, tm2[k], k, kwargs, view)[idx]
            val = entry(out, x)
            ledger.admit(val, k, x, table, history[:p - 1])
            history.insert(0, val)
            del history[2:]
            x = ops.multistep_update(x, rows[k], history[:p], self.backend)
        return x
