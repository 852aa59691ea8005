"""DPM-Solver++ multistep (Lu et al. 2022), data prediction, orders 1-3.

The coefficients (including the 3M ones) live in ``ld3_ext/coefficients.py::_dpmpp_row`` and, for the
native path, in ``csrc/solver_coefficients.h``.
"""
from __future__ import annotations

from ..coefficients import SolverSpec, check_flag
from .base import MultistepSolver


class DPMSolverPP(MultistepSolver):
    """DPM-Solver++(order M) on any float grid; exactly N network evaluations for N intervals.

    ``solver_type="midpoint"`` is the original second-order step (diffusers' default);
    ``"heun"`` matches k-diffusion's ``sample_dpmpp_3m_sde(eta=0)`` warm-up.
    ``lower_order_final`` lowers the order of the last steps (the last step is first order).
    """

    name = "dpmpp"
    max_order = 3

    def __init__(self, order: int = 3, lower_order_final: bool = True, solver_type: str = "midpoint", **kw):
        super().__init__(order, **kw)
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        self.lower_order_final = check_flag("lower_order_final", lower_order_final)
        self.solver_type = solver_type

    def spec(self) -> SolverSpec:
        return SolverSpec("dpmpp", self.order, self.lower_order_final, solver_type=self.solver_type)

    def config(self):
        return {"name": self.name, "order": self.order, "lower_order_final": self.lower_order_final,
                "solver_type": self.solver_type}
