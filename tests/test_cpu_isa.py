"""The CPU loops' two instruction-set copies (baseline and AVX2, csrc/cpu/cpu_isa.h): each against
the float64-capable references, against each other (element-wise bitwise, dot products to rounding),
reproducible for any thread count, and the selection API / environment variable."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ld3_ext import _native

if not _native.native_available():  # only a missing build may skip this file
    pytest.skip(f"ld3_ext._C is not built: {_native.load_error()}", allow_module_level=True)

from ld3_ext import ops  # noqa: E402
from ld3_ext.adjoint import adjoint_step_reference  # noqa: E402

C = _native.get()
ISAS = C.available_cpu_isas()
# sizes: a vector tail (n % 8 != 0), several reduction chunks plus a tail
SIZES = [37, 2 * C.reduce_chunk + 1003]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.fixture
def use_isa():
    """Selects an instruction set for one test and restores the one in use before."""
    previous = C.cpu_isa()
    yield C.set_cpu_isa
    C.set_cpu_isa(previous)


def _randn(n, dtype, g, k):
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(k)]


def _update_all(n, dtype, k, seed):
    """Forward, backward (all grads) and dot products of one update, with the active instruction set."""
    g = torch.Generator().manual_seed(seed)
    x, gout, *hist = _randn(n, dtype, g, 2 + k)
    coef = torch.randn(1 + k, generator=g, dtype=torch.float64)
    out = C.multistep_update(x, coef, hist)
    gx, gc, gh = C.multistep_update_backward(gout, x, coef, hist)
    return (x, gout, hist, coef), out, gx, gc, gh


def _adjoint_all(n, dtype, J, has_v, seed):
    g = torch.Generator().manual_seed(seed)
    lam, v, x, m, *older = _randn(n, dtype, g, 4 + J)
    w = torch.randn(J, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.7], dtype=torch.float64)
    older = older[: max(J - (2 if has_v else 1), 0)]  # L_1 = lam_prev when v is given
    dots = torch.zeros(5, dtype=torch.float64)
    vv = v.clone() if has_v else None
    gm = C.multistep_adjoint(lam, vv, scale if has_v else None, older, x, m, w, dots)
    return (lam, v, scale, older, x, m, w), gm, vv, dots


def test_selection_api(use_isa):
    assert ISAS[0] == "base" and set(ISAS) <= {"base", "avx2"}
    assert C.cpu_isa() in ISAS
    previous = C.cpu_isa()
    assert use_isa("base") == previous and C.cpu_isa() == "base"
    assert use_isa("auto") == "base" and C.cpu_isa() == ISAS[-1]  # auto: the best available
    with pytest.raises(RuntimeError, match="isa must be 'base', 'avx2' or 'auto', got 'sse9'"):
        use_isa("sse9")
    assert C.cpu_isa() == ISAS[-1]  # a refused call changes nothing
    if "avx2" not in ISAS:
        with pytest.raises(RuntimeError, match="isa='avx2' is not available"):
            use_isa("avx2")


@pytest.mark.parametrize("value,expected", [("base", "base"), ("auto", None), ("bogus", None), ("", None)])
def test_environment_variable(value, expected, tmp_path):
    """LD3_CPU_ISA picks at load; an unknown value falls back to the best one (the module still loads)."""
    env = {**os.environ, "LD3_CPU_ISA": value}
    # run outside the checkout: there, the source tree's ld3_ext (no built _C) would shadow the installed one
    res = subprocess.run([sys.executable, "-c", "import ld3_ext._C as C; print(C.cpu_isa())"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (expected or ISAS[-1])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("isa", ISAS)
def test_update_matches_reference(isa, dtype, k, n, use_isa):
    use_isa(isa)
    (x, gout, hist, coef), out, gx, gc, gh = _update_all(n, dtype, k, seed=10 * k + n)
    leaves = [t.double().requires_grad_() for t in (x, coef, *hist)]
    ref = ops.multistep_update_reference(leaves[0], leaves[1], leaves[2:])
    ref.backward(gout.double())
    scale = coef[0].abs() * x.double().abs() + sum(coef[1 + j].abs() * m.double().abs() for j, m in enumerate(hist))
    assert bool(((out.double() - ref.detach()).abs() <= TOL[dtype] * scale + 1e-300).all())
    torch.testing.assert_close(gx.double(), leaves[0].grad, rtol=TOL[dtype], atol=0)
    for j in range(k):
        torch.testing.assert_close(gh[j].double(), leaves[2 + j].grad, rtol=TOL[dtype], atol=0)
    dots_scale = torch.stack([(gout.double().abs() * t.double().abs()).sum() for t in (x, *hist)])
    assert bool(((gc - leaves[1].grad).abs() <= TOL[dtype] * dots_scale).all()), (gc, leaves[1].grad)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("J", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("has_v", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("isa", ISAS)
def test_adjoint_matches_reference(isa, dtype, has_v, J, n, use_isa):
    use_isa(isa)
    (lam, v, scale, older, x, m, w), gm, vv, dots = _adjoint_all(n, dtype, J, has_v, seed=J + n)
    v_ref = v.double().clone() if has_v else None
    ref_dots = torch.zeros(5, dtype=torch.float64)
    gm_ref = adjoint_step_reference(lam.double(), v_ref, scale if has_v else None, [o.double() for o in older],
                                    x.double(), m.double(), w, ref_dots)
    if has_v:
        torch.testing.assert_close(vv.double(), v_ref, rtol=TOL[dtype], atol=TOL[dtype])
    if J == 0:
        assert gm is None and gm_ref is None
    else:
        torch.testing.assert_close(gm.double(), gm_ref, rtol=TOL[dtype], atol=TOL[dtype] * 4)
    mag = float(n) ** 0.5 * 4  # the dot products of unit normals are O(sqrt(n)) with O(n) |terms|
    torch.testing.assert_close(dots, ref_dots, rtol=0, atol=TOL[dtype] * mag * 16)
    assert bool((dots[1 + J:] == 0).all())


needs_two = pytest.mark.skipif(len(ISAS) < 2, reason="this CPU runs only the baseline copy")


@needs_two
@pytest.mark.parametrize("k", [0, 1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_isas_agree_elementwise_bitwise(dtype, k, use_isa):
    """No FMA in either copy: every element-wise output is bitwise equal; the dot products differ
    only in summation order."""
    n = SIZES[1]
    use_isa("base")
    _, out_b, gx_b, gc_b, gh_b = _update_all(n, dtype, k, seed=k)
    _, gm_b, v_b, dots_b = _adjoint_all(n, dtype, k, True, seed=k)
    use_isa("avx2")
    _, out_a, gx_a, gc_a, gh_a = _update_all(n, dtype, k, seed=k)
    _, gm_a, v_a, dots_a = _adjoint_all(n, dtype, k, True, seed=k)
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)
    assert all(torch.equal(a, b) for a, b in zip(gh_a, gh_b))
    assert torch.equal(v_a, v_b) and (gm_a is None) == (gm_b is None)
    if gm_a is not None:
        assert torch.equal(gm_a, gm_b)
    tol = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(gc_a, gc_b, rtol=tol, atol=tol)
    torch.testing.assert_close(dots_a, dots_b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_reproducible_for_any_thread_count(isa, dtype, use_isa):
    use_isa(isa)
    n = 5 * C.reduce_chunk + 17
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            _, out, gx, gc, gh = _update_all(n, dtype, 3, seed=1)
            _, gm, v, dots = _adjoint_all(n, dtype, 3, True, seed=1)
            runs.append((out, gx, gc, *gh, gm, v, dots))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threshold", [0, -1])
def test_streamed_float32_path_per_isa(isa, threshold, use_isa):
    """The non-temporal-store loop (float32) is bitwise equal to the reference in each copy."""
    use_isa(isa)
    previous = C.set_stream_min_bytes(threshold)
    try:
        g = torch.Generator().manual_seed(3)
        x, *hist = _randn((1 << 16) + 3, torch.float32, g, 4)
        coef = torch.randn(4, generator=g, dtype=torch.float64)
        assert torch.equal(C.multistep_update(x, coef, hist), ops.multistep_update_reference(x, coef, hist))
    finally:
        C.set_stream_min_bytes(previous)


def _all_patterns(dtype):
    """Every 16-bit pattern of dtype, as a tensor of that dtype."""
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


def _same_bits_or_both_nan(a, b):
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return bool((nan_a == nan_b).all()) and torch.equal(a[~nan_a].view(torch.int16), b[~nan_b].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("isa", ISAS)
def test_half_conversions_match_torch_on_every_pattern(isa, dtype, use_isa):
    """The loops' own half/bfloat16 conversions (csrc/cpu/element_io.h, written so they vectorise)
    round exactly like torch's: every 16-bit input pattern, through a*x (loads), a*x + b*m with
    rounding to nearest even, overflow to inf, subnormal results (stores), and the adjoint's
    stored-then-reused value; NaN stays NaN."""
    use_isa(isa)
    x = _all_patterns(dtype)
    g = torch.Generator().manual_seed(7)
    m = x[torch.randperm(x.numel(), generator=g)]
    coefs = [torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.3, 0.7], dtype=torch.float64),
             torch.tensor([1.7, -1e-3], dtype=torch.float64), torch.tensor([3e-5, 2.5], dtype=torch.float64)]
    for coef in coefs:
        hist = [m] if coef.numel() == 2 else []
        assert _same_bits_or_both_nan(C.multistep_update(x, coef, hist), ops.multistep_update_reference(x, coef, hist))
    # the identity keeps every non-NaN pattern (loads and stores are exact inverses)
    same = C.multistep_update(x, coefs[0], [])
    assert _same_bits_or_both_nan(same, x)
    # adjoint: L0 = scale*lam + v is rounded to dtype, stored into v and reused; gm = w0 * L0
    for scale in (0.5, 1.3e-3):
        v, v_ref = m.clone(), m.clone()
        s = torch.tensor([scale], dtype=torch.float64)
        w = torch.tensor([0.9], dtype=torch.float64)
        gm = C.multistep_adjoint(x, v, s, [], None, None, w, None)
        gm_ref = adjoint_step_reference(x, v_ref, s, [], None, None, w, None)
        assert _same_bits_or_both_nan(v, v_ref) and _same_bits_or_both_nan(gm, gm_ref)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("isa", ISAS)
def test_float16_update_tail_and_alias(isa, k, use_isa):
    """The float16 update (on AVX2 CPUs an F16C loop, 8 elements a step, with a scalar tail):
    bitwise equal to the reference for lengths off the vector width, also in place (out=x)."""
    use_isa(isa)
    g = torch.Generator().manual_seed(k)
    for n in (1, 7, 8, 9, 1003):
        x, *hist = (torch.randn(n, generator=g).to(torch.float16) for _ in range(1 + k))
        coef = torch.randn(1 + k, generator=g, dtype=torch.float64)
        expected = ops.multistep_update_reference(x, coef, hist)
        assert torch.equal(C.multistep_update(x, coef, hist), expected)
        y = x.clone()
        C.multistep_update(y, coef, hist, y)
        assert torch.equal(y, expected)


HALF_SIZES = [1, 7, 8, 9, 37, 263, 2 * C.reduce_chunk + 1003]  # off the vector width, blocks of 256, chunks


def _dots_close(native, reference, scale, what):
    """Dot products summed in float (blocks of 256) then double, against float64 sums of the same
    products: within a few float roundings of the sum of |terms|."""
    err = (native - reference).abs()
    assert bool((err <= 1e-5 * scale + 1e-30).all()), (what, native, reference, scale)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("isa", ISAS)
def test_half_backward_matches_reference(isa, dtype, k, use_isa):
    """The half-type update backward (for float16 on AVX2 CPUs an F16C loop, 8 elements a step,
    with a scalar tail per block): grads bitwise equal to c_k * g rounded like torch, dot products
    to float rounding of the float64 sums, for every combination of wanted grads."""
    use_isa(isa)
    for n in HALF_SIZES:
        (x, gout, hist, coef), _, gx, gc, gh = _update_all(n, dtype, k, seed=100 + 10 * k + n)
        c32 = coef.to(torch.float32)
        g32 = gout.to(torch.float32)
        assert torch.equal(gx, (c32[0] * g32).to(dtype))
        for j in range(k):
            assert torch.equal(gh[j], (c32[1 + j] * g32).to(dtype))
        g64 = gout.double()
        terms = [g64 * t.double() for t in (x, *hist)]
        _dots_close(gc, torch.stack([t.sum() for t in terms]), torch.stack([t.abs().sum() for t in terms]), n)
        # each subset of grads: the same values where computed
        for need_x, need_coef, need_hist in [(True, False, False), (False, True, False), (False, False, True),
                                             (True, True, False), (False, True, True), (True, False, True)]:
            sx, sc, sh = C.multistep_update_backward(gout, x, coef, hist, need_x, need_coef, need_hist)
            assert (sx is not None) == need_x and (sc is not None) == need_coef
            if need_x:
                assert torch.equal(sx, gx)
            if need_coef:
                assert torch.equal(sc, gc)
            if need_hist:
                assert all(torch.equal(a, b) for a, b in zip(sh, gh))


@pytest.mark.parametrize("J", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("has_v", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("isa", ISAS)
def test_half_adjoint_matches_reference(isa, dtype, has_v, J, use_isa):
    """The half-type adjoint step (for float16 on AVX2 CPUs an F16C loop): the stored adjoint and gm
    bitwise equal to the reference run on the same half tensors (which rounds L_0 once and reuses
    it), the dot products to float rounding of float64 sums of the same products."""
    use_isa(isa)
    for n in HALF_SIZES:
        (lam, v, scale, older, x, m, w), gm, vv, dots = _adjoint_all(n, dtype, J, has_v, seed=200 + J + n)
        v_ref = v.clone() if has_v else None
        gm_ref = adjoint_step_reference(lam, v_ref, scale if has_v else None, older, x, m, w, None)
        if has_v:
            assert torch.equal(vv, v_ref)
        assert (gm is None) == (gm_ref is None) and (gm is None or torch.equal(gm, gm_ref))
        lams = ([v_ref, lam] if has_v else [lam]) + list(older)
        terms = [lams[0].double() * x.double()] + [lams[j].double() * m.double() for j in range(J)]
        _dots_close(dots[: 1 + J], torch.stack([t.sum() for t in terms]),
                    torch.stack([t.abs().sum() for t in terms]), n)
        assert bool((dots[1 + J:] == 0).all())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dot_products_are_summed_in_double(use_isa, isa, dtype):
    """The dot products that feed the timestep gradients cancel (|<g, x>| << sum |g_i x_i|), so they are summed in
    double, as the CUDA kernels and adjoint_step_reference do: a product of two float/half values is exact in
    double, and the result is the exact dot of the stored values to double rounding.  Summed in float blocks, as
    before, they lost ~1e-7 of sum |g_i x_i| here and up to 3.9e-4 of a float32 sampler's time gradient."""
    import math
    use_isa(isa)
    n = 2 * C.reduce_chunk + 1003
    g = torch.Generator().manual_seed(11)
    a = torch.randn(n, generator=g, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    b = c - (a @ c) / (a @ a) * a  # <a, b> = 0 before rounding: the stored dot is pure cancellation
    a, b = a.to(dtype), b.to(dtype)
    terms = (a.double() * b.double()).tolist()  # exact products of the stored values
    exact, size = math.fsum(terms), math.fsum(abs(v) for v in terms)
    assert abs(exact) < 1e-3 * size  # the case this is about

    _, gc, _ = C.multistep_update_backward(a, b, torch.tensor([0.5, 0.25], dtype=torch.float64), [b])
    dots = torch.zeros(5, dtype=torch.float64)
    C.multistep_adjoint(a, None, None, [], b, b, torch.tensor([0.5], dtype=torch.float64), dots)
    for what, got in (("update backward <g, x>", gc[0]), ("update backward <g, m>", gc[1]),
                      ("adjoint <L0, x>", dots[0]), ("adjoint <L0, m>", dots[1])):
        assert abs(float(got) - exact) <= 1e-12 * size, (what, float(got), exact, size)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", range(5))
def test_half_update_accumulates_in_float(use_isa, isa, dtype, k):
    """float16/bfloat16 updates accumulate in float (the op-math type) and round once: bitwise the reference's
    float32 result, and not what the same sum accumulated in the half type gives (so the check can fail)."""
    use_isa(isa)
    g = torch.Generator().manual_seed(k)
    x, *hist = _randn(10007, dtype, g, 1 + k)
    coef = torch.randn(1 + k, generator=g, dtype=torch.float64)
    got = C.multistep_update(x, coef, hist)
    assert torch.equal(got, ops.multistep_update_reference(x, coef, hist))
    in_half = coef[0].to(dtype) * x
    for j in range(k):
        in_half = in_half + coef[1 + j].to(dtype) * hist[j]
    assert not torch.equal(got, in_half)
