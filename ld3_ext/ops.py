"""The two primitive operations every solver is built from, with a backend switch.

* ``coefficient_table(schedule, timesteps, spec, backend)`` -> [N, 2, 5] (see ``coefficients.py``)
* ``multistep_update(x, coef, history, backend)`` -> a*x + sum_k b_k*m_k

``backend="reference"`` is plain PyTorch autograd; ``backend="fused"`` uses the native kernels
(``ld3_ext.fused``) and falls back to the reference where the extension is missing or a case is
not covered natively (e.g. the ``VPDiscrete`` coefficient math).  ``backend="auto"`` picks fused
when the extension is available.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _native
from .coefficients import SolverSpec, coefficient_table_reference

BACKENDS = ("auto", "fused", "reference")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "fused" if _native.native_available() else "reference"
    if backend == "fused" and not _native.native_available():
        _native.warn_missing_once()
        return "reference"
    return backend


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def multistep_update_reference(x: torch.Tensor, coef: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
    """x_next = coef[0]*x + sum_k coef[1+k]*history[k], accumulated in the op-math dtype."""
    acc_t = _opmath(x.dtype)
    c = coef.to(acc_t)
    out = c[0] * x.to(acc_t)
    for k, m in enumerate(history):
        out = out + c[1 + k] * m.to(acc_t)
    return out.to(x.dtype)


def coefficient_table(schedule, timesteps: torch.Tensor, spec: SolverSpec, backend: str = "auto") -> torch.Tensor:
    """float64 coefficient table of the whole solve; differentiable w.r.t. ``timesteps``."""
    backend = resolve_backend(backend)
    t64 = timesteps.to(torch.float64)
    if backend == "fused" and schedule.native_spec() is not None:
        from . import fused
        return fused.coefficient_table(schedule, t64, spec)
    return coefficient_table_reference(schedule, t64, spec)


def multistep_update(x: torch.Tensor, coef: torch.Tensor, history: Sequence[torch.Tensor],
                     backend: str = "auto") -> torch.Tensor:
    backend = resolve_backend(backend)
    if backend == "fused":
        from . import fused
        return fused.multistep_update(x, coef, list(history))
    return multistep_update_reference(x, coef, history)


__all__ = ["coefficient_table", "multistep_update", "multistep_update_reference", "resolve_backend", "BACKENDS"]
