"""The C++ autograd node of the fused update (python/update_autograd.cpp) against the Python Function it
replaced (fused._MultistepUpdate, kept as its reference) and the plain-torch reference: values, every
gradient (bitwise against the Python Function: both run the same kernels), double backward, layouts,
the saved-tensor rules of autograd, and that fused.multistep_update records this node."""
from __future__ import annotations

import itertools

import pytest
import torch

from ld3_ext import _native

if not _native.native_available():  # only a missing build may skip this file
    pytest.skip(f"ld3_ext._C is not built: {_native.load_error()}", allow_module_level=True)

from ld3_ext import fused, ops  # noqa: E402

C = _native.get()
NODE_NAME = "torch::autograd::CppNode<ld3::FusedMultistepUpdate>"
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(dtype, k, shape=(2, 3, 5, 4), seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)

    def make():
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    return make(), torch.randn(1 + k, generator=g, dtype=torch.float64), [make() for _ in range(k)]


def _run(update, x, coef, hist, needs, grad):
    """Output and the gradients of the inputs flagged in needs (x, coef, history...) through update."""
    leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_(n)
              for t, n in zip([x, coef, *hist], needs)]
    y = update(leaves[0], leaves[1], leaves[2:])
    wanted = [t for t in leaves if t.requires_grad]
    return y, torch.autograd.grad(y, wanted, grad)


def _python_function(x, coef, hist):
    return fused._MultistepUpdate.apply(x, coef, *hist)


def _reference(x, coef, hist):
    return ops.multistep_update_reference(x, coef, hist)


NEEDS = {
    "all": lambda k: [True] * (2 + k),
    "coef_only": lambda k: [False, True] + [False] * k,
    "x_only": lambda k: [True, False] + [False] * k,
    "one_history": lambda k: [False, False] + [i == k - 1 for i in range(k)],
}


@pytest.mark.parametrize("k,needs", [(k, n) for k in (0, 1, 3, 4) for n in sorted(NEEDS)
                                     if not (n == "one_history" and k == 0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_node_matches_the_python_function_bitwise_and_the_reference(dtype, k, needs):
    x, coef, hist = _inputs(dtype, k, seed=k)
    flags = NEEDS[needs](k)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    y, grads = _run(fused.multistep_update, x, coef, hist, flags, grad)
    assert y.grad_fn is not None and y.grad_fn.name() == NODE_NAME
    y_py, grads_py = _run(_python_function, x, coef, hist, flags, grad)
    assert torch.equal(y, y_py)
    assert len(grads) == len(grads_py) == sum(flags)
    for a, b in zip(grads, grads_py):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # and against plain torch autograd in float64 (test_fused_ops.py checks every dtype's tolerance)
    y_ref, grads_ref = _run(_reference, x.double(), coef, [h.double() for h in hist], flags, grad.double())
    if dtype == torch.float64:
        for a, b in zip((y, *grads), (y_ref, *grads_ref)):
            assert (a - b).abs().max() <= 1e-12 * b.abs().max() + 1e-300


def test_gradcheck_and_gradgradcheck_through_the_node():
    x, coef, hist = _inputs(torch.float64, 3, shape=(3, 4))
    args = [t.clone().requires_grad_() for t in (x, coef, *hist)]

    def f(x, c, *h):
        y = C.multistep_update_autograd(x, c, list(h))
        assert y.grad_fn.name() == NODE_NAME
        return y

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_double_backward_matches_the_reference_hessian_vector_product():
    """create_graph=True: the node's backward is the differentiable ATen composition, so a
    Hessian-vector product w.r.t. coef and x equals plain torch's."""
    x, coef, hist = _inputs(torch.float64, 2, shape=(4, 3), seed=3)
    v = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def hvp(update):
        xx, cc = x.clone().requires_grad_(), coef.clone().requires_grad_()
        y = update(xx, cc, hist)
        gc, = torch.autograd.grad(y.pow(2).sum(), [cc], create_graph=True)
        return torch.autograd.grad((gc * v).sum(), [xx, cc])

    got, want = hvp(fused.multistep_update), hvp(_reference)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_a_grad_in_another_layout_is_copied_once(k):
    """channels_last x and history, contiguous incoming grad: the node copies the grad into x's layout once
    (as fused._MultistepUpdate does with layout.in_layout_of), instead of the kernel copying x and each history
    term into the grad's layout; results equal the contiguous solve."""
    x, coef, hist = _inputs(torch.float32, k, shape=(2, 8, 6, 5), channels_last=True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))  # contiguous
    assert not grad.is_contiguous(memory_format=torch.channels_last)
    leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, coef, *hist)]
    y = fused.multistep_update(leaves[0], leaves[1], leaves[2:])
    assert y.is_contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grads = torch.autograd.grad(y, leaves, grad)
    copies = sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")
    assert copies == 1, copies
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    _, want = _run(_python_function, x.contiguous(), coef, [h.contiguous() for h in hist], [True] * (2 + k), grad)
    for i, (a, b) in enumerate(zip(grads, want)):
        if i == 1:  # float32 dot products summed in the other memory order: within round-off of sum |g*m|
            scale = torch.stack([(grad * t).abs().sum() for t in (x, *hist)]).double()
            assert ((a - b).abs() <= 1e-6 * scale).all()
        else:
            assert torch.equal(a.contiguous(), b)


def test_an_input_modified_in_place_after_the_forward_is_refused():
    x, coef, hist = _inputs(torch.float64, 2)
    hs = [h.clone().requires_grad_() for h in hist]
    base = x.clone()  # does not require grad, but is saved for coef's gradient
    coef_l = coef.clone().requires_grad_()
    y = fused.multistep_update(base, coef_l, hs)
    base.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), [coef_l])


def test_saved_tensor_hooks_see_the_nodes_saved_tensors():
    """torch.autograd.graph.saved_tensors_hooks (offloading, compression) apply to the node: x, coef and
    every history term are packed once and unpacked in backward."""
    x, coef, hist = _inputs(torch.float64, 3)
    leaves = [t.clone().requires_grad_() for t in (x, coef, *hist)]
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return t.clone()  # the backward must work from the hooks' copies

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = fused.multistep_update(leaves[0], leaves[1], leaves[2:])
    assert len(packed) == 5
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    assert len(unpacked) == 5
    _, want = _run(_python_function, x, coef, hist, [True] * 5, torch.ones_like(x))
    for a, b in zip(grads, want):
        assert torch.equal(a, b)


def test_retain_graph_and_a_second_backward():
    x, coef, hist = _inputs(torch.float32, 2)
    leaves = [t.clone().requires_grad_() for t in (x, coef, *hist)]
    y = fused.multistep_update(leaves[0], leaves[1], leaves[2:])
    first = torch.autograd.grad(y.sum(), leaves, retain_graph=True)
    second = torch.autograd.grad(y.sum(), leaves)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(y.sum(), leaves)


def test_the_same_tensor_as_x_and_history_accumulates_both_gradients():
    x, coef, _ = _inputs(torch.float64, 0)
    coef = torch.tensor([0.5, -2.0, 0.25], dtype=torch.float64)
    xx = x.clone().requires_grad_()
    y = fused.multistep_update(xx, coef, [xx, xx])
    g, = torch.autograd.grad(y.sum(), [xx])
    torch.testing.assert_close(g, torch.full_like(x, 0.5 - 2.0 + 0.25), rtol=0, atol=1e-15)


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)))
def test_leaves_without_grad_get_no_gradient(flags):
    """Only the inputs that require grad get one (allow_unused gives None for the others)."""
    x, coef, hist = _inputs(torch.float32, 1)
    leaves = [t.clone().requires_grad_(f) for t, f in zip((x, coef, *hist), flags)]
    if not any(flags):
        assert fused.multistep_update(leaves[0], leaves[1], leaves[2:]).grad_fn is None
        return
    y = fused.multistep_update(leaves[0], leaves[1], leaves[2:])
    grads = torch.autograd.grad(y.sum(), [t for t in leaves if t.requires_grad])
    want = {0: torch.full_like(x, float(coef[0])), 2: torch.full_like(x, float(coef[1]))}
    for g, i in zip(grads, [i for i, f in enumerate(flags) if f]):
        if i == 1:
            torch.testing.assert_close(g, torch.stack([x.double().sum(), hist[0].double().sum()]),
                                       rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(g, want[i])


def test_compiled_autograd_runs_the_node():
    """torch.compile's compiled autograd calls the node as an opaque function (it is not traceable): same
    gradients as eager."""
    import torch._dynamo.compiled_autograd as ca
    x, coef, hist = _inputs(torch.float32, 2, seed=8)
    grads = []
    for compiled in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, coef, *hist)]
        y = fused.multistep_update(leaves[0], leaves[1], leaves[2:])
        if compiled:
            with ca._enable(torch.compile(backend="eager")):
                (y * y).sum().backward()
        else:
            (y * y).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("update", [fused.multistep_update, _python_function], ids=["cpp_node", "python_function"])
def test_batched_grads_go_through_the_torch_composition(update):
    """is_grads_batched hands the node a batched grad with no storage (the kernel failed on it): the same
    composition as for create_graph=True serves, with the reference's values."""
    x, coef, hist = _inputs(torch.float64, 2, shape=(4, 3), seed=6)
    v = torch.randn(3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, coef, *hist)]
        return torch.autograd.grad(fn(leaves[0], leaves[1], leaves[2:]), leaves, v, is_grads_batched=True)

    got, want = grads(update), grads(_reference)
    for a, b in zip(got, want):
        assert a.shape[0] == 3
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
