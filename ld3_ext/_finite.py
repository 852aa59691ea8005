"""NaN/Inf checks of sample-sized tensors that read them once.

``torch.isfinite(t).all()`` is a composite op: ``abs``, two comparisons, a logical ``and`` and the
reduction, each a pass over memory with a bool temporary.  On the 2-core Xeon it took 441 us for one
64x3x32x32 float32 state against 11 us for ``t.sum()`` (``python benchmarks/bench_finite_check.py``):
more than the solver's own work for a step, and the model wrapper checks every network output.

* :func:`all_finite` (a Python bool, reads back): a NaN or an Inf makes any sum non-finite, and a sum of
  finite values is non-finite only when it overflows, so a finite ``sum()`` proves every element finite;
  only a non-finite sum (a bad value, or an overflow: large float16 tensors) pays the exact check.
* :func:`all_finite_tensor` (a 0-d bool tensor on ``t``'s device, no read-back, for deferred checks):
  ``aminmax`` in one pass -- both extremes are finite exactly when every element is (NaN propagates).
"""
from __future__ import annotations

import torch


# the dtypes with sum and aminmax kernels on every device; anything else (float8, complex32, ...) and any
# tensor subclass or non-strided layout (MaskedTensor, sparse) takes torch.isfinite, as before
_FAST_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _fast(t: torch.Tensor) -> bool:
    return type(t) in _PLAIN_TYPES and t.dtype in _FAST_DTYPES and t.layout == torch.strided and t.numel() > 0


def _exact(t: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(t)  # _fast(t): a non-empty real float tensor (aminmax refuses empty ones)
    return lo.isfinite() & hi.isfinite()


def _check_tensor(t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor to check for NaN/Inf, got {type(t).__name__}")
    return t.detach()


def all_finite(t: torch.Tensor) -> bool:
    """``bool(torch.isfinite(t).all())``, in one pass over ``t`` unless it holds a NaN/Inf or its sum overflows."""
    t = _check_tensor(t)
    if not _fast(t):
        return bool(torch.isfinite(t).all())
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(_exact(t))


def all_finite_tensor(t: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(t).all()`` as a 0-d bool tensor on ``t``'s device, without reading it back (one pass)."""
    t = _check_tensor(t)
    return _exact(t) if _fast(t) else torch.isfinite(t).all()
