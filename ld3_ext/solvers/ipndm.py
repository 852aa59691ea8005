"""iPNDM (Zhang & Chen 2023): Adams-Bashforth on the noise prediction with exponential integrator, orders 1-4."""
from __future__ import annotations

from ..coefficients import SolverSpec, check_flag
from .base import MultistepSolver


class IPNDM(MultistepSolver):
    """x_i = (alpha_i/alpha_{i-1}) x_{i-1} - sigma_i (e^{h_i} - 1) * AB_p(eps_{i-1}, eps_{i-2}, ...).

    Warm-up uses order min(i, K); as in LD3 there is no lower-order final step by default.
    Working on the noise prediction, it keeps less of a float16/bfloat16 state's precision than the
    data-prediction solvers on flow-matching models (README, "Half-precision states").
    """

    name = "ipndm"
    max_order = 4

    def __init__(self, order: int = 3, lower_order_final: bool = False, **kw):
        super().__init__(order, **kw)
        self.lower_order_final = check_flag("lower_order_final", lower_order_final)

    def spec(self) -> SolverSpec:
        return SolverSpec("ipndm", self.order, self.lower_order_final)

    def config(self):
        return {"name": self.name, "order": self.order, "lower_order_final": self.lower_order_final}
