"""Memory layouts on the fused path.

The native kernels run in the layout of their ``x`` when it is dense (contiguous, channels_last, any dimension
order; ``csrc/dense_layout.h``) and read every other input that is laid out the same way in place; an input laid
out otherwise is copied into x's layout on every call.  A solver's history entry is read by up to three updates
(and by the reverse steps of the whole-sampler node), so a model output whose layout differs from the state's
(e.g. a network that returns contiguous tensors for a channels_last state) is converted once, when it enters
the history, instead of at every update that reads it.
"""
from __future__ import annotations

import torch

from .device_constants import tracing


def non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense in any dimension order, as ATen's ``is_non_overlapping_and_dense``."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t``, or one copy of it in ``like``'s layout when ``like`` is dense, has t's shape and device, and t is
    laid out otherwise (strides differ on a dimension of size > 1).  The copy is differentiable (``copy_``)."""
    if tracing():
        # strides may be symbolic there (dynamic shapes: the dense test's sort cannot be traced), and the traced
        # custom ops handle any layout themselves
        return t
    ts, ls = t.stride(), like.stride()
    if ts == ls or t.shape != like.shape or t.device != like.device:
        return t
    if all(a == b for a, b, n in zip(ts, ls, t.shape) if n != 1) or not non_overlapping_and_dense(like):
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def plain_grad(g: torch.Tensor) -> torch.Tensor:
    """An incoming gradient as the kernels can read it: a user's sparse (or mkldnn) ``grad_outputs`` made dense,
    a lazily negated view (``torch._neg_view``) resolved.  Both conversions are differentiable.  The C++ nodes
    do the same (python/plain_grad.h)."""
    if g is None:
        return g
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"plain_grad: g must be a tensor or None, got {type(g).__name__}")
    if g.layout != torch.strided:
        g = g.to_dense()
    return g.resolve_neg() if g.is_neg() else g


__all__ = ["non_overlapping_and_dense", "in_layout_of", "plain_grad"]
