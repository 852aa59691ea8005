"""CUDA kernels: parity with the CPU kernels and the reference (values and gradients), gradcheck,
bitwise determinism, no host sync (CUDA-graph capture of a sampler step).  Skipped without a GPU
or without an extension built with LD3_WITH_CUDA=ON; run on the GPU box by benchmarks/gpu_check.sh.

LD3_CUDA_TESTS_ON_CPU=1 runs this module's code with the CPU as the device (a dry run, which
tests/test_cuda_ops_dry_run.py does in every test run): the skip-on-CPU tests are never executed
otherwise, so an API change or a typo here would surface only on a scarce GPU session.  Parity is
then CPU against CPU -- it proves the tests run, not the CUDA kernels; the tests that need CUDA
itself (graphs, streams, device-only behaviour) are skipped."""
from __future__ import annotations

import os

import pytest
import torch

from ld3_ext import _native

ON_CPU = os.environ.get("LD3_CUDA_TESTS_ON_CPU") == "1"
if not ON_CPU and not (torch.cuda.is_available() and _native.native_cuda_available()):
    pytest.skip("needs a GPU and ld3_ext._C built with CUDA kernels", allow_module_level=True)

from ld3_ext import fused, ops  # noqa: E402
from ld3_ext import schedules as S  # noqa: E402
from ld3_ext.coefficients import SOLVER_IDS, SolverSpec, coefficient_table_reference  # noqa: E402

C = _native.get()
DEV = torch.device("cpu" if ON_CPU else "cuda")
needs_cuda = pytest.mark.skipif(ON_CPU, reason="dry run on the CPU: needs CUDA itself")
RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(dtype, k, shape=(4, 3, 65, 33), seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)

    def make():
        # sliced on the device: .to(dtype) and .to(device) return a non-dense view contiguous
        t = torch.randn(shape[:-1] + (shape[-1] * 2,), generator=g, dtype=torch.float64).to(dtype).to(DEV)
        return t[..., ::2] if noncontig else t[..., : shape[-1]].contiguous()

    return make(), torch.randn(1 + k, generator=g, dtype=torch.float64).to(DEV), [make() for _ in range(k)]


def _strided_leaf(t):
    """A leaf requiring grad with t's values and strides (clone() makes a non-dense view contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t).requires_grad_()


def test_this_gpu_runs_the_kernels():
    """Every parity test below compares against the reference: were this GPU judged uncovered (its tensors sent
    down the reference path, _native.native_runs_on), they would pass without a kernel running."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.native_runs_on(DEV) is True
    assert fused._device_supported(DEV)


@pytest.mark.parametrize("noncontig", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_and_reference(dtype, k, noncontig):
    x, coef, hist = _inputs(dtype, k, seed=k, noncontig=noncontig)
    assert all(t.is_contiguous() != noncontig for t in (x, *hist)), "the kernel must see the layout asked for"
    out = fused.multistep_update(x, coef, hist)
    ref = ops.multistep_update_reference(x, coef, hist)
    cpu = fused.multistep_update(x.cpu(), coef.cpu(), [h.cpu() for h in hist])
    scale = coef[0].abs() * x.double().abs() + sum(coef[1 + j].abs() * m.double().abs() for j, m in enumerate(hist))
    assert bool(((out.double() - ref.double()).abs() <= RTOL[dtype] * scale + 1e-300).all())
    assert bool(((out.double().cpu() - cpu.double()).abs() <= RTOL[dtype] * scale.cpu() + 1e-300).all())

    leaves = [_strided_leaf(t) for t in (x, coef, *hist)]
    leaves_r = [t.clone().requires_grad_() for t in (x, coef, *hist)]
    assert all(t.is_contiguous() != noncontig for t in (leaves[0], *leaves[2:]))
    w = torch.randn_like(x)
    (fused.multistep_update(leaves[0], leaves[1], leaves[2:]) * w).double().sum().backward()
    (ops.multistep_update_reference(leaves_r[0], leaves_r[1], leaves_r[2:]) * w).double().sum().backward()
    for a, b in zip(leaves, leaves_r):
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        torch.testing.assert_close(a.grad.double(), b.grad.double(), rtol=tol, atol=tol * float(b.grad.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_keeps_channels_last(dtype):
    """Dense inputs laid out alike are walked in place: output and grads keep their layout (channels_last)."""
    x, coef, hist = _inputs(dtype, 3, seed=7)
    x, hist = x.to(memory_format=torch.channels_last), [h.to(memory_format=torch.channels_last) for h in hist]
    ref = ops.multistep_update_reference(x, coef, hist)
    out = fused.multistep_update(x, coef, hist)
    assert out.stride() == ref.stride() == x.stride()
    scale = coef[0].abs() * x.double().abs() + sum(coef[1 + j].abs() * m.double().abs() for j, m in enumerate(hist))
    assert bool(((out.double() - ref.double()).abs() <= RTOL[dtype] * scale + 1e-300).all())
    o = torch.empty_like(x)
    fused.multistep_update(x, coef, hist, out=o)
    assert torch.equal(o, out)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(dtype).to(DEV)
    g = g.to(memory_format=torch.channels_last)
    gx, gc, gms = C.multistep_update_backward(g, x, coef, hist, True, True, True)
    assert gx.stride() == x.stride() and all(gm.stride() == x.stride() for gm in gms)
    torch.testing.assert_close(gx.double(), coef[0] * g.double(), rtol=RTOL[dtype], atol=1e-6)  # fp16 subnormals
    want = torch.stack([(g.double() * t.double()).sum() for t in (x, *hist)])
    # float32 partial sums: rounding at the scale of sum |g * t|
    torch.testing.assert_close(gc[:4], want, rtol=1e-5, atol=1e-5 * float((g.double() * x.double()).abs().sum()))


def _in_layout(t, layout):
    """t's values (on its device) stored channels_last, in a dimension order no memory_format names
    (H, W, N, C), or sliced (not dense); laid out on the device, as .to(device) would make it dense."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":
        return t.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    if layout == "sliced":
        return torch.cat([t, t], dim=3)[..., ::2].copy_(t)
    return t.contiguous()


# x, history[0], history[1], grad
LAYOUT_CASES = {"channels_last": ("channels_last",) * 4, "permuted": ("permuted",) * 4,
                "mixed": ("channels_last", "contiguous", "sliced", "permuted")}


def _layout_inputs(case, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 8, 24, 25)  # several 4096-element blocks and a ragged tail
    x, h0, h1, grad = (_in_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEV), lay)
                       for lay in LAYOUT_CASES[case])
    return x, torch.randn(3, generator=g, dtype=torch.float64).to(DEV), [h0, h1], grad


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_layouts_match_the_cpu_kernel_bitwise(dtype, case):
    """The layout path on the device (csrc/dense_layout.h): the outputs take x's layout (the grads grad's)
    and are bitwise the CPU kernel's, whether the inputs are walked in place or copied into that layout;
    out= in x's layout is written directly, out=x in place, an out laid out otherwise through a copy."""
    x, coef, hist, grad = _layout_inputs(case, dtype, seed=31)
    assert not x.is_contiguous() and not grad.is_contiguous() and (x.stride() != grad.stride()) == (case == "mixed")
    assert (hist[1].stride(3) == 2) == (case == "mixed")  # sliced: not dense
    want = C.multistep_update(x.cpu(), coef.cpu(), _cpu(hist))
    y = C.multistep_update(x, coef, hist)
    assert y.stride() == want.stride() == x.stride() and torch.equal(y.cpu(), want)
    out = torch.empty_like(x)
    assert C.multistep_update(x, coef, hist, out).data_ptr() == out.data_ptr() and torch.equal(out.cpu(), want)
    xi = x.clone()
    C.multistep_update(xi, coef, hist, xi)  # out=x: each element read, then written, by one thread
    assert xi.stride() == x.stride() and torch.equal(xi.cpu(), want)
    oc = torch.empty(x.shape, dtype=dtype, device=DEV)
    C.multistep_update(x, coef, hist, oc)
    assert oc.is_contiguous() and torch.equal(oc.cpu(), want)
    gx, gc, gms = C.multistep_update_backward(grad, x, coef, hist, True, True, True)
    gx_c, gc_c, gms_c = C.multistep_update_backward(grad.cpu(), x.cpu(), coef.cpu(), _cpu(hist), True, True, True)
    assert gx.stride() == gx_c.stride() == grad.stride() and torch.equal(gx.cpu(), gx_c)
    assert all(a.stride() == grad.stride() and torch.equal(a.cpu(), b) for a, b in zip(gms, gms_c))
    # dot products: the CPU kernel's op-math partial sums round at ~1e-7 of sum |g * t| (the device sums in
    # double); a wrong pairing of elements would be off by ~1e-2 of it
    dot_scale = float((grad.double() * x.double()).abs().sum())
    torch.testing.assert_close(gc.cpu(), gc_c, rtol=1e-5, atol=1e-5 * dot_scale)
    gs = _in_layout(grad, "sliced")  # not dense: copied into a dense layout before the flat walk
    gx, gc, gms = C.multistep_update_backward(gs, x, coef, hist, True, True, True)
    assert torch.equal(gx.cpu(), gx_c) and all(torch.equal(a.cpu(), b) for a, b in zip(gms, gms_c))
    torch.testing.assert_close(gc.cpu(), gc_c, rtol=1e-5, atol=1e-5 * dot_scale)


@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
@pytest.mark.parametrize("mixed", [False, True])
def test_cuda_adjoint_step_keeps_the_layout_of_v(layout, mixed):
    """The adjoint step on the device runs in v's layout (v is written in place): gm takes it, and the
    stored adjoint and gm are bitwise the CPU kernel's, with the other inputs laid out alike or otherwise."""
    g = torch.Generator().manual_seed(32)
    shape = (2, 8, 24, 25)
    other = "contiguous" if mixed else layout
    lam, v, x, m, o = (_in_layout(torch.randn(shape, generator=g).to(DEV), lay)
                       for lay in (other, layout, other, "sliced" if mixed else layout, other))
    w = torch.randn(3, generator=g, dtype=torch.float64).to(DEV)
    sc = torch.tensor([0.7], dtype=torch.float64, device=DEV)
    v_d, v_c = v.clone(), v.cpu()
    d_d, d_c = torch.zeros(4, dtype=torch.float64, device=DEV), torch.zeros(4, dtype=torch.float64)
    gm = C.multistep_adjoint(lam, v_d, sc, [o], x, m, w, d_d)
    gm_c = C.multistep_adjoint(lam.cpu(), v_c, sc.cpu(), [o.cpu()], x.cpu(), m.cpu(), w.cpu(), d_c)
    assert gm.stride() == gm_c.stride() == v.stride() and v_d.stride() == v.stride() and not v.is_contiguous()
    assert torch.equal(v_d.cpu(), v_c) and torch.equal(gm.cpu(), gm_c)
    dot_scale = max(float((a.cpu().double() * b.cpu().double()).abs().sum()) for a in (v_c, lam, o) for b in (x, m))
    torch.testing.assert_close(d_d.cpu(), d_c, rtol=1e-5, atol=1e-5 * dot_scale)  # as in the update's backward


def _copies_of(shape, fn):
    """How many tensors of `shape` fn copies (aten::copy_, recorded for the native calls on any device)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(e.name == "aten::copy_" and list(e.input_shapes[0]) == list(shape) for e in prof.events())


@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
def test_cuda_inputs_laid_out_alike_are_not_copied(layout):
    """What the layout change is for: inputs laid out alike are walked in place, in the forward (also with
    out=), its backward and the adjoint step -- before it each call copied them into contiguous buffers and
    its outputs back.  An input laid out otherwise is copied (the count sees the kernels' copies)."""
    x, coef, hist, grad = _layout_inputs(layout, torch.float32, seed=33)
    lam, v, m = (_in_layout(torch.randn_like(x), layout) for _ in range(3))
    out = torch.empty_like(x)
    w = torch.randn(3, dtype=torch.float64, device=DEV)
    sc = torch.tensor([0.7], dtype=torch.float64, device=DEV)
    dots = torch.zeros(4, dtype=torch.float64, device=DEV)
    h1_other, lam_other = hist[1].contiguous(), lam.contiguous()  # made here: .contiguous() copies too
    calls = {
        "forward": lambda: C.multistep_update(x, coef, hist),
        "out=": lambda: C.multistep_update(x, coef, hist, out),
        "out=x": lambda: C.multistep_update(x, coef, hist, x),
        "backward": lambda: C.multistep_update_backward(grad, x, coef, hist, True, True, True),
        "adjoint": lambda: C.multistep_adjoint(lam, v, sc, [hist[0]], x, m, w, dots),
    }
    assert {k: _copies_of(x.shape, f) for k, f in calls.items()} == dict.fromkeys(calls, 0)
    assert _copies_of(x.shape, lambda: C.multistep_update(x, coef, [hist[0], h1_other])) >= 1
    assert _copies_of(x.shape, lambda: C.multistep_adjoint(lam_other, v, sc, [], x, m, w[:2], dots)) >= 1


def test_cuda_out_alias_and_empty():
    x, coef, hist = _inputs(torch.float32, 3, shape=(1, 100003))
    ref = ops.multistep_update_reference(x, coef, hist)
    y = x.clone()
    fused.multistep_update(y, coef, hist, out=y)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    # misaligned views take the scalar path
    xs, hs = x.view(-1)[1:], [h.view(-1)[1:] for h in hist]
    torch.testing.assert_close(fused.multistep_update(xs, coef, hs), ops.multistep_update_reference(xs, coef, hs),
                               rtol=0, atol=0)
    e = torch.empty(0, 4, device=DEV, requires_grad=True)
    c = coef.clone().requires_grad_()
    fused.multistep_update(e, c, [e.detach()] * 3).sum().backward()
    assert torch.all(c.grad == 0)


def _cpu(ts):
    return [t.cpu() for t in ts]


@pytest.mark.parametrize("k", [0, 1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_elementwise_outputs_bitwise_equal_cpu(dtype, k):
    """No fused multiply-add on either side (nvcc --fmad=false, g++ -ffp-contract=off): the update, its
    element-wise gradients and the adjoint step's stored adjoint and gm are bitwise the CPU kernels'
    (the update also the reference's).  Odd length: every vector width leaves a tail."""
    x, coef, hist = _inputs(dtype, k, shape=(3, 1001), seed=20 + k)
    out = C.multistep_update(x, coef, hist)
    assert torch.equal(out.cpu(), C.multistep_update(x.cpu(), coef.cpu(), _cpu(hist)))
    assert torch.equal(out, ops.multistep_update_reference(x, coef, hist))
    g = torch.randn_like(x)
    gx, gc, gms = C.multistep_update_backward(g, x, coef, hist, True, True, True)
    gx_c, gc_c, gms_c = C.multistep_update_backward(g.cpu(), x.cpu(), coef.cpu(), _cpu(hist), True, True, True)
    assert torch.equal(gx.cpu(), gx_c) and all(torch.equal(a.cpu(), b) for a, b in zip(gms, gms_c))
    torch.testing.assert_close(gc.cpu(), gc_c, rtol=RTOL[dtype], atol=RTOL[dtype] * 100)
    # adjoint step with v (J = k weights; lam_prev is L_1, so k - 2 older adjoints)
    lam, v, m = (torch.randn_like(x) for _ in range(3))
    older = [torch.randn_like(x) for _ in range(max(k - 2, 0))]
    w = torch.randn(k, dtype=torch.float64, device=DEV)
    sc = torch.tensor([0.7], dtype=torch.float64, device=DEV)
    vg, vc = v.clone(), v.cpu()
    dg, dc = torch.zeros(5, dtype=torch.float64, device=DEV), torch.zeros(5, dtype=torch.float64)
    gm = C.multistep_adjoint(lam, vg, sc, older, x, m, w, dg)
    gm_c = C.multistep_adjoint(lam.cpu(), vc, sc.cpu(), _cpu(older), x.cpu(), m.cpu(), w.cpu(), dc)
    assert torch.equal(vg.cpu(), vc)
    assert (gm is None) == (gm_c is None) and (gm is None or torch.equal(gm.cpu(), gm_c))
    torch.testing.assert_close(dg.cpu(), dc, rtol=RTOL[dtype], atol=RTOL[dtype] * 100)


@pytest.mark.parametrize("which", ["x", "hist0", "hist2", "out", "grad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_one_misaligned_pointer(dtype, which):
    """The 16-byte vector path needs every pointer aligned: one tensor one element off (a view into a
    larger buffer) must send the whole call to the scalar path and still give the aligned result."""
    n = 4099
    g = torch.Generator().manual_seed(3)

    def make(name):
        buf = torch.randn(n + 1, generator=g, dtype=torch.float64).to(dtype).to(DEV)
        return buf[1:] if name == which else buf[:n]

    x, hist, grad = make("x"), [make(f"hist{j}") for j in range(3)], make("grad")
    coef = torch.randn(4, generator=g, dtype=torch.float64).to(DEV)
    want = C.multistep_update(x.contiguous().clone(), coef, [h.clone() for h in hist])  # fresh, aligned
    if which == "out":
        out = torch.empty(n + 1, dtype=dtype, device=DEV)[1:]
        assert C.multistep_update(x, coef, hist, out).data_ptr() == out.data_ptr()
        assert torch.equal(out, want)
    else:
        assert torch.equal(C.multistep_update(x, coef, hist), want)
    gx, gc, gms = C.multistep_update_backward(grad, x, coef, hist, True, True, True)
    gx_a, gc_a, gms_a = C.multistep_update_backward(grad.clone(), x.clone(), coef, [h.clone() for h in hist],
                                                    True, True, True)
    assert torch.equal(gx, gx_a) and all(torch.equal(a, b) for a, b in zip(gms, gms_a))
    torch.testing.assert_close(gc, gc_a, rtol=1e-12, atol=0)


@needs_cuda
def test_cuda_more_than_2_pow_31_elements():
    """64-bit indexing end to end: an update, its backward and the dot products over 2^31 + 17 float16
    elements (4 GiB a tensor), with values whose sums are exact in double."""
    if torch.cuda.get_device_properties(DEV).total_memory < 40 * 2 ** 30:
        pytest.skip("needs a GPU with at least 40 GiB")
    n = 2 ** 31 + 17
    x = torch.full((n,), 0.5, dtype=torch.float16, device=DEV)
    m = torch.full((n,), 0.25, dtype=torch.float16, device=DEV)
    m[-1] = 2.0  # the last element must be reached
    coef = torch.tensor([2.0, 4.0], dtype=torch.float64, device=DEV)
    out = C.multistep_update(x, coef, [m])
    assert float(out[0]) == 2.0 and float(out[-1]) == 9.0 and bool((out[:-1] == 2.0).all())
    del out
    gx, gc, gms = C.multistep_update_backward(x, x, coef, [m], True, True, True)  # incoming grad = x
    assert float(gx[-1]) == 1.0 and float(gms[0][-1]) == 2.0
    assert gc.tolist() == [n * 0.25, (n - 1) * 0.125 + 1.0]


def test_cuda_out_partial_overlap_refused():
    """out may alias x exactly (each element read and written by one thread), never partly."""
    buf = torch.randn(1000, device=DEV)
    coef = torch.ones(2, dtype=torch.float64, device=DEV)
    with pytest.raises(RuntimeError, match="overlap|memory location"):
        C.multistep_update(buf[:-4], coef[:1], [], buf[4:])
    with pytest.raises(RuntimeError, match="overlap|memory location"):
        C.multistep_update(torch.randn(996, device=DEV), coef, [buf[:-4]], buf[4:])


@needs_cuda
def test_cuda_wrong_device_coef():
    x, coef, hist = _inputs(torch.float32, 2)
    with pytest.raises(ValueError, match="coef is on cpu"):
        fused.multistep_update(x, coef.cpu(), hist)
    with pytest.raises(RuntimeError, match="coef is on"):
        C.multistep_update(x, coef.cpu(), hist)


def test_cuda_gradcheck():
    x, coef, hist = _inputs(torch.float64, 3, shape=(3, 5))
    args = [t.clone().requires_grad_() for t in (x, coef, *hist)]
    assert torch.autograd.gradcheck(lambda x, c, *h: fused.multistep_update(x, c, h), args)
    t = torch.linspace(0.99, 0.01, 7, dtype=torch.float64, device=DEV).requires_grad_()
    assert torch.autograd.gradcheck(lambda tt: fused.coefficient_table(S.VPLinear(), tt, SolverSpec("unipc", 3)), (t,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_update_node_matches_the_python_function(dtype):
    """The C++ autograd node (python/update_autograd.cpp) that fused.multistep_update records on the device:
    bitwise the Python Function it replaced (same kernels), gradients included; double backward in float64."""
    x, coef, hist = _inputs(dtype, 3, shape=(2, 3, 9, 7), seed=4)
    w = torch.randn_like(x)
    results = []
    for update in (lambda a, c, h: fused.multistep_update(a, c, h),
                   lambda a, c, h: fused._MultistepUpdate.apply(a, c, *h)):
        leaves = [t.clone().requires_grad_() for t in (x, coef, *hist)]
        y = update(leaves[0], leaves[1], leaves[2:])
        results.append((y, *torch.autograd.grad(y, leaves, w)))
    assert results[0][0].grad_fn.name().endswith("FusedMultistepUpdate>")
    for a, b in zip(*results):
        assert a.device == DEV and torch.equal(a, b)
    if dtype == torch.float64:
        args = [t.clone().requires_grad_() for t in (x[:1, :1, :3, :3], coef,
                                                     *[h[:1, :1, :3, :3] for h in hist])]
        assert torch.autograd.gradgradcheck(lambda a, c, *h: fused.multistep_update(a, c, list(h)), args)


@needs_cuda
def test_cuda_backward_deterministic_and_accurate():
    n = 3_000_017
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    hist = [torch.randn(n, generator=g).to(DEV) for _ in range(4)]
    coef = torch.randn(5, dtype=torch.float64, generator=g).to(DEV)
    runs = [C.multistep_update_backward(grad, x, coef, hist, True, True, True)[1] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    ref = torch.stack([(grad.double() * t.double()).sum() for t in (x, *hist)])
    torch.testing.assert_close(runs[0], ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("schedule", [S.EDM(), S.VPLinear(), S.VPCosine(), S.FlowMatching()], ids=lambda s: s.name)
def test_cuda_coefficient_table_matches_cpu(schedule):
    kind, (p0, p1) = schedule.native_spec()
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * torch.linspace(1, 0, 9, dtype=torch.float64) ** 2
    for solver, order in [("euler", 1), ("dpmpp", 3), ("unipc", 3), ("ipndm", 4), ("dpmpp", 2)]:
        spec = SolverSpec(solver, order)
        args = (kind, p0, p1, SOLVER_IDS[solver], order, True, False, False, spec.has_corrector)
        tab_c, jac_c = C.coefficient_table(t, *args)
        tab_g, jac_g = C.coefficient_table(t.to(DEV), *args)
        ref = coefficient_table_reference(schedule, t, spec)
        # the device's exp/log/expm1 differ from glibc's by an ulp or two: the 1e-12 against the
        # reference for both tables, and a Jacobian bound a decade looser (the phi functions no longer
        # amplify them by ~1/h^k: test_cuda_coefficient_table_precision_against_mpmath)
        torch.testing.assert_close(tab_c, ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(tab_g.cpu(), ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(jac_g.cpu(), jac_c, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("grid", ["fine", "large_steps"])
def test_cuda_coefficient_table_precision_against_mpmath(grid):
    """The device's table and Jacobian on a fine grid (every log-step 1e-4, where LD3.md's phi recursions lost 12
    digits of UniPC's Jacobian) and across steps of h = 11..20, against the mpmath oracle of
    tests/test_coefficient_precision.py, with that file's tolerances."""
    from test_coefficient_precision import SPECS, _oracle, _uniform_log_grid
    from test_fused_ops import _dense_jacobian

    if grid == "fine":
        schedule, t, jac_tol = S.EDM(), _uniform_log_grid("edm", 1e-4), 1e-11
    else:
        schedule, jac_tol = S.EDM(sigma_min=1e-9, sigma_max=100.0), 1e-12
        t = torch.tensor([80.0, 20.0, 1e-3, 1e-8, 5e-9], dtype=torch.float64)
    # the table's entries come from lambda = -log(sigma): an ulp of |lambda| (3.6e-15 relative at sigma = 5e-9) moves
    # a = exp(lambda_{i-1} - lambda_i) by as much, and CUDA's log/exp are within 1-2 ulp where glibc is within half
    # an ulp (the CPU table reaches 1.8e-15 on the large steps already): 8 ulp of the largest |lambda|, not the CPU
    # file's 2e-15; the Jacobian bounds are the CPU file's (1e-11 fine) or 5x it (large steps, 9e-14 on the CPU)
    tab_tol = max(2e-15, 8 * float(t.log().abs().max()) * 2.0 ** -52)
    kind, (p0, p1) = schedule.native_spec()
    for name, sp in SPECS.items():
        spec = SolverSpec(**sp)
        args = (kind, p0, p1, SOLVER_IDS[spec.kind], spec.order, spec.lower_order_final, spec.solver_type == "heun",
                spec.variant == "bh2", spec.has_corrector)
        tab, jac = (v.cpu() for v in C.coefficient_table(t.to(DEV), *args))
        want, want_jac = _oracle("edm", t, sp)
        dense = _dense_jacobian(jac, t.numel())  # the native Jacobian holds t_{i-3..i} per step
        row_scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        jac_scale = want_jac.abs().amax((-1, -2), keepdim=True).clamp_min(1e-300)
        assert float(((tab - want).abs() / row_scale).max()) <= tab_tol, name
        assert float(((dense - want_jac).abs() / jac_scale).max()) <= jac_tol, name


@needs_cuda
def test_cuda_graph_capture_of_sampler_step():
    """Coefficients stay on the device: a table + update step captures and replays in a CUDA graph, also
    with inputs walked in their channels_last layout, or copied into x's (the copies' buffers come from
    the graph's pool: no host sync either way)."""
    schedule, spec = S.VPLinear(), SolverSpec("dpmpp", 3)
    # x, history[0..2]
    for layouts in [("contiguous",) * 4, ("channels_last",) * 4, ("channels_last", "contiguous", "sliced", "permuted")]:
        t = torch.linspace(0.99, 0.01, 6, dtype=torch.float64, device=DEV)
        x, _, hist = _inputs(torch.float32, 3, shape=(8, 4, 32, 32))
        x, *hist = (_in_layout(u, lay) for u, lay in zip((x, *hist), layouts))
        static_out = torch.empty_like(x)
        captured = {}

        def step():
            table = fused.coefficient_table(schedule, t, spec)
            captured["y"] = fused.multistep_update(x, table[3, 0, :4], hist)
            static_out.copy_(captured["y"])

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # warm-up on a side stream, as capture requires
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        assert captured["y"].stride() == x.stride(), layouts
        x.mul_(0.5)  # new data in the captured buffers
        t.mul_(0.99)
        graph.replay()
        torch.cuda.synchronize()
        table = coefficient_table_reference(schedule, t, spec)
        torch.testing.assert_close(static_out, ops.multistep_update_reference(x, table[3, 0, :4], hist),
                                   rtol=1e-6, atol=1e-6, msg=lambda m: f"{layouts}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("J,with_v", [(1, False), (2, True), (3, True), (4, True), (0, True), (2, False)])
def test_cuda_adjoint_step_matches_cpu(dtype, J, with_v):
    """One reverse step of the whole-sampler backward: CUDA kernel vs CPU kernel, incl. in-place v."""
    g = torch.Generator().manual_seed(J)
    n = 3 * 4096 * 16 + 7  # several blocks plus a ragged tail
    mk = lambda: torch.randn(n, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    lam, x, m = mk(), mk(), mk()
    v = mk() if with_v else None
    older = [mk() for _ in range(max(J - (2 if with_v else 1), 0))]
    w = torch.randn(J, generator=g, dtype=torch.float64)
    sc = torch.tensor([0.7], dtype=torch.float64) if with_v else None
    res = []
    for dev in ("cpu", DEV.type):
        mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
        vv = mv(v.clone()) if with_v else None
        dots = torch.zeros(6, dtype=torch.float64, device=dev)
        gm = C.multistep_adjoint(mv(lam), vv, mv(sc), [mv(o) for o in older], mv(x), mv(m), mv(w), dots)
        res.append((None if gm is None else gm.cpu().double(), None if vv is None else vv.cpu().double(),
                    dots.cpu()))
    tol = RTOL[dtype]
    for a, b in zip(res[0], res[1]):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b, a, rtol=tol * 10, atol=tol * 10 * (n ** 0.5 if a.numel() < 7 else 1))


def test_cuda_adjoint_step_empty():
    """Zero-size tensors: no launch, gm empty, the step's dot products zeroed (as on the CPU)."""
    e = torch.empty(0, 3, device=DEV)
    dots = torch.full((5,), 7.0, dtype=torch.float64, device=DEV)
    w = torch.ones(2, dtype=torch.float64, device=DEV)
    gm = C.multistep_adjoint(e, e.clone(), torch.ones(1, dtype=torch.float64, device=DEV), [], e, e, w, dots)
    assert gm.shape == e.shape and torch.equal(dots.cpu()[:3], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("make_solver", [
    lambda ld3_ext: ld3_ext.DPMSolverPP(order=3), lambda ld3_ext: ld3_ext.UniPC(order=3),
    lambda ld3_ext: ld3_ext.IPNDM(order=4), lambda ld3_ext: ld3_ext.Heun()], ids=["dpmpp3", "unipc3", "ipndm4", "heun"])
def test_cuda_whole_sampler_matches_cpu_and_is_deterministic(make_solver):
    import ld3_ext
    schedule = S.EDM()
    W = 0.3 * torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def net(x, t):
        return torch.tanh(x @ W.to(x.device)) * (1.0 + 0.01 * t.reshape(-1, 1))
    model = ld3_ext.wrap_model(net, schedule, prediction="x0")
    t0 = (torch.linspace(80 ** (1 / 7), 0.002 ** (1 / 7), 7, dtype=torch.float64) ** 7)
    x0 = 10 * torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = {}
    for dev in ("cpu", "cuda", "cuda2"):
        d = "cpu" if dev == "cpu" else DEV.type
        t = t0.to(d).requires_grad_()
        x = x0.to(d).requires_grad_()
        y = make_solver(ld3_ext).sample(model, x, t)
        assert type(y.grad_fn).__name__ == "_WholeSamplerBackward"
        gx, gt = torch.autograd.grad(y.square().sum(), [x, t])
        out[dev] = [v.detach().cpu() for v in (y, gx, gt)]
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-11)
    for a, b in zip(out["cuda"], out["cuda2"]):
        assert torch.equal(a, b), "CUDA whole-sampler backward must be bitwise reproducible"


@pytest.mark.parametrize("solver", ["dpmpp3", "unipc3", "heun"])
def test_cuda_contiguous_outputs_for_a_channels_last_state(monkeypatch, solver):
    """A network returning contiguous tensors for a channels_last state: its outputs (and a contiguous incoming
    gradient) are converted once into the state's layout (ld3_ext/layout.py), so no kernel call on the device
    gets mixed layouts; results and gradients equal the CPU's contiguous solve."""
    import ld3_ext
    makers = {"dpmpp3": lambda: ld3_ext.DPMSolverPP(order=3), "unipc3": lambda: ld3_ext.UniPC(order=3),
              "heun": lambda: ld3_ext.Heun()}
    schedule = S.EDM()
    model = ld3_ext.wrap_model(lambda x, t: (torch.tanh(0.05 * x) * (1.0 + 0.01 * t.reshape(-1, 1, 1, 1))).contiguous(),
                               schedule, prediction="x0")
    t0 = torch.linspace(80 ** (1 / 7), 0.002 ** (1 / 7), 7, dtype=torch.float64) ** 7
    x0 = 80 * torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g0 = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mixed = []
    real = _native._C

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            if not name.startswith("multistep"):
                return fn

            def run(*args):
                shaped = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])
                          if isinstance(a, torch.Tensor) and a.shape == x0.shape]
                mixed.append(len({a.stride() for a in shaped}) > 1)
                return fn(*args)
            return run

    def solve(device, layout):
        x = x0.to(device).contiguous(memory_format=layout).requires_grad_()
        t = t0.to(device).requires_grad_()
        y = makers[solver]().sample(model, x, t)
        return [v.detach().cpu() for v in (y, *torch.autograd.grad(y, [x, t], g0.to(device)))], y

    want, _ = solve("cpu", torch.contiguous_format)
    monkeypatch.setattr(_native, "_C", Spy())
    monkeypatch.setattr(fused, "_C", Spy())
    got, y = solve(DEV, torch.channels_last)
    assert len(mixed) >= 6 and not any(mixed), mixed
    assert y.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@needs_cuda
def test_cuda_graph_capture_of_whole_sampler_backward():
    """The whole-sampler node (forward and its backward, the LD3 training step's solver part) reads
    its coefficients on the device and makes no host round trip: it captures in a CUDA graph and a
    replay on new inputs gives the eager result."""
    from ld3_ext import adjoint
    g = torch.Generator().manual_seed(5)
    orders = [1, 2, 3, 3, 2, 1]
    n = len(orders)
    table = (0.5 * torch.randn(n, 2, 5, generator=g, dtype=torch.float64)).to(DEV).requires_grad_()
    tm = torch.rand(n + 1, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    x = torch.randn(8, 4, 32, 32, generator=g).to(DEV).requires_grad_()
    gout = torch.randn(8, 4, 32, 32, generator=g).to(DEV)

    def evaluate(xx, tt, step):
        return torch.tanh(xx) * (1.0 + tt.to(xx.dtype))

    def run():
        y = adjoint.whole_sampler(evaluate, orders, 3, False, x, table, tm)
        return (y,) + torch.autograd.grad(y, [x, table, tm], gout)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run()  # warm-up on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
    with torch.no_grad():  # new data in the captured input buffers
        x.mul_(0.5)
        table.mul_(0.9)
        tm.mul_(0.8)
    graph.replay()
    torch.cuda.synchronize()
    want = run()
    assert type(want[0].grad_fn).__name__ == "_WholeSamplerBackward"
    for a, b in zip(static, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_cuda_sampling_checks_outputs_once_at_the_end():
    """On CUDA, sample() queues each output's NaN/Inf check on the device and reads them back once:
    a NaN at step 1 is still reported as step 1, after the remaining (cheap) steps ran."""
    import ld3_ext
    calls = []

    def net(x, t):
        calls.append(1)
        return 0.5 * x * (float("nan") if len(calls) == 2 else 1.0)
    model = ld3_ext.wrap_model(net, S.EDM(), prediction="x0")
    t = ld3_ext.discretizations.edm(S.EDM(), 6).to(DEV)
    with pytest.raises(ld3_ext.ModelOutputError, match="at step 1"):
        ld3_ext.DPMSolverPP(order=2).sample(model, torch.randn(2, 3, device=DEV, dtype=torch.float64), t)
    assert len(calls) == 6
    calls.clear()
    good = ld3_ext.wrap_model(lambda x, t: 0.5 * x, S.EDM(), prediction="x0")
    y = ld3_ext.DPMSolverPP(order=2).sample(good, torch.randn(2, 3, device=DEV, dtype=torch.float64), t)
    assert torch.isfinite(y).all()


@needs_cuda
def test_cuda_graph_capture_of_a_whole_sample_call():
    """A whole sample() call (fused DPM-Solver++(3M) and Heun, no gradients) captures in a CUDA graph:
    during capture only the checks that read no value run, and the output checks are not read back."""
    import ld3_ext
    schedule = S.EDM()
    model = ld3_ext.wrap_model(lambda x, t: torch.tanh(x) * (1.0 + 0.01 * t.reshape(-1, 1, 1, 1)), schedule,
                               prediction="x0")
    t = ld3_ext.discretizations.edm(schedule, 6).to(DEV)
    x = 80.0 * torch.randn(4, 3, 16, 16, device=DEV)
    for solver in (ld3_ext.DPMSolverPP(order=3), ld3_ext.Heun()):
        static, want = _replayed_and_eager_sample(solver, model, x, t)
        torch.testing.assert_close(static, want, rtol=1e-5, atol=1e-4)


def _replayed_and_eager_sample(solver, model, x, t):
    """A sample() call captured in a CUDA graph, replayed on x halved in place, and the eager call on it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        solver.sample(model, x, t)  # warm-up on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static = solver.sample(model, x, t)
    x.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        want = solver.sample(model, x, t)
    return static, want


@needs_cuda
def test_cuda_checkpointed_backward_checks_re_evaluations_once():
    """On CUDA the solvers hand the whole-sampler node the model's deferred_output_checks: with
    checkpointing, the backward's re-evaluations are checked in one read-back at the end, and a NaN
    that appears only in a re-evaluation is reported with its step."""
    import ld3_ext
    calls = []
    n = 6

    def net(x, t):
        calls.append(1)
        return 0.5 * x * (float("nan") if len(calls) == n + 2 else 1.0)  # re-evaluation of step n - 2
    model = ld3_ext.wrap_model(net, S.EDM(), prediction="x0")
    t = ld3_ext.discretizations.edm(S.EDM(), n).to(DEV).requires_grad_()
    x = torch.randn(2, 3, device=DEV, dtype=torch.float64)
    y = ld3_ext.DPMSolverPP(order=3, checkpoint_model=True).sample(model, x, t)
    assert type(y.grad_fn).__name__ == "_WholeSamplerBackward" and len(calls) == n
    with pytest.raises(ld3_ext.ModelOutputError, match=f"at step {n - 2}"):
        torch.autograd.grad(y.sum(), t)
    # queued, not raised at once: the node re-evaluated steps n-1..1; step 0 is the caller's evaluation, which the
    # engine re-runs only after the node's backward returns (the CPU twin: test_adjoint_sampler.py)
    assert len(calls) == 2 * n - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_cuda_wrapper_conversion_matches_the_reference(prediction, dtype):
    """The model wrapper's fused x0 <-> eps conversion on the device: values and gradients (x and the time) as
    the plain formulas give them, and the time gradient bitwise the same in a second run."""
    import ld3_ext
    schedule = S.VPLinear()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 65, 33, generator=g, dtype=torch.float64).to(dtype).to(DEV)
    gout = torch.randn(4, 3, 65, 33, generator=g, dtype=torch.float64).to(dtype).to(DEV)
    rtol = RTOL[dtype]
    res = {}
    for backend in ("reference", "fused", "fused again"):
        model = ld3_ext.wrap_model(lambda x, t: torch.tanh(x) * (1.0 + 0.1 * t.reshape(-1, 1, 1, 1)), schedule,
                                   prediction=prediction, backend=backend.split()[0])
        xs = x.clone().requires_grad_()
        t = torch.tensor(0.6, dtype=torch.float64, device=DEV, requires_grad=True)
        x0, eps = model.predict(xs, t)
        gx, gt = torch.autograd.grad([x0, eps], [xs, t], [gout, gout])
        res[backend] = (x0.detach(), eps.detach(), gx, gt)
    for a, b in zip(res["fused"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=10 * rtol, atol=10 * rtol * float(b.abs().max()))
    assert torch.equal(res["fused"][3], res["fused again"][3])


@needs_cuda
def test_cuda_graph_capture_of_a_sample_call_with_an_eps_model():
    """The fused conversion builds its coefficients on the device: an eps-model sample captures in a graph."""
    import ld3_ext
    schedule = S.VPLinear()
    model = ld3_ext.wrap_model(lambda x, t: 0.5 * torch.tanh(x), schedule, prediction="eps")
    t = ld3_ext.discretizations.get_discretization("logsnr", schedule, 6).to(DEV)
    x = torch.randn(4, 3, 16, 16, device=DEV)
    static, want = _replayed_and_eager_sample(ld3_ext.DPMSolverPP(order=3), model, x, t)
    torch.testing.assert_close(static, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_fullgraph_compile_of_a_fused_sampler(dtype):
    """torch.compile(fullgraph=True) traces a fused sampler on the device (the device gate is a constant to
    Dynamo: it cannot trace the pybind has_cuda()); the traced graph calls the registered ld3_ext ops, and the
    sample and its grid gradient are eager's."""
    import ld3_ext
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    s = S.EDM()
    model = ld3_ext.wrap_model(lambda x, t: x / (1.0 + t.reshape(-1, 1, 1, 1) ** 2), s, prediction="x0")
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEV)
    solver = ld3_ext.DPMSolverPP(order=3, backend="fused")
    t_eager = ld3_ext.discretizations.logsnr_uniform(s, 5).to(DEV).requires_grad_(True)
    t_comp = t_eager.detach().clone().requires_grad_(True)
    want = solver.sample(model, x, t_eager)
    want.square().sum().backward()
    torch._dynamo.reset()
    got = torch.compile(lambda xx, tt: solver.sample(model, xx, tt), fullgraph=True, backend=recording_backend)(
        x, t_comp)
    got.square().sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(t_comp.grad, t_eager.grad, rtol=100 * tol, atol=100 * tol * float(t_eager.grad.abs().max()))
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert sum("ld3_ext.multistep_update" in tg for tg in targets) >= 4, targets  # one update per step


@needs_cuda
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cuda_graph_capture_of_a_sample_call_on_a_discrete_schedule(prediction):
    """Stable Diffusion's schedule (VPDiscrete) is read about twice a step.  Each read copied its knots from the
    host and indexed them with a 0-dim tensor (an item() each), and its table built constants from Python lists:
    all host round trips, which stall every step and which a graph capture refuses."""
    import ld3_ext
    schedule = S.VPDiscrete.linear(0.00085, 0.012)
    model = ld3_ext.wrap_model(lambda x, t: 0.5 * torch.tanh(x), schedule, prediction=prediction)
    t = ld3_ext.discretizations.get_discretization("logsnr", schedule, 6).to(DEV)
    x = torch.randn(4, 3, 16, 16, device=DEV)
    static, want = _replayed_and_eager_sample(ld3_ext.DPMSolverPP(order=3), model, x, t)
    torch.testing.assert_close(static, want, rtol=1e-5, atol=1e-5)


class _TinyEpsNet(torch.nn.Module):
    """A small seeded MLP eps network (time as an input feature), for training on the device."""

    def __init__(self, dim=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(dim + 1, 16, generator=g, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(16, dim, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        tt = (t.reshape(-1, 1) / 1000.0).to(x.dtype).expand(x.shape[0], 1)
        return torch.tanh(torch.cat([x, tt], 1) @ self.w1.to(x.dtype)) @ self.w2.to(x.dtype)


def test_cuda_ld3_training_runs_on_the_device(tmp_path):
    """LD3Trainer with device=cuda: the teacher pairs, the parameterised grid, the unrolled sampler and its
    gradients all on the GPU, on Stable Diffusion's schedule (VPDiscrete, eps network); the learned schedule
    beats the logSNR grid it can start from, on held-out noises."""
    import ld3_ext
    schedule = S.VPDiscrete.linear(0.00085, 0.012)
    model = ld3_ext.wrap_model(_TinyEpsNet().to(DEV), schedule, prediction="eps")
    solver = ld3_ext.DPMSolverPP(order=2)
    trainer = ld3_ext.LD3Trainer(model, schedule, solver, 4, device=DEV, dtype=torch.float64, sample_shape=(4,),
                                 model_name="tiny-eps", n_train=12, n_valid=12, rounds_v1=1, rounds_v2=2,
                                 init="logsnr", time_mode="lambda", checkpoint_dir=str(tmp_path / "ckpt"),
                                 progress=False)
    learned = trainer.fit()
    t = learned.timesteps
    assert t.dtype == torch.float64 and bool((t[1:] < t[:-1]).all())
    g = torch.Generator().manual_seed(77)
    x_T = (schedule.prior_std() * torch.randn(16, 4, generator=g, dtype=torch.float64)).to(DEV)
    with torch.no_grad():
        teacher = ld3_ext.UniPC(order=3).sample(model, x_T,
                                                ld3_ext.discretizations.logsnr_uniform(schedule, 40).to(DEV))
        ours = learned.sample(model, x_T)
        base = solver.sample(model, x_T, ld3_ext.discretizations.logsnr_uniform(schedule, 4).to(DEV))
    assert ours.device.type == DEV.type

    def rmse(y):
        return float((y - teacher).pow(2).mean().sqrt())
    assert rmse(ours) < rmse(base), (rmse(ours), rmse(base))


def test_cuda_exact_reference_solution_of_a_test_bed():
    """teacher='exact' on a GPU: the test bed's scipy solve runs on the host and its result comes back on x_T's
    device (it called .numpy() on the CUDA tensor)."""
    import ld3_ext
    mix = ld3_ext.testbeds.ring2d()
    schedule = S.EDM()
    x_T = mix.prior_noise(schedule, 4, generator=torch.Generator().manual_seed(5))
    want = mix.reference_solution(schedule, x_T)
    got = mix.reference_solution(schedule, x_T.to(DEV))
    assert got.device.type == DEV.type
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("solver_name", ["dpmpp", "heun"])
def test_cuda_whole_sampler_backward_replays_dropout(solver_name):
    """Checkpointed and second backwards re-evaluate the network: with the device generator's state of the forward
    (CUDA dropout draws from it), so the gradients are the reference backend's."""
    import ld3_ext
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Dropout(0.3)).double().to(DEV).train()
    net.requires_grad_(False)
    model = ld3_ext.wrap_model(lambda x, t: net(x) * (1 + 0.01 * t.reshape(-1, 1)), ld3_ext.EDM(), prediction="x0")
    t0 = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002], dtype=torch.float64, device=DEV)
    x0 = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEV) * 80.0
    make = {"dpmpp": lambda b, ck: ld3_ext.DPMSolverPP(order=3, backend=b, checkpoint_model=ck),
            "heun": lambda b, ck: ld3_ext.Heun(backend=b, checkpoint_model=ck)}[solver_name]
    grads = {}
    for backend, ck in (("reference", False), ("fused", True), ("fused", False)):
        torch.manual_seed(5)
        t, x = t0.clone().requires_grad_(), x0.clone().requires_grad_()
        y = make(backend, ck).sample(model, x, t)
        runs = [torch.autograd.grad(y.square().sum(), [x, t], retain_graph=k == 0) for k in range(2)]
        grads[(backend, ck)] = runs
    ref = grads[("reference", False)][0]
    for key in (("fused", True), ("fused", False)):
        for run in grads[key]:
            for a, b in zip(run, ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
