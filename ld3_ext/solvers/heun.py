"""Heun's second-order method (EDM, Karras et al. 2022, Algorithm 2 without churn) on any schedule.

It integrates in the variance-exploding view y = x/alpha, sigma_edm = sigma/alpha, so with the EDM
schedule it is exactly EDM's sampler.  NFE = 2N for N intervals (the grid ends at t_min > 0, so
there is no final Euler-only step).  Pure PyTorch (not a linear multistep method).
"""
from __future__ import annotations

import torch

from .base import Solver


class Heun(Solver):
    name = "heun"
    max_order = 2

    def __init__(self, **kw):
        kw.pop("order", None)
        super().__init__(2, **kw)

    def nfe(self, num_steps: int) -> int:
        return 2 * num_steps

    def steps_for_nfe(self, nfe: int) -> int:
        return max(1, nfe // 2)

    def config(self):
        return {"name": self.name, "order": 2}

    def _solve(self, model, x, t, tm, kwargs):
        s = model.schedule
        t64 = t.to(torch.float64)  # coefficients in float64 whatever the grid's dtype (as ops.coefficient_table)
        sig = s.edm_sigma(t64).to(x.dtype)
        alp = s.alpha(t64).to(x.dtype)
        y = x / alp[0]
        n = t.numel() - 1
        for i in range(1, n + 1):
            d0 = (y - self._evaluate(model, alp[i - 1] * y, tm[i - 1], 2 * (i - 1), kwargs, "x0")[0]) / sig[i - 1]
            dt = sig[i] - sig[i - 1]
            y1 = y + dt * d0
            d1 = (y1 - self._evaluate(model, alp[i] * y1, tm[i], 2 * i - 1, kwargs, "x0")[0]) / sig[i]
            y = y + dt * 0.5 * (d0 + d1)
        return alp[n] * y
