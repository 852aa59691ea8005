"""Euler in data-prediction form (= DDIM, = DPM-Solver++ first order)."""
from __future__ import annotations

from ..coefficients import SolverSpec
from .base import MultistepSolver


class Euler(MultistepSolver):
    """x_i = (sigma_i/sigma_{i-1}) x_{i-1} + alpha_i (1 - e^{-h_i}) D_{i-1}; for EDM this is k-diffusion's Euler."""

    name = "euler"
    max_order = 1

    def __init__(self, **kw):
        # order is accepted (configs carry it) but must be Euler's own: any other would be silently dropped
        super().__init__(kw.pop("order", 1), **kw)

    def spec(self) -> SolverSpec:
        return SolverSpec("euler", 1, False)

    def config(self):
        return {"name": self.name, "order": 1}
