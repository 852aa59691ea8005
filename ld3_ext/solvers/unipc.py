"""UniPC (Zhao et al. 2023): predictor UniP + corrector UniC, data prediction, B(h) = bh1 or bh2."""
from __future__ import annotations

from typing import List

import torch

from .. import adjoint, ops
from ..coefficients import SolverSpec, check_flag, step_orders
from ..wrappers import OutputLedger
from .base import MultistepSolver, table_rows


class UniPC(MultistepSolver):
    """UniPC-p on any float grid with exactly N network evaluations.

    The corrector of step i reuses the network output at the predictor point (which also enters
    the history), so it costs no extra evaluation; the last step has no corrector.
    """

    name = "unipc"
    max_order = 3

    def __init__(self, order: int = 3, variant: str = "bh1", lower_order_final: bool = True,
                 use_corrector: bool = True, **kw):
        super().__init__(order, **kw)
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
        self.variant = variant
        self.lower_order_final = check_flag("lower_order_final", lower_order_final)
        self.use_corrector = check_flag("use_corrector", use_corrector)

    def spec(self) -> SolverSpec:
        return SolverSpec("unipc", self.order, self.lower_order_final, variant=self.variant,
                          use_corrector=self.use_corrector)

    def config(self):
        return {"name": self.name, "order": self.order, "variant": self.variant,
                "lower_order_final": self.lower_order_final, "use_corrector": self.use_corrector}

    def _solve(self, model, x, t, tm, kwargs):
        spec = self.spec()
        n = t.numel() - 1
        coef = ops.coefficient_table(model.schedule, t, spec, self.backend, validate=False)  # sample() checked t
        orders = step_orders(spec, n)
        first = None  # step 0's evaluation, made once for whichever path runs
        if ops.resolve_backend(self.backend) == "fused" and adjoint.applicable(x, coef, tm):
            # one autograd node for the whole solve (ld3_ext/adjoint.py): with the corrector, UniPC
            # is a multistep recursion on its predictor states with combined coefficients
            table, eff_orders = adjoint.unipc_as_multistep(coef, orders) if self.use_corrector \
                else (coef, orders)
            # the forward in the loop's own arithmetic below (predictor, then corrector): bitwise the same sample
            forward_step = adjoint.unipc_forward_step(coef, orders) if self.use_corrector else None

            def evaluate(xx, tt, step):
                return model.predict(xx, tt, step=step, returns="x0", **kwargs)[0]
            first = self._evaluate(model, x, tm[0], 0, kwargs, "x0")[0]
            try:
                return adjoint.whole_sampler(evaluate, eff_orders, max(eff_orders), self.checkpoint_model, x,
                                             table, tm, self._backward_checks(model, x), first=first,
                                             forward_step=forward_step, check_outputs=model._fresh_checks_on())
            except adjoint.ForeignGradients:
                forward_step = table = None  # the closure holds a state: not kept through the loop below
        entry = self._history_entry_fn()
        if first is None:
            first = self._evaluate(model, x, tm[0], 0, kwargs, "x0")[0]
        history: List[torch.Tensor] = [entry(first, x)]
        ledger = OutputLedger(model._fresh_checks_on(), saved=history)
        predictor, corrector = table_rows(coef, 0), table_rows(coef, 1)
        for i in range(1, n + 1):
            p = orders[i - 1]
            x_pred = ops.multistep_update(x, predictor[i - 1], history[:p], self.backend)
            if i == n:
                return x_pred
            d_new = entry(self._evaluate(model, x_pred, tm[i], i, kwargs, "x0")[0], x_pred)
            # without a backward: the corrector reads the p earlier outputs (and the next predictor those it keeps)
            ledger.admit(d_new, i, x_pred, coef, history[:p] if self.use_corrector else history[:orders[i] - 1])
            if self.use_corrector:
                x = ops.multistep_update(x, corrector[i - 1], [d_new] + history[:p], self.backend)
            else:
                x = x_pred
            history.insert(0, d_new)
            del history[spec.order:]
        return x
