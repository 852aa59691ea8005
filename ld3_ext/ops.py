"""The two primitive operations every solver is built from, with a backend switch.

* ``coefficient_table(schedule, timesteps, spec, backend)`` -> [N, 2, 5] (see ``coefficients.py``)
* ``multistep_update(x, coef, history, backend)`` -> a*x + sum_k b_k*m_k

``backend="reference"`` is plain PyTorch autograd; ``backend="fused"`` uses the native kernels
(``ld3_ext.fused``) and falls back to the reference where the extension is missing or a case is
not covered natively (e.g. the ``VPDiscrete`` coefficient math).  ``backend="auto"`` picks fused
when the extension is available.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as _fwad

from . import _native
from .device_constants import capturing, func_transform_active, tracing  # noqa: F401  (solvers call ops.func_transform_active)
from .coefficients import MAX_HISTORY, TABLE_WIDTH, SolverSpec, coefficient_table_reference
from .schedules import NoiseSchedule

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

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


# ----------------------------------------------------------------------------------------------
# argument checks shared by both backends: a clear exception naming the argument
# (the native extension re-checks everything with TORCH_CHECK)
# ----------------------------------------------------------------------------------------------
def as_history(history) -> list:
    """``history`` as a list (the caller's own list as is: it is only read), or a TypeError naming it."""
    if type(history) is list:
        return history
    if isinstance(history, torch.Tensor) or history is None:
        raise TypeError(f"multistep_update: history must be a sequence of tensors, got "
                        f"{type(history).__name__}")
    try:
        return list(history)
    except TypeError:
        raise TypeError(f"multistep_update: history must be a sequence of tensors, got "
                        f"{type(history).__name__}") from None


def _layout_text(t: torch.Tensor) -> str:
    return "a nested tensor" if t.is_nested else f"layout {t.layout}"


def check_update_args(x, coef, history) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"multistep_update: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"multistep_update: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.layout != torch.strided or x.is_nested:  # a nested tensor reports the strided layout
        raise TypeError(f"multistep_update: x must be a dense (strided) tensor, got {_layout_text(x)}")
    if len(history) > MAX_HISTORY:
        raise ValueError(f"multistep_update: history holds {len(history)} tensors, at most {MAX_HISTORY} are supported")
    for k, m in enumerate(history):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"multistep_update: history[{k}] must be a torch.Tensor, got {type(m).__name__}")
        if m.layout != torch.strided or m.is_nested:  # before the shape: a nested tensor has none
            raise TypeError(f"multistep_update: history[{k}] must be a dense (strided) tensor, got {_layout_text(m)}")
        if m.dtype != x.dtype:
            raise TypeError(f"multistep_update: history[{k}] has dtype {m.dtype} but x has dtype {x.dtype}")
        if m.device != x.device:
            raise ValueError(f"multistep_update: history[{k}] is on {m.device} but x is on {x.device}")
        if m.shape != x.shape:
            raise ValueError(f"multistep_update: history[{k}] has shape {tuple(m.shape)} but x has shape {tuple(x.shape)}")
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"multistep_update: coef must be a torch.Tensor, got {type(coef).__name__}")
    if not coef.is_floating_point():
        raise TypeError(f"multistep_update: coef must be a floating tensor (float64), got {coef.dtype}")
    if coef.device != x.device:
        raise ValueError(f"multistep_update: coef is on {coef.device} but x is on {x.device}")
    if coef.dim() != 1 or not (1 + len(history) <= coef.shape[0] <= TABLE_WIDTH):
        raise ValueError(f"multistep_update: coef must be 1-D with between 1 + len(history) = {1 + len(history)} "
                         f"and {TABLE_WIDTH} entries, got shape {tuple(coef.shape)}")


def check_table_args(schedule, timesteps, spec) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"coefficient_table: schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if not isinstance(spec, SolverSpec):
        raise TypeError(f"coefficient_table: spec must be a SolverSpec, got {type(spec).__name__}")
    if not isinstance(timesteps, torch.Tensor):
        raise ValueError(f"coefficient_table: timesteps must be a 1-D tensor with at least 2 entries, got "
                         f"{type(timesteps).__name__}")
    if timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"coefficient_table: timesteps must be real numbers, got {timesteps.dtype}")
    if timesteps.layout != torch.strided or timesteps.is_nested:  # no values to read back or index
        raise TypeError(f"coefficient_table: timesteps must be a dense (strided) tensor, got {_layout_text(timesteps)}")
    if timesteps.dim() != 1 or timesteps.shape[0] < 2:
        raise ValueError(f"coefficient_table: timesteps must be a 1-D tensor with at least 2 entries, got shape "
                         f"{tuple(timesteps.shape)}")


def check_grid(schedule, timesteps: torch.Tensor, in_range: bool = True, spec: Optional[SolverSpec] = None,
               lambda_dtype: torch.dtype = torch.float64) -> None:
    """The solvers' grid rules (``solvers.base.validate_timesteps``): strictly decreasing, finite and in the
    schedule's range -- a table on any other grid amplifies or is NaN.  ``in_range=False`` (the low-level
    tables, ``fused.coefficient_table`` and ``coefficient_table_reference``) asks only for times where the
    schedule is defined (alpha, sigma > 0): their gradchecks step just past t_min/t_max.  Skipped while
    compiling, capturing a CUDA graph or for a vmapped grid (nothing can be read back there)."""
    from .solvers.base import validate_timesteps
    # nothing can be read back while compiling, capturing (a CUDA grid), or from a vmapped grid
    if tracing() or _vmapped(timesteps) \
            or (timesteps.is_cuda and capturing()):
        return
    if not timesteps.is_floating_point():  # an integer grid is read as float64, as the table does
        timesteps = timesteps.to(torch.float64)
    validate_timesteps(schedule, timesteps, name="coefficient_table: timesteps", check_range=in_range, spec=spec,
                       lambda_dtype=lambda_dtype)


def composite_only(*tensors) -> bool:
    """True where the native kernels cannot serve: forward-mode AD is on (they carry no tangents), a
    torch.func transform (vmap, grad, jvp) is active (autograd.Function.apply refuses our Functions there,
    whether or not their inputs are wrapped, e.g. a plain grid while vmap maps x_T) or wrapped an input
    (no storage to read).  The reference's plain torch ops handle all of them."""
    if tracing():
        # traced: the custom ops serve, except inside a traced torch.func transform (they have no batching rule)
        # or under forward-mode AD (they have no forward formula: a compiled graph dropped the tangent, or kept a
        # wrong one); the wrapped-tensor call below would break the graph.  Dynamo guards on the level
        return func_transform_active() or getattr(_fwad, "_current_level", -1) >= 0
    if getattr(_fwad, "_current_level", -1) >= 0 or func_transform_active():
        return True
    return any(isinstance(t, torch.Tensor) and _wrapped(t) for t in tensors)


def _wrapped(t: torch.Tensor) -> bool:
    """Wrapped by a torch.func transform, or a legacy batched tensor (the grads a Function's backward gets under
    ``autograd.grad(..., is_grads_batched=True)``): no storage for a kernel to read."""
    return (_is_wrapped is not None and _is_wrapped(t)) or (_is_legacy_batched is not None and _is_legacy_batched(t))


def _vmapped(t) -> bool:
    """Batched by torch.func.vmap at some level of the transforms wrapping ``t`` (vmap(grad(...)) too): it
    holds one value per mapped sample, so its values cannot be read back (bool() and .tolist() raise) and
    value checks skip it.  Under grad/jvp alone values read back as usual: the checks run there."""
    if _functorch is None or not isinstance(t, torch.Tensor):
        return False
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


_functorch = getattr(torch._C, "_functorch", None)
_is_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", None)
_is_legacy_batched = getattr(_functorch, "is_legacy_batchedtensor", None)


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


def coefficient_table(schedule, timesteps: torch.Tensor, spec: SolverSpec, backend: str = "auto", *,
                      validate: bool = True) -> torch.Tensor:
    """float64 coefficient table of the whole solve; differentiable w.r.t. ``timesteps``.

    The grid must follow the solvers' rules (strictly decreasing, finite, in the schedule's range), else
    ``ValueError`` naming timesteps.  ``validate=False`` skips those value checks (one read-back of the
    grid): the solvers pass it, having validated the grid in ``sample()`` already."""
    check_table_args(schedule, timesteps, spec)
    backend = resolve_backend(backend)
    if validate:
        check_grid(schedule, timesteps, spec=spec)
    t64 = timesteps if timesteps.dtype == torch.float64 else timesteps.to(torch.float64)
    if backend == "fused":
        from . import fused
        return fused._table_checked(schedule, t64, spec)  # the checks above are the ones it would make
    return coefficient_table_reference(schedule, t64, spec, validate=False)


def multistep_update(x: torch.Tensor, coef: torch.Tensor, history: Sequence[torch.Tensor],
                     backend: str = "auto") -> torch.Tensor:
    backend = resolve_backend(backend)
    if backend == "fused":
        from . import fused
        return fused.multistep_update(x, coef, history)  # checks its arguments itself
    history = as_history(history)
    check_update_args(x, coef, history)
    return multistep_update_reference(x, coef, history)


__all__ = ["coefficient_table", "multistep_update", "multistep_update_reference", "resolve_backend", "BACKENDS"]
