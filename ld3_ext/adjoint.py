"""Whole-sampler backward for the multistep solvers: one autograd node per sample call.

Why: with one autograd node per step, the gradient of a model output m_j arrives in pieces from
each of the (up to 4) later steps that read it, and autograd adds the pieces one tensor pass at a
time; every step also allocates a fresh gradient per history term.  Walking the steps backwards
ourselves lets each m_j's gradient be *gathered* in one pass once it is complete.

The sampler (``solvers.base.MultistepSolver``) is

    m_i     = model(x_i, tm_i)                                  i = 0..N-1
    x_{i+1} = a_i x_i + sum_{j < p_i} b_{i,j} m_{i-j}           (coefficient table row i)

With lambda_i = dL/dx_i (lambda_N is the incoming gradient), the adjoint equations are

    dL/dm_i   = sum_{j: j < p_{i+j}} b_{i+j,j} lambda_{i+1+j}   (m_i is read by steps i..i+3)
    lambda_i  = a_i lambda_{i+1} + v_i,   v_i = (dm_i/dx_i)^T dL/dm_i   (the model's VJP)
    dL/da_i   = <lambda_{i+1}, x_i>,  dL/db_{i+j,j} = <lambda_{i+1+j}, m_i>
    dL/dtm_i  = (dm_i/dtm_i)^T dL/dm_i

``multistep_adjoint_step`` does one reverse step's tensor work in a single pass over memory
(``csrc/cpu/adjoint_cpu.cpp``, ``csrc/cuda/adjoint_cuda.cu``): it finishes lambda_{i+1} from
lambda_{i+2} and v_{i+1} in place, gathers dL/dm_i, and computes the step's dot products.  Only
the model's VJP goes through autograd.  ``adjoint_step_reference`` below is the same step in plain
PyTorch, the reference the kernels are tested against.

The model graphs built in the forward are consumed by the first backward (as autograd would);
a second backward (``retain_graph=True`` outside, or ``gradcheck``) re-evaluates the network at
the saved states instead, as per-step checkpointing does.  If a model evaluation depends on any
tensor that requires grad other than x_i and tm_i (trainable weights, a conditioning tensor),
this path declines and the solver uses the per-step autograd path, so those gradients are exact.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, List, Optional, Sequence

import torch

from . import _native
from .device_constants import tracing
from .coefficients import MAX_HISTORY
from .layout import in_layout_of, non_overlapping_and_dense, plain_grad
from .ops import _opmath, composite_only
from .wrappers import check_fresh_output


# ----------------------------------------------------------------------------------------------
# one reverse step: reference and native
# ----------------------------------------------------------------------------------------------
def adjoint_step_reference(lam_prev: torch.Tensor, v: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                           older: Sequence[torch.Tensor], x: Optional[torch.Tensor], m: Optional[torch.Tensor],
                           w: torch.Tensor, dots: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Plain-PyTorch meaning of ``_C.multistep_adjoint`` (same in-place effects on ``v`` and ``dots``).

    L_0 = scale*lam_prev + v (stored into v) when v is given, else lam_prev; then L_1 = lam_prev
    (only when v is given) and the ``older`` adjoints.  Returns gm = sum_j w_j L_j (None for empty
    w) and writes dots[0] = <L_0, x>, dots[1+j] = <L_j, m> when ``dots`` is given.
    """
    acc = _opmath(lam_prev.dtype)
    if v is not None:
        l0 = (scale.reshape(()).to(acc) * lam_prev.to(acc) + v.to(acc)).to(v.dtype)
        v.copy_(l0)
        lams = [v, lam_prev, *older]
    else:
        lams = [lam_prev, *older]
    J = w.numel()
    gm = None
    if J > 0:
        wa = w.to(acc)
        g = wa[0] * lams[0].to(acc)
        for j in range(1, J):
            g = g + wa[j] * lams[j].to(acc)
        gm = g.to(lam_prev.dtype)
    if dots is not None:
        dd = [torch.sum(lams[0].to(torch.float64) * x.to(torch.float64))]
        dd += [torch.sum(lams[j].to(torch.float64) * m.to(torch.float64)) for j in range(J)]
        dots[: 1 + J] = torch.stack(dd)
    return gm


def _adjoint_step_fn(like: torch.Tensor) -> Callable:
    """The native kernel where it can run on ``like``'s device, else the reference (same contract)."""
    return _native._C.multistep_adjoint if _uses_native(like) else adjoint_step_reference


def multistep_adjoint_step(lam_prev, v, scale, older, x, m, w, dots):
    """The native kernel where it can run, else the reference (same contract)."""
    return _adjoint_step_fn(lam_prev)(lam_prev, v, scale, list(older), x, m, w, dots)


# ----------------------------------------------------------------------------------------------
# the whole-sampler autograd node
# ----------------------------------------------------------------------------------------------
def _grad_accumulator(leaf: torch.Tensor):
    """The AccumulateGrad node of a leaf that requires grad (reached through a throwaway view's graph)."""
    with torch.enable_grad():
        return leaf.view_as(leaf).grad_fn.next_functions[0][0]


class ForeignGradients(Exception):
    """A model evaluation depends on a tensor requiring grad other than x_i and tm_i."""


def _depends_on_other_leaves(out: torch.Tensor, ours: Sequence[torch.Tensor]) -> bool:
    """Does ``out`` depend on a tensor requiring grad other than ``ours``?  A non-leaf in ``ours`` counts as
    an input: the walk stops at its gradient edge and does not look at what it was computed from (the caller's
    step-0 evaluation is made on their x_T and times: parameters those were made from are no reason to decline;
    that evaluation's own gradient goes through the engine anyway).  Asked once per step: the native walk
    (python/autograd_graph.cpp) costs nanoseconds a graph node, the Python reference below about a microsecond."""
    if _native.native_available():
        return _native._C.depends_on_other_leaves(out, list(ours))
    return _depends_on_other_leaves_reference(out, ours)


def _depends_on_other_leaves_reference(out: torch.Tensor, ours: Sequence[torch.Tensor]) -> bool:
    fn = out.grad_fn
    if fn is None:
        return out.requires_grad and not any(out is o for o in ours)
    stops = [(o.grad_fn, o.output_nr) for o in ours if o is not None and o.grad_fn is not None]
    # a leaf of ours may be another object than the one its accumulator holds (a saved tensor unpacked through
    # saved-tensor hooks shares the original's accumulator): compare accumulators too
    accumulators = [_grad_accumulator(o) for o in ours
                    if o is not None and o.requires_grad and o.grad_fn is None]

    def is_stop(node, nr):
        return any(node is s and nr == k for s, k in stops)

    if is_stop(fn, out.output_nr):
        return False
    seen, visited = set(), []  # `visited` keeps the node wrappers alive, so no id is reused meanwhile
    stack = [fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        visited.append(node)
        if type(node).__name__ == "AccumulateGrad":
            var = node.variable
            if not any(var is o for o in ours) and not any(node is a for a in accumulators):
                return True
            continue
        stack.extend(nxt for nxt, nr in node.next_functions if not is_stop(nxt, nr))
    return False


def _check_table(name: str, table) -> None:
    if not isinstance(table, torch.Tensor) or table.dtype != torch.float64 or table.dim() != 3 \
            or table.shape[0] < 1 or tuple(table.shape[1:]) != (2, MAX_HISTORY + 1):
        raise ValueError(f"{name} must be a float64 [N, 2, {MAX_HISTORY + 1}] coefficient table with N >= 1, got "
                         f"{(table.dtype, tuple(table.shape)) if isinstance(table, torch.Tensor) else type(table).__name__}")


def _check_orders(orders, n: int, max_order: int) -> None:
    if not isinstance(orders, (list, tuple)) or len(orders) != n:
        raise ValueError(f"orders must be a list with one order per step ({n}), got {orders!r}")
    for i, p in enumerate(orders):
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= max_order:
            raise ValueError(f"orders[{i}] must be an int in 1..{max_order}, got {p!r}")


def _readers(orders: Sequence[int], max_order: int, i: int) -> List[int]:
    """The j (0 <= j < max_order) such that step i+j reads m_i, i.e. has order > j."""
    n = len(orders)
    return [j for j in range(max_order) if i + j < n and orders[i + j] > j]


class SamplerPlan:
    """What the autograd node needs besides tensors: the model call and the step orders."""

    def __init__(self, evaluate: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
                 orders: Sequence[int], max_order: int, checkpoint: bool,
                 deferred_checks: Optional[Callable[[], ContextManager]] = None,
                 forward_step: Optional[Callable] = None, check_outputs: bool = True):
        self.evaluate = evaluate  # (x, t, step) -> the history entry (x0 or eps)
        self.check_outputs = check_outputs  # wrappers.check_fresh_output on each new output
        # (i, x_i, history newest first, update) -> x_{i+1} in the forward, in place of the table row's update: the
        # same map in another arithmetic (UniPC's predictor and corrector, as its per-step loop computes them)
        self.forward_step = forward_step
        # the model's deferred_output_checks: the backward's re-evaluations queue their output checks
        # on the device and read them back once (no sync per step); None checks each at once
        self.deferred_checks = deferred_checks
        self.orders = list(orders)
        self.max_order = max_order
        self.checkpoint = checkpoint
        n = len(self.orders)
        readers = [_readers(self.orders, max_order, i) for i in range(n)]
        # the kernel takes the adjoints lambda_{i+1..i+J} as a run: J spans the readers, and a gap
        # (a step in between that does not read m_i) gets weight 0 and its dot product is dropped
        self.J = [(max(r) + 1) if r else 0 for r in readers]
        self.gaps = [(i, j) for i, J in enumerate(self.J) for j in range(J) if j not in readers[i]]


def _skewed(mat: torch.Tensor, n: int) -> torch.Tensor:
    """View S of a contiguous [n + MAX_HISTORY, MAX_HISTORY] matrix with S[i, j] = mat[i + j, j].

    Step i's weight j is b_{i+j, j} (row i+j of the table, column 1+j) and its dot product j is
    that coefficient's gradient: both are this skew of the table's b-block.  A strided view, so
    building the weights and scattering the dots need no index tensors made on the host (no
    host-to-device copy in the backward: it stays capturable in a CUDA graph).
    """
    w = mat.shape[1]
    return mat.as_strided((n, w), (w, w + 1), mat.storage_offset())


def _rng_snapshot(device: torch.device):
    """The generator states a network evaluation may draw from (dropout in train mode): the CPU's and, for a
    CUDA state, its device's.  A backward that evaluates the network again (checkpointing, a second backward,
    create_graph) replays them, as torch.utils.checkpoint does, so it differentiates the function the forward
    computed.  Not taken while a CUDA graph is being captured (the generator's state cannot be read there)."""
    cuda = None
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        cuda = torch.cuda.get_rng_state(device)
    return torch.get_rng_state(), cuda


def _if_drawn(snapshot, device: torch.device):
    """``snapshot`` if an evaluation made since drew random numbers (the generators moved), else None: nothing to
    replay, so a backward re-evaluating a deterministic network never sets the process-wide generators back (it
    did, under fork_rng: another thread drawing noise meanwhile got numbers it had already drawn, and a seeded
    thread sampling with dropout other samples; concurrency audit).  The states compared are process-wide: another
    thread drawing during the evaluation makes it count as drawn (a replay that changes nothing for a deterministic
    network; telling the threads apart would mean watching every op the network runs)."""
    if snapshot is None:
        return None
    now = _rng_snapshot(device)
    same = torch.equal(now[0], snapshot[0]) and (now[1] is None) == (snapshot[1] is None) and \
        (now[1] is None or torch.equal(now[1], snapshot[1]))
    return None if same else snapshot


@contextlib.contextmanager
def _replayed_rng(snapshot, device: torch.device):
    """Run with the generators as they were at ``snapshot``; the caller's streams go on untouched afterwards."""
    if snapshot is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if snapshot[1] is not None else [], device_type="cuda"):
        _restore_rng(snapshot, device)
        yield


def _restore_rng(snapshot, device: torch.device):
    """Put the generators back to ``snapshot`` (a declined node: the per-step loop draws the same numbers anew)."""
    if snapshot is not None:
        torch.set_rng_state(snapshot[0])
        if snapshot[1] is not None:
            torch.cuda.set_rng_state(snapshot[1], device)


class _WholeSampler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: SamplerPlan, need: tuple, x_T, table, tm, first):
        need_x, need_table, need_tm = need
        n = len(plan.orders)
        xs: List[torch.Tensor] = [x_T]
        outs: List[torch.Tensor] = []     # values of m_i (no graph)
        graphs: List[Any] = []            # (x leaf, t leaf, m_i with graph) unless checkpointing
        history: List[torch.Tensor] = []  # newest first
        rows = table.detach().select(1, 0).unbind(0)  # the kernel reads the first 1 + p entries of a row
        times = tm.detach().unbind(0)  # one call for all the per-step views
        x = x_T
        # the loop runs once per network evaluation: names bound once, no per-step lookups
        native = _uses_native(x)
        update = _native._C.multistep_update if native else None
        step_fn = plan.forward_step
        if step_fn is not None:  # the kernel reads the first 1 + len(history) entries of a row; the reference wants them cut
            def row_update(xx, row, hist):
                return update(xx, row, hist) if native else _update_reference(xx, row[: 1 + len(hist)], hist)
        evaluate, orders, max_order, keep = plan.evaluate, plan.orders, plan.max_order, not plan.checkpoint
        fresh = plan.check_outputs
        depends = _depends_on_other_leaves
        dev = x_T.device
        rng: List[Any] = [None] * n  # generator states before each evaluation made here (replayed in the backward)
        for i in range(n):
            if i == 0 and first is not None:
                # the caller's evaluation (an input of this node): the backward hands the engine step 0's output
                # gradient, which goes back through the caller's own graph of it (no VJP here)
                xl = tl = None
                out = first
            else:
                xl = x.detach().requires_grad_()
                tl = times[i].detach().requires_grad_() if need_tm else times[i]
                rng[i] = _rng_snapshot(dev)
                with torch.enable_grad():
                    out = evaluate(xl, tl, i)
                if depends(out, (xl, tl)):
                    # the caller's per-step loop redoes the steps from the first this node evaluated: with the
                    # random numbers they drew here (dropout), as the reference backend would draw them
                    _restore_rng(next(r for r in rng if r is not None), dev)
                    raise ForeignGradients()
                rng[i] = _if_drawn(rng[i], dev)
            p = orders[i]
            val = out.detach()
            if val.is_neg():  # a lazily negated view: the kernels read raw storage
                val = val.resolve_neg()
            if native:  # one copy here, not one in each update and reverse step that reads it (layout.py)
                val = in_layout_of(val, x)
            if fresh:  # the backward reads every output: the new one may overlap none of them
                check_fresh_output(val, outs, i)
            outs.append(val)
            graphs.append((xl, tl, out) if keep and xl is not None else None)
            del out  # with checkpointing its graph must go now, before the next evaluation
            history.insert(0, val)
            del history[max_order:]
            if step_fn is not None:
                x = step_fn(i, x, history, row_update)
            else:
                x = update(x, rows[i], history[:p]) if native else _update_reference(x, rows[i][: 1 + p], history[:p])
            xs.append(x)
        ctx.plan, ctx.need = plan, need
        ctx.has_first = first is not None
        # all through save_for_backward, which autograd frees after a backward without retain_graph (and which
        # saved-tensor hooks see): as plain ctx attributes the 2N-1 states stayed alive as long as the output did,
        # so a training loop held the last iteration's states through the next forward.  x_T, the table, tm and
        # first are the caller's (version-checked); the states and outputs are ours
        ctx.graphs, ctx.rng = graphs, rng
        ctx.save_for_backward(table, x_T, tm, first, *xs[1:-1], *outs)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = plain_grad(grad)  # a user's sparse or negated-view grad_outputs
        if composite_only(grad):
            # the kernels cannot read it, and re-running the model under the engine's legacy batching fails
            # inside torch (per-sample fallbacks backward through one graph twice)
            raise RuntimeError("the fused whole-sampler node has no batched backward (autograd.grad(..., "
                               "is_grads_batched=True), autograd.functional.jacobian(vectorize=True)): sample with "
                               "backend='reference' for those, or use torch.func (jacrev, vmap over vjp), which "
                               "the fused solvers serve through the reference path")
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            return _differentiable_backward(ctx, grad)
        plan: SamplerPlan = ctx.plan
        need_x, need_table, need_tm = ctx.need
        table, x_T, tm, _, xs, outs = _unpack_saved(ctx)
        tab = table.detach()
        n = len(plan.orders)
        dev = grad.device
        if x_T.shape == grad.shape and non_overlapping_and_dense(x_T):
            # e.g. the expand()ed grad of a sum(), or a contiguous grad for channels_last states: one copy here,
            # in x_T's layout (that of the saved states), or every reverse step would copy its states into grad's
            grad = in_layout_of(grad, x_T) if non_overlapping_and_dense(grad) else \
                torch.empty_like(x_T, dtype=grad.dtype).copy_(grad)
        elif not non_overlapping_and_dense(grad):
            grad = torch.empty_like(grad).copy_(grad)
        # weights[i, j] = b_{i+j, j}: zero-padded past the last step, gaps zeroed (rare patterns).
        # Tensor methods (narrow, select, split) instead of t[...] indexing and assignment: this runs
        # once per step, and Python's indexing machinery costs microseconds a call.
        b_block = tab.select(1, 0).narrow(1, 1, MAX_HISTORY)
        bpad = tab.new_zeros(n + MAX_HISTORY, MAX_HISTORY)
        bpad.narrow(0, 0, n).copy_(b_block)
        weights = _skewed(bpad, n).contiguous()
        for i, j in plan.gaps:
            weights.select(0, i).select(0, j).zero_()  # zero_(): no scalar tensor made on the host
        # row i truncated to its J_i weights, all from one split of the flat table
        w_rows = weights.view(-1).split_with_sizes([k for J in plan.J for k in (J, MAX_HISTORY - J)])[::2]
        dots = torch.zeros(n, 1 + MAX_HISTORY, dtype=torch.float64, device=dev) if need_table else None
        dot_rows = dots.unbind(0) if need_table else [None] * n
        scales = tab.select(1, 0).narrow(1, 0, 1).unbind(0)
        step = _adjoint_step_fn(grad)
        walk = _Walk(xs, outs, tm.detach())
        with (plan.deferred_checks() if plan.deferred_checks is not None else contextlib.nullcontext()):
            lams, v_next, g_tm, grad_first = _reverse_steps(ctx, walk, plan, grad, step, w_rows, dot_rows, scales)
        del walk, xs, outs

        grad_x = None
        if need_x:
            if v_next is None:
                grad_x = (lams[0].to(torch.float64) * tab[0, 0, 0]).to(grad.dtype)
            else:
                step(lams[0], v_next, scales[0], [], None, None, tab.new_zeros(0), None)
                grad_x = v_next
        grad_table = None
        if need_table:
            for i, j in plan.gaps:  # a gap's coefficient is not used by its step
                dots.select(0, i).select(0, 1 + j).zero_()
            gpad = tab.new_zeros(n + MAX_HISTORY, MAX_HISTORY)
            # dots past J_i are zero: they land in the padding
            _skewed(gpad, n).copy_(dots.narrow(1, 1, MAX_HISTORY))
            grad_table = torch.zeros_like(tab)
            row = grad_table.select(1, 0)
            row.narrow(1, 0, 1).copy_(dots.narrow(1, 0, 1))
            row.narrow(1, 1, MAX_HISTORY).copy_(gpad.narrow(0, 0, n))
        grad_tm = None
        if need_tm:
            zero = tm.new_zeros(())
            dt = tm.dtype
            grad_tm = torch.stack([(zero if g is None else g if g.dtype == dt else g.to(dt)) for g in g_tm] + [zero])
        # step 0's output gradient, when the caller made that evaluation: the engine takes it through their graph
        # of it (to x_T, tm and whatever else the network read), once
        return None, None, grad_x, grad_table, grad_tm, grad_first if ctx.needs_input_grad[5] else None


def _differentiable_backward(ctx, grad):
    """Double backward (a Hessian-vector product, a gradient penalty): the adjoint walk's kernels and model
    VJPs are not differentiable, so the solve is run again from the saved inputs with plain per-step torch ops
    and differentiated with create_graph=True.  Costs one more forward; only taken when asked for."""
    plan: SamplerPlan = ctx.plan
    table, x_T, tm, first = ctx.saved_tensors[:4]
    needs = tuple(ctx.need) + (ctx.needs_input_grad[5],)
    # fresh aliases: with the default model times tm is t, an ancestor of table, and grad w.r.t. both at once
    # would hand t's share through the table back twice (once in tm's gradient, once through the table's node)
    inputs = [v.view_as(v) if need else v for v, need in zip((x_T, table, tm, first), needs)]
    dev = x_T.device

    def evaluate(xx, tt, step):  # the forward's random numbers (dropout), as in the other re-evaluations
        with _replayed_rng(ctx.rng[step], dev):
            return plan.evaluate(xx, tt, step)
    with (plan.deferred_checks() if plan.deferred_checks is not None else contextlib.nullcontext()):
        x = _solve_per_step(evaluate, plan.orders, plan.max_order, *inputs)
    wanted = [t for t, need in zip(inputs, needs) if need]
    got = iter(torch.autograd.grad(x, wanted, grad, create_graph=True, allow_unused=True))
    return (None, None) + tuple(next(got) if need else None for need in needs)


def _solve_per_step(evaluate: Callable, orders: Sequence[int], max_order: int, x_T: torch.Tensor,
                    table: torch.Tensor, tm: torch.Tensor, first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The multistep loop in plain differentiable torch ops, one autograd node per op (no custom node);
    ``first``: step 0's output, evaluated already on x_T and tm[0]."""
    rows = table.select(1, 0).unbind(0)
    x, history = x_T, []
    for i, p in enumerate(orders):
        history.insert(0, first if i == 0 and first is not None else evaluate(x, tm[i], i))
        del history[max_order:]
        x = _update_reference(x, rows[i].narrow(0, 0, 1 + p), history[:p])
    return x


def _unpack_saved(ctx):
    """(table, x_T, tm, first, [x_0 .. x_{N-1}], [m_0 .. m_{N-1}]) from the node's saved tensors."""
    saved = ctx.saved_tensors
    table, x_T, tm, first = saved[:4]
    n = len(ctx.plan.orders)
    return table, x_T, tm, first, [x_T, *saved[4:3 + n]], list(saved[3 + n:])


class _Walk:
    """What one backward reads of the forward: the states x_i, the outputs m_i and the model times (detached)."""
    __slots__ = ("xs", "outs", "tm")

    def __init__(self, xs, outs, tm):
        self.xs, self.outs, self.tm = xs, outs, tm


def _reverse_steps(ctx, walk: _Walk, plan: SamplerPlan, grad: torch.Tensor, step: Callable, w_rows, dot_rows,
                   scales):
    """The reverse walk of _WholeSampler.backward: one adjoint step and one model VJP per step, last
    step first.  Returns the newest adjoints (lambda_1 first), v_0, the per-step dL/dtm and, when the caller
    made step 0's evaluation (``first``), that output's gradient (its VJP is then the engine's: v_0 is None)."""
    n = len(plan.orders)
    H = plan.max_order
    need_x, _, need_tm = ctx.need
    lams: List[torch.Tensor] = []    # lambda_{i+1}, lambda_{i+2}, ... (newest first)
    v_next: Optional[torch.Tensor] = None
    g_tm: List[Optional[torch.Tensor]] = [None] * n
    grad_first: Optional[torch.Tensor] = None
    graphs = ctx.graphs
    for i in range(n - 1, -1, -1):
        J = plan.J[i]
        w = w_rows[i]
        if i == n - 1:
            gm = step(grad, None, None, [], walk.xs[i], walk.outs[i], w, dot_rows[i])
            lams = [grad]
        else:
            if v_next is None:  # m_{i+1} does not depend on x_{i+1}
                v_next = torch.zeros_like(grad)
            gm = step(lams[0], v_next, scales[i + 1], lams[1:max(J - 1, 1)], walk.xs[i], walk.outs[i], w,
                      dot_rows[i])
            lams = [v_next] + lams[: H - 1]
        if i == 0 and ctx.has_first:  # the caller's evaluation: its gradient goes back through their graph
            grad_first, v_next = gm, None
        else:
            v_next, g_tm[i] = _model_vjp(ctx, walk, plan, i, gm, want_x=(i > 0 or need_x), want_t=need_tm)
        graphs[i] = None  # consumed: a later backward re-evaluates the network
    return lams, v_next, g_tm, grad_first


def _uses_native(x: torch.Tensor) -> bool:
    return _native.native_runs_on(x.device)


def _update_reference(x, coef, history):
    from .ops import multistep_update_reference
    return multistep_update_reference(x, coef, history)


def _vjp_public(out: torch.Tensor, inputs: List[torch.Tensor], gm: torch.Tensor):
    return torch.autograd.grad(out, inputs, gm, allow_unused=True)


def _vjp_engine(out: torch.Tensor, inputs: List[torch.Tensor], gm: torch.Tensor):
    """torch.autograd.grad(out, inputs, gm, allow_unused=True) without its argument checks.

    Those checks (shape, dtype and device of gm against out, written in Python) cost about half of
    a small step's VJP; here they hold by construction (gm is made like x, and predict() checks
    that the model output has x's shape and dtype).  The engine entry is the one autograd.grad
    calls, so hooks, anomaly mode and the compiler context behave the same.
    """
    return _engine_run_backward((out,), (gm,), False, False, tuple(inputs), True, False)


try:  # private, present since torch 2.2: the public grad() is the fallback
    from torch.autograd.graph import _engine_run_backward
    _vjp = _vjp_engine
except ImportError:  # pragma: no cover - older or newer torch without it
    _vjp = _vjp_public


def _model_vjp(ctx, walk: _Walk, plan: SamplerPlan, i: int, gm: torch.Tensor, want_x: bool, want_t: bool):
    """(v_i, dL/dtm_i) through the model evaluation of step i (recomputed once its graph is gone)."""
    entry = ctx.graphs[i]
    if entry is None:
        xl = walk.xs[i].detach().requires_grad_()
        tl = walk.tm[i].detach().requires_grad_() if ctx.need[2] else walk.tm[i].detach()
        with torch.enable_grad(), _replayed_rng(ctx.rng[i], xl.device):
            out = plan.evaluate(xl, tl, i)
    else:
        xl, tl, out = entry
    inputs = ([xl] if want_x else []) + ([tl] if want_t else [])
    if not inputs or gm is None or not out.requires_grad:
        return None, None
    res = _vjp(out, inputs, gm)
    v = res[0] if want_x else None
    gt = res[-1] if want_t else None
    if v is not None and not (v.stride() == gm.stride() and v.dtype == gm.dtype and not v.is_neg()
                              and v.data_ptr() % v.element_size() == 0):
        # the next reverse step writes lambda_i into v in place, in its layout: the layout of the step (gm's), and
        # aligned (the kernel refuses a v at an odd byte offset, which a custom Function's backward could return)
        v = torch.empty_like(gm).copy_(v)
    return v, gt


def unipc_as_multistep(coef: torch.Tensor, orders: Sequence[int]):
    """UniPC with corrector written as a plain multistep recursion on its predictor states.

    With s_i the predictor state at which m_i is evaluated (s_0 = x_0) and x_i the corrected state,
    step i+1 is  s_{i+1} = A x_i + sum_k P_k m_{i-k}  (row [i, 0]) and the corrector of step i is
    x_i = A' x_{i-1} + C_0 m_i + sum_k C_{k+1} m_{i-1-k}  (row [i-1, 1]).  Both rows share the same
    a = sigma_i/sigma_{i-1} (A' = a of the predictor of step i), so x_i = s_i + C_0 m_i +
    sum_k (C_{k+1} - P'_k) m_{i-1-k} and

        s_{i+1} = A s_i + (P_0 + A C_0) m_i + sum_{k>=1} (P_k + A (C_k - P'_{k-1})) m_{i-k},

    one update with up to order+1 history terms.  Returns the [N, 2, 5] table of that recursion
    (built with differentiable ops from ``coef``, so gradients reach the timesteps) and its orders.
    """
    _check_table("coef", coef)
    _check_orders(orders, coef.shape[0], max_order=MAX_HISTORY - 1)
    n = coef.shape[0]
    eff = coef[:, 0, :].clone()
    if n > 1:
        A = coef[1:, 0, 0]
        eff[1:, 1] = coef[1:, 0, 1] + A * coef[:-1, 1, 1]
        eff[1:, 2:] = coef[1:, 0, 2:] + A[:, None] * (coef[:-1, 1, 2:] - coef[:-1, 0, 1:-1])
    eff_orders = [orders[0]] + [max(orders[i], orders[i - 1] + 1) for i in range(1, n)]
    return torch.stack([eff, torch.zeros_like(eff)], dim=1), eff_orders


def unipc_forward_step(coef: torch.Tensor, orders: Sequence[int]) -> Callable:
    """``forward_step`` for ``whole_sampler`` running UniPC's recursion of ``unipc_as_multistep``: each predictor
    state from the corrected state, as UniPC's per-step loop computes it (x_i = corrector row [i-1, 1] on x_{i-1}
    and [m_i, m_{i-1}, ...]; s_{i+1} = predictor row [i, 0] on x_i and [m_i, ...]).

    Why: the combined recursion is the same map, but in float32 it rounds differently (up to ~2e-6 of the sample),
    so a sample would change with whether gradients were asked for.  The forward now matches the per-step loop
    bitwise; the backward differentiates the combined table, the exact derivative of the same map.
    """
    _check_table("coef", coef)
    _check_orders(orders, coef.shape[0], max_order=MAX_HISTORY - 1)
    orders = list(orders)
    tab = coef.detach()
    predictor, corrector = tab.select(1, 0).unbind(0), tab.select(1, 1).unbind(0)
    n = len(orders)
    corrected: List[Optional[torch.Tensor]] = [None]  # x_i, the state the next predictor starts from

    def step(i: int, s: torch.Tensor, history: Sequence[torch.Tensor], update: Callable) -> torch.Tensor:
        x = s if i == 0 else update(corrected[0], corrector[i - 1], list(history[: 1 + orders[i - 1]]))
        corrected[0] = x if i < n - 1 else None  # nothing held past the last step (the node keeps this closure)
        return update(x, predictor[i], list(history[: orders[i]]))

    step.n_steps = n  # whole_sampler checks it against its orders
    return step


def whole_sampler(evaluate: Callable, orders: Sequence[int], max_order: int, checkpoint: bool,
                  x_T: torch.Tensor, table: torch.Tensor, tm: torch.Tensor,
                  deferred_checks: Optional[Callable[[], ContextManager]] = None,
                  first: Optional[torch.Tensor] = None, forward_step: Optional[Callable] = None,
                  check_outputs: bool = True) -> torch.Tensor:
    """Run the multistep loop as one autograd node (raises ForeignGradients to decline).

    ``first``: step 0's output, evaluated by the caller on ``x_T`` and ``tm[0]`` themselves (with its graph,
    as its per-step loop would).  The node declines before any other work when it depends on another tensor
    requiring grad (so the caller's per-step loop goes on from it and the network runs exactly once a step);
    else it is an input of the node, whose backward returns its gradient and leaves its VJP to the engine,
    through the caller's own graph of it (whatever else that evaluation read: x_T made from the times, a
    closure over them).  Without it the node evaluates step 0 itself, and a decline there costs the caller one
    evaluation more.  A dependency that shows only at a later step declines there; the caller redoes steps 1 on.

    ``forward_step(i, x_i, history, update)``, when given, computes x_{i+1} in the forward instead of table row i's
    update (``history`` newest first, ``update(x, row, hist)`` the node's own update): the same map in the arithmetic
    of a solver's own loop (``unipc_forward_step``), so the sample does not depend on whether gradients are wanted.

    ``evaluate(x, t, step)`` returns the history entry of step ``step``; ``orders[i]`` is the number of
    history terms update i combines (1..4); ``table`` is the [N, 2, 5] float64 coefficient table (row
    [i, 0] = [a, b_0, ...]); ``tm`` holds the N+1 network times.  ``deferred_checks``, a context factory, wraps
    the backward's network re-evaluations (checkpointing, a second backward): the solvers pass one that applies
    the forward thread's ``output_checks`` setting and, on CUDA, ``deferred_output_checks`` (read back once, not per
    step).
    Under forward-mode AD or a torch.func transform (vmap, grad, jvp) the loop runs in plain per-step
    torch ops instead (same values up to rounding, no checkpointing, ``forward_step`` not used).
    ``check_outputs``: refuse an output in the memory of an earlier one (``wrappers.check_fresh_output``; the
    solvers pass their model's ``check_output``).
    """
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable (x, t, step) -> tensor, got {type(evaluate).__name__}")
    _check_table("table", table)
    _check_orders(orders, table.shape[0], max_order=MAX_HISTORY)
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not max(orders) <= max_order <= MAX_HISTORY:
        raise ValueError(f"max_order must be an int in [max(orders) = {max(orders)}, {MAX_HISTORY}], got {max_order!r}")
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        raise TypeError(f"x_T must be a floating tensor, got {getattr(x_T, 'dtype', type(x_T).__name__)}")
    if not isinstance(tm, torch.Tensor) or tm.dim() != 1 or tm.numel() != table.shape[0] + 1:
        raise ValueError(f"tm must be a 1-D tensor with N + 1 = {table.shape[0] + 1} network times, got "
                         f"{tuple(tm.shape) if isinstance(tm, torch.Tensor) else type(tm).__name__}")
    for name, t in (("table", table), ("tm", tm)):
        if t.device != x_T.device:
            raise ValueError(f"{name} is on {t.device} but x_T is on {x_T.device}")
    need = (x_T.requires_grad, table.requires_grad, tm.requires_grad)
    if forward_step is not None:
        if not callable(forward_step):
            raise TypeError(f"forward_step must be callable (i, x, history, update) -> x_next, got "
                            f"{type(forward_step).__name__}")
        steps = getattr(forward_step, "n_steps", None)
        if steps is not None and steps != len(orders):
            raise ValueError(f"forward_step was built for {steps} steps, but orders has {len(orders)}")
    if not isinstance(check_outputs, bool):
        raise TypeError(f"check_outputs must be a bool, got {type(check_outputs).__name__}")
    if deferred_checks is not None and not callable(deferred_checks):
        raise TypeError(f"deferred_checks must be a callable returning a context manager, got "
                        f"{type(deferred_checks).__name__}")
    if first is not None and (not isinstance(first, torch.Tensor) or first.shape != x_T.shape
                              or first.dtype != x_T.dtype):
        got = f"{tuple(first.shape)} {first.dtype}" if isinstance(first, torch.Tensor) else type(first).__name__
        raise ValueError(f"first must be step 0's output, a tensor of x_T's shape {tuple(x_T.shape)} and dtype "
                         f"{x_T.dtype}, got {got}")
    if composite_only(x_T, table, tm) or (first is not None and composite_only(first)):
        # forward-mode AD or a torch.func transform: autograd.Function.apply refuses the node there (no jvp, no
        # setup_context), while the same loop in plain torch ops differentiates and maps; no checkpointing,
        # as in Solver._evaluate
        return _solve_per_step(evaluate, orders, max_order, x_T, table, tm, first)
    if first is not None and _depends_on_other_leaves(first, (x_T, tm)):
        raise ForeignGradients()
    plan = SamplerPlan(evaluate, orders, max_order, checkpoint, deferred_checks, forward_step, check_outputs)
    return _WholeSampler.apply(plan, need, x_T, table, tm, first)


def applicable(x: torch.Tensor, table: torch.Tensor, tm: torch.Tensor) -> bool:
    """Worth taking: gradients are wanted and nothing is being traced."""
    if not torch.is_grad_enabled() or tracing():
        return False
    if not (x.requires_grad or table.requires_grad or tm.requires_grad):
        return False
    if composite_only(x, table, tm):  # forward-mode AD or a torch.func transform: the per-step ops handle it
        return False
    if x.is_inference() or table.is_inference() or tm.is_inference():
        # the node saves its inputs for backward, which torch refuses for inference tensors (e.g. a grid made
        # under torch.inference_mode); the per-step ops save only what autograd needs, as the reference does
        return False
    return _uses_native(x) and x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)


__all__ = ["adjoint_step_reference", "multistep_adjoint_step", "whole_sampler", "unipc_as_multistep",
           "unipc_forward_step", "applicable",
           "ForeignGradients"]
