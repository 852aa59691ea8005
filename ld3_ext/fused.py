"""Autograd Functions over the native kernels of ``ld3_ext._C`` (the ``backend="fused"`` path).

* ``coefficient_table(schedule, t64, spec)`` -- the [N, 2, 5] float64 table of ``coefficients.py``
  computed in C++ together with its Jacobian w.r.t. t_{i-3..i}; backward is grad_t = J^T g.
* ``multistep_update(x, coef, history, out=None)`` -- a*x + sum_k b_k m_k in one pass; backward
  gives grad_x, grad_history and the float64 coefficient gradient in one more pass.

Eager calls go straight to the pybind11 functions (~2 us a call, against ~10 us through
``torch.ops``); the same kernels are also registered as ``torch.ops.ld3_ext.*`` custom ops with
fake implementations and autograd, which is what ``torch.compile`` traces.  An eager update that records
gradients gets the C++ autograd node ``_C.multistep_update_autograd`` (python/update_autograd.cpp);
``_MultistepUpdate`` below is the same node in Python, kept as its reference (tests compare them bitwise);
likewise the table's C++ node ``_C.coefficient_table_autograd`` (python/table_autograd.cpp) and ``_CoefficientTable``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as _fwad

from . import _native
from .device_constants import tracing
from .coefficients import MAX_HISTORY, SOLVER_IDS, TABLE_WIDTH, SolverSpec, coefficient_table_reference
from .layout import in_layout_of, plain_grad
from .ops import _opmath, as_history, check_grid, check_table_args, check_update_args as _check_update, \
    composite_only, multistep_update_reference

_C = _native._C


def _lib():
    if _C is None:
        raise RuntimeError(f"ld3_ext.fused needs the native extension ld3_ext._C: {_native.load_error()}")
    return _C


def _device_supported(device: torch.device) -> bool:
    return device.type == "cpu" or _native.native_runs_on(device)


# ----------------------------------------------------------------------------------------------
# eager autograd Functions (pybind11 calls)
# ----------------------------------------------------------------------------------------------
class _MultistepUpdate(torch.autograd.Function):
    """The reference of the C++ node that eager calls record (python/update_autograd.cpp): same saved tensors,
    same kernels, same double-backward composition."""

    @staticmethod
    def forward(ctx, x, coef, *history):
        ctx.save_for_backward(x, coef, *history)
        return _C.multistep_update(x, coef, list(history))

    @staticmethod
    def backward(ctx, grad):
        x, coef, *history = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad = plain_grad(grad)  # a user's sparse or negated-view grad_outputs
        # create_graph=True (the gradient must itself be differentiable), or a grad wrapped by a torch.func
        # transform (is_grads_batched): the torch composition
        if torch.is_grad_enabled() or composite_only(grad):
            return _update_backward_reference(grad, x, coef, history, needs)
        need_hist = any(needs[2:])
        # a grad laid out otherwise than x (and its history): one copy of it, not one of x and each history term
        grad = in_layout_of(grad, x)
        gx, gc, gms = _C.multistep_update_backward(grad, x, coef, history, needs[0], needs[1], need_hist)
        ghist = [gms[k] if (need_hist and needs[2 + k]) else None for k in range(len(history))]
        return (gx, gc, *ghist)


def _update_backward_reference(grad, x, coef, history, needs):
    """The backward of a*x + sum_k b_k m_k in differentiable torch ops (double backward, e.g. a Hessian-vector
    product): grad_x = a g, grad_m_k = b_k g, grad_coef = [<g, x>, <g, m_k>, 0...] in float64."""
    acc = _opmath(x.dtype)
    g = grad.to(acc)
    c = coef.to(acc)
    gx = (c[0] * g).to(x.dtype) if needs[0] else None
    gc = None
    if needs[1]:
        dots = [(g.double() * x.double()).sum()] + [(g.double() * m.double()).sum() for m in history]
        gc = torch.cat([torch.stack(dots), coef.new_zeros(coef.shape[0] - len(dots))]).to(coef.dtype)
    ghist = [(c[1 + k] * g).to(m.dtype) if needs[2 + k] else None for k, m in enumerate(history)]
    return (gx, gc, *ghist)


class _CoefficientTable(torch.autograd.Function):
    """Reference of the C++ table node ``_C.coefficient_table_autograd`` (python/table_autograd.cpp)."""

    @staticmethod
    def forward(ctx, t64, args, schedule, spec):
        table, jac = _C.coefficient_table(t64, *args)
        ctx.save_for_backward(jac, t64)
        ctx.schedule, ctx.spec = schedule, spec
        return table

    @staticmethod
    def backward(ctx, grad_table):
        jac, t64 = ctx.saved_tensors
        grad_table = plain_grad(grad_table)
        if torch.is_grad_enabled() or composite_only(grad_table):
            # create_graph=True: J^T g with a constant J would lose d(grad_t)/dt; the reference table's VJP
            # keeps every second-order term (and reads a grad wrapped by a torch.func transform)
            return _reference_vjp(ctx.schedule, t64, ctx.spec, grad_table), None, None, None
        # grad_t = J^T g, gathered per t_k in C++ (one call instead of a dozen tiny ops)
        return _C.coefficient_table_backward(jac, grad_table), None, None, None


def _table_vjp_create_graph(t64, grad_table, kind, p0, p1, solver, order, lower_order_final, heun, bh2,
                            use_corrector) -> torch.Tensor:
    """The C++ table node's backward under create_graph=True (and for a batched grad): the reference table's VJP.

    The node keeps only the native arguments, so the schedule and spec are rebuilt from them: the schedule
    the C++ code computes (``native_spec`` names its formula and both parameters), on the grid's own range."""
    vals = t64.detach().tolist()
    schedule = _native_schedule(kind, p0, p1, min(vals), max(vals))
    spec = SolverSpec(_SOLVER_NAMES[solver], order=order, lower_order_final=lower_order_final,
                      solver_type="heun" if heun else "midpoint", variant="bh2" if bh2 else "bh1",
                      use_corrector=use_corrector)
    return _reference_vjp(schedule, t64, spec, grad_table)


def _reference_vjp(schedule, t64, spec, grad_table) -> torch.Tensor:
    """grad_t of the reference table: differentiable when grad mode is on (create_graph=True), plain otherwise
    (a batched grad of is_grads_batched reaches here with grad mode off)."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        ref = coefficient_table_reference(schedule, t64, spec, validate=False)
        (gt,) = torch.autograd.grad(ref, t64, grad_table, create_graph=create, allow_unused=True)
    return torch.zeros_like(t64) if gt is None else gt


_SOLVER_NAMES = {v: k for k, v in SOLVER_IDS.items()}


def _native_schedule(kind: int, p0: float, p1: float, t_lo: float, t_hi: float):
    """The schedule of native kind ``kind`` with parameters p0, p1 on [t_lo, t_hi] (the grid's range: the
    coefficients do not depend on the range, but the constructors check that the schedule is defined on it, and
    a default range need not be, e.g. VPLinear's t_max = 1 with beta_max = 5000)."""
    from . import schedules as S
    if kind == S.KIND_EDM:
        make = lambda **r: S.EDM(**({"sigma_min": r["t_min"], "sigma_max": r["t_max"]} if r else {}))  # noqa: E731
    elif kind == S.KIND_VP_LINEAR:
        make = lambda **r: S.VPLinear(beta_min=p0, beta_max=p1, **r)  # noqa: E731
    elif kind == S.KIND_VP_COSINE:
        make = lambda **r: S.VPCosine(s=p0, **r)  # noqa: E731
    elif kind == S.KIND_FLOW:
        make = lambda **r: S.FlowMatching(**r)  # noqa: E731
    else:
        raise ValueError(f"coefficient_table: unknown native schedule kind {kind}")
    try:
        return make(t_min=t_lo, t_max=t_hi)
    except ValueError as on_range:
        # a grid the forward takes (the schedule is defined there: VPLinear at t < 0) but the constructor's range
        # refuses (0 < t_min): its default range; the reference table is evaluated unchecked (validate=False)
        try:
            return make()
        except ValueError:
            raise ValueError(f"coefficient_table: the second derivative (create_graph=True) rebuilds the schedule on "
                             f"the grid's range [{t_lo}, {t_hi}] of timesteps, which it refuses: {on_range}") from None


def _table_args(native, spec: SolverSpec) -> tuple:
    kind, (p0, p1) = native  # schedule.native_spec()
    return (int(kind), float(p0), float(p1), SOLVER_IDS[spec.kind], int(spec.order), bool(spec.lower_order_final),
            spec.solver_type == "heun", spec.variant == "bh2", bool(spec.has_corrector))


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def coefficient_table(schedule, t64: torch.Tensor, spec: SolverSpec, *, validate: bool = True) -> torch.Tensor:
    """[N, 2, 5] float64 coefficient table (see ``coefficients.py``), differentiable w.r.t. ``t64``.

    The grid must be strictly decreasing, finite and where the schedule is defined (``ops.check_grid``), else
    ``ValueError`` naming timesteps; ``validate=False`` skips these value checks (they read the grid back),
    for callers that checked the grid already (``ops.coefficient_table``, the solvers)."""
    check_table_args(schedule, t64, spec)
    if schedule.native_spec() is None:
        raise ValueError(f"coefficient_table: schedule {type(schedule).__name__} has no native form "
                         "(use backend='reference')")
    if validate:
        check_grid(schedule, t64, in_range=False, spec=spec)
    return _table_checked(schedule, t64, spec)


def _table_checked(schedule, t64: torch.Tensor, spec: SolverSpec) -> torch.Tensor:
    """coefficient_table after its argument checks (``ops.coefficient_table`` made them already); the
    reference table where the schedule has no native form (e.g. ``VPDiscrete``)."""
    if t64.dtype != torch.float64:
        t64 = t64.to(torch.float64)
    if not tracing() and t64.is_neg():
        # the kernels read raw storage: a lazily negated grid is resolved (a copy), as torch ops do (a trace
        # cannot ask is_neg(); the traced custom op's inputs are functionalised)
        t64 = t64.resolve_neg()
    native = schedule.native_spec()
    if native is None or not _device_supported(t64.device) or composite_only(t64):
        return coefficient_table_reference(schedule, t64, spec, validate=False)
    _lib()
    args = _table_args(native, spec)
    if tracing():
        return torch.ops.ld3_ext.coefficient_table(t64, *args)[0]
    if torch.is_grad_enabled() and t64.requires_grad:
        # the same node as _CoefficientTable, built in C++ (python/table_autograd.cpp): cold Python
        # Function work cost more than the table's own math in a training step
        return _C.coefficient_table_autograd(t64, *args)
    return _C.coefficient_table(t64, *args)[0]


def multistep_update(x: torch.Tensor, coef: torch.Tensor, history: Sequence[torch.Tensor],
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a*x + sum_k b_k*history[k] with coef = [a, b_0, ...]; ``out`` (may be ``x``) needs no autograd.

    The result has x's memory layout when x is dense (e.g. channels_last), as the eager ops' result does;
    inputs laid out like x are read in place, others through a copy in x's layout."""
    history = as_history(history)
    if _C is not None and type(coef) is torch.Tensor and coef.dtype == torch.float64 \
            and type(x) is torch.Tensor and (x.is_cpu or _native.native_runs_on(x.device)) \
            and getattr(_fwad, "_current_level", -1) < 0 and not tracing():
        # the common call: the extension checks every argument itself (TORCH_CHECK); the Python
        # checks below, which cost more than a small update, run only to name a failure precisely
        failure = None
        try:
            if out is None:
                return _update_eager(x, coef, history)
            # a dense out only: the kernel refuses a stride-0 one, but an as_strided out whose elements overlap
            # (torch: "too hard to tell") it would write through; _check_out below decides those
            if type(out) is torch.Tensor and not _records_grad(x, coef, history) and _dense(out):
                return _C.multistep_update(x, coef, history, out)
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
            failure = exc
        if failure is not None and not _lazily_negated(x, coef, history):  # (raised outside the except block)
            _check_update(x, coef, history)
            if composite_only(x, coef, *history, out):  # a torch.func transform's wrapped tensors
                return _reference_update(x, coef, history, out)
            if out is not None:
                _check_out(x, coef, history, out)
            raise failure
        # otherwise (an out= the fast path does not take, a lazily negated input) the checks below run once
    _check_update(x, coef, history)
    if _lazily_negated(x, coef, history):
        # the kernels read raw storage, where torch._neg_view(t) and z.conj().imag keep the values unnegated:
        # resolved here (a differentiable copy), as torch's own ops do.  An out= of that kind stays refused
        # (writing into a copy would leave it unchanged)
        x, coef = x.resolve_neg(), coef.resolve_neg()
        history = [m.resolve_neg() for m in history]
    if coef.dtype != torch.float64:
        coef = coef.to(torch.float64)
    if not _device_supported(x.device) or composite_only(x, coef, *history, out):
        return _reference_update(x, coef, history, out)
    _lib()
    if out is not None:
        _check_out(x, coef, history, out)
        if tracing():  # the pybind function cannot be traced: the custom op can
            return out.copy_(torch.ops.ld3_ext.multistep_update(x, coef, history))
        return _C.multistep_update(x, coef, history, out)
    if tracing():
        return torch.ops.ld3_ext.multistep_update(x, coef, history)
    return _update_eager(x, coef, history)


def _lazily_negated(x, coef, history) -> bool:
    if tracing():  # a trace cannot ask is_neg(); the traced custom op's inputs are functionalised
        return False
    return any(isinstance(t, torch.Tensor) and t.is_neg() for t in (x, coef, *history))


def _reference_update(x, coef, history, out):
    if out is not None:
        _check_out(x, coef, history, out)
    res = multistep_update_reference(x, coef, history)
    return res if out is None else out.copy_(res)


def _records_grad(x, coef, history) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or coef.requires_grad or any(m.requires_grad for m in history))


def _check_out(x, coef, history, out) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"multistep_update: out must be a torch.Tensor, got {type(out).__name__}")
    if _records_grad(x, coef, history):
        raise RuntimeError("multistep_update: out= is not supported when gradients are required")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError("multistep_update: out must match x in shape, dtype and device")
    # e.g. an expand()ed out: torch's own memory-overlap error names no argument.  A torch.func transform's
    # wrapped out (vmap): torch's overlap test has no batching rule, so the tensor underneath the wrappers (every
    # mapped sample's out at once) is tested -- out.copy_ lets an as_strided one whose samples collide through
    if out.layout == torch.strided and not tracing() and _self_overlapping(_underlying(out)):
        raise OutOverlapError(f"multistep_update: out has elements that overlap or may overlap (share one memory "
                              f"location: strides {out.stride()} for shape {tuple(out.shape)}, e.g. an expand()ed or "
                              f"as_strided tensor); pass a tensor with distinct elements, e.g. torch.empty_like(x)")


def _underlying(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its torch.func transform wrappers (vmap's batched tensor: all its samples in one tensor)."""
    from .ops import _functorch, _is_wrapped
    while _is_wrapped is not None and _is_wrapped(t):
        t = _functorch.get_unwrapped(t)
    return t


class OutOverlapError(ValueError, RuntimeError):
    """A bad ``out=`` argument; a RuntimeError too, as torch's own memory-overlap error (which it replaces) is."""


# torch's own overlap test (torch._debug_has_internal_overlap; torch._C's in older releases)
_has_internal_overlap = (getattr(torch, "_debug_has_internal_overlap", None)
                         or getattr(torch._C, "_debug_has_internal_overlap", None))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (contiguous in some order of its dimensions), by torch's own test."""
    return _has_internal_overlap is not None and _has_internal_overlap(t) == 0


def _self_overlapping(t: torch.Tensor) -> bool:
    """Some two elements of ``t`` may share memory.  torch answers 1 (they do: a stride 0) or 2 (too hard to
    tell: any layout that is not dense); for 2 the strides decide, as torch's own ops do not (an as_strided out
    with rows overlapping came back silently wrong)."""
    status = _has_internal_overlap(t) if _has_internal_overlap is not None else 2
    if status != 2:
        return status == 1
    return not _surely_disjoint(t)


def _surely_disjoint(t: torch.Tensor) -> bool:
    """Each stride, in increasing order, steps past everything the smaller ones reach: no two elements meet.  A
    sufficient test (a slice such as big[:, ::2] passes); a layout it cannot clear is refused, never guessed."""
    if t.numel() == 0:
        return True
    reach = 0
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def _update_eager(x, coef, history):
    if not _records_grad(x, coef, history):
        return _C.multistep_update(x, coef, history)  # nothing to record: skip the Function overhead
    # the same node as _MultistepUpdate, built in C++ (python/update_autograd.cpp): after a kernel has swept
    # the caches, the Python Function's own work runs cold and cost ~60 us more a forward+backward
    return _C.multistep_update_autograd(x, coef, history)


# ----------------------------------------------------------------------------------------------
# torch.library registration (what torch.compile traces); eager code above bypasses it
# ----------------------------------------------------------------------------------------------
def _register_ops() -> None:
    lib = "ld3_ext"

    @torch.library.custom_op(f"{lib}::multistep_update", mutates_args=())
    def _update_op(x: torch.Tensor, coef: torch.Tensor, history: List[torch.Tensor]) -> torch.Tensor:
        return _C.multistep_update(x, coef, history)

    # the fake kernels are also the meta kernels: a call mixing a meta tensor with real ones reaches them, and
    # without this check it returned x's empty_like (uninitialised memory) as the result
    def _one_device(op: str, **tensors) -> None:
        first_name, first = next(iter(tensors.items()))
        for name, t in tensors.items():
            for i, u in enumerate(t if isinstance(t, (list, tuple)) else [t]):
                if u.device != first.device:
                    where = f"{name}[{i}]" if isinstance(t, (list, tuple)) else name
                    raise RuntimeError(f"ld3_ext::{op}: {where} is on {u.device} but {first_name} is on "
                                       f"{first.device}")

    # and the kernels' argument checks (csrc/cpu/checks.cpp), which a fake or meta call never reaches: without them
    # a traced call on mismatched inputs "succeeded" with made-up shapes, to fail later or not at all (fuzz audit)
    def _update_args(op: str, x, coef, history) -> None:
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise RuntimeError(f"ld3_ext::{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if len(history) > MAX_HISTORY:
            raise RuntimeError(f"ld3_ext::{op}: history holds {len(history)} tensors, at most {MAX_HISTORY}")
        for k, m in enumerate(history):
            if m.dtype != x.dtype or m.shape != x.shape:
                raise RuntimeError(f"ld3_ext::{op}: history[{k}] is {m.dtype} of shape {tuple(m.shape)} but x is "
                                   f"{x.dtype} of shape {tuple(x.shape)}")
        if coef.dtype != torch.float64 or coef.dim() != 1 or not 1 + len(history) <= coef.shape[0] <= TABLE_WIDTH:
            raise RuntimeError(f"ld3_ext::{op}: coef must be 1-D float64 with 1 + len(history) = {1 + len(history)} "
                               f"to {TABLE_WIDTH} entries, got {coef.dtype} of shape {tuple(coef.shape)}")

    @_update_op.register_fake
    def _(x, coef, history):
        _one_device("multistep_update", x=x, coef=coef, history=history)
        _update_args("multistep_update", x, coef, history)
        return torch.empty_like(x)  # the kernel's output takes x's layout (csrc/dense_layout.h)

    @torch.library.custom_op(f"{lib}::multistep_update_backward", mutates_args=())
    def _update_bwd_op(grad: torch.Tensor, x: torch.Tensor, coef: torch.Tensor,
                       history: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        gx, gc, gms = _C.multistep_update_backward(grad, x, coef, history, True, True, True)
        return gx, gc, list(gms)

    @_update_bwd_op.register_fake
    def _(grad, x, coef, history):
        _one_device("multistep_update_backward", grad=grad, x=x, coef=coef, history=history)
        _update_args("multistep_update_backward", x, coef, history)
        if grad.dtype != x.dtype or grad.shape != x.shape:
            raise RuntimeError(f"ld3_ext::multistep_update_backward: grad is {grad.dtype} of shape "
                               f"{tuple(grad.shape)} but x is {x.dtype} of shape {tuple(x.shape)}")

        def like_grad():  # the kernel's grads take grad's layout (csrc/dense_layout.h)
            return torch.empty_like(grad)
        return like_grad(), torch.empty(coef.shape, dtype=coef.dtype, device=coef.device), \
            [like_grad() for _ in history]

    def _update_setup(ctx, inputs, output):
        x, coef, history = inputs
        ctx.save_for_backward(x, coef, *history)

    def _update_backward(ctx, grad):
        x, coef, *history = ctx.saved_tensors
        gx, gc, gms = torch.ops.ld3_ext.multistep_update_backward(plain_grad(grad), x, coef, history)
        return gx, gc, list(gms)

    _update_op.register_autograd(_update_backward, setup_context=_update_setup)

    @torch.library.custom_op(f"{lib}::coefficient_table", mutates_args=())
    def _table_op(t: torch.Tensor, schedule_kind: int, p0: float, p1: float, solver: int, order: int,
                  lower_order_final: bool, heun: bool, bh2: bool,
                  use_corrector: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        return _C.coefficient_table(t, schedule_kind, p0, p1, solver, order, lower_order_final, heun, bh2,
                                    use_corrector)

    @_table_op.register_fake
    def _(t, schedule_kind, p0, p1, solver, order, lower_order_final, heun, bh2, use_corrector):
        if t.dtype != torch.float64 or t.dim() != 1 or t.shape[0] < 2:
            raise RuntimeError(f"ld3_ext::coefficient_table: timesteps must be a 1-D float64 tensor with at least 2 "
                               f"entries, got {t.dtype} of shape {tuple(t.shape)}")
        if not (0 <= schedule_kind <= 3 and 0 <= solver <= 3 and 1 <= order <= (1, 3, 3, 4)[solver]):
            raise RuntimeError(f"ld3_ext::coefficient_table: schedule kind {schedule_kind}, solver id {solver} and "
                               f"order {order}: kinds are 0..3, solver ids 0..3, orders 1..1/3/3/4 by solver")
        n = t.shape[0] - 1
        return (t.new_empty((n, 2, TABLE_WIDTH)), t.new_empty((n, 2, TABLE_WIDTH, 4)))

    # t is not read: it is an argument so that a compiled graph keeps the grid for its backward, and AOT autograd
    # then refuses a double backward; with only jac saved it took this gradient for a constant of t, and a
    # compiled Hessian-vector product came out as zeros
    @torch.library.custom_op(f"{lib}::coefficient_table_backward", mutates_args=())
    def _table_bwd_op(jac: torch.Tensor, grad_table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _C.coefficient_table_backward(jac, grad_table)

    @_table_bwd_op.register_fake
    def _(jac, grad_table, t):
        _one_device("coefficient_table_backward", jac=jac, grad_table=grad_table, t=t)
        if jac.dtype != torch.float64 or jac.dim() != 4 or tuple(jac.shape[1:]) != (2, TABLE_WIDTH, 4) or \
                grad_table.dim() != 3 or tuple(grad_table.shape) != tuple(jac.shape[:3]):
            raise RuntimeError(f"ld3_ext::coefficient_table_backward: jac must be float64 [N, 2, {TABLE_WIDTH}, 4] and "
                               f"grad_table [N, 2, {TABLE_WIDTH}], got {tuple(jac.shape)} and "
                               f"{tuple(grad_table.shape)}")
        return jac.new_empty((jac.shape[0] + 1,))

    def _table_bwd_backward(ctx, grad_t):
        # J^T g with a constant J has no d/dt (the table's second derivatives): refused, not zeros (eager calls
        # record the C++ node, whose create_graph path is exact)
        raise RuntimeError("ld3_ext: second derivatives of the fused coefficient table are not available under "
                           "torch.compile; differentiate twice in eager mode, or use backend='reference'")

    _table_bwd_op.register_autograd(_table_bwd_backward, setup_context=lambda ctx, inputs, output: None)

    def _table_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1], inputs[0])
        # the Jacobian is data for the backward, not a differentiable result (its own d/dt, the table's second
        # derivatives, is not computed): marked so, instead of a requires_grad output whose gradient was zeros
        ctx.mark_non_differentiable(output[1])

    def _table_backward(ctx, grad_table, grad_jac):
        jac, t = ctx.saved_tensors
        if grad_table is None:
            grad_table = torch.zeros_like(jac[..., 0])
        grad_table = plain_grad(grad_table)
        return (torch.ops.ld3_ext.coefficient_table_backward(jac, grad_table, t),) + (None,) * 9

    _table_op.register_autograd(_table_backward, setup_context=_table_setup)


if _C is not None and not hasattr(torch.ops.ld3_ext, "multistep_update"):
    _register_ops()

__all__ = ["coefficient_table", "multistep_update"]
