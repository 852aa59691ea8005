"""Property-based fuzzing of the native ops (``ld3_ext._C`` via ``ld3_ext.fused``) against the
pure-PyTorch reference: random shapes (0-size, 0-d, 1-element, several reduce chunks), all four
dtypes, non-contiguous and broadcast (expand, stride 0) inputs, ``out=`` aliasing an input,
history aliasing x, history lengths 0-4, and random valid grids/parameters of every closed-form
schedule with every solver kind/order/flavour -- outputs and all gradients.

``derandomize=True`` makes every run draw the same examples, so CI is deterministic; the example
counts keep the file under ~20 s on two cores (and under the sanitizer build in a few minutes)."""
from __future__ import annotations

import math
import os

import pytest
import torch

from ld3_ext import _native

if not _native.native_available():  # only a missing build may skip this file
    pytest.skip(f"ld3_ext._C is not built: {_native.load_error()}", allow_module_level=True)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ld3_ext import fused, ops  # noqa: E402
from ld3_ext import schedules as S  # noqa: E402
from ld3_ext.coefficients import MAX_ORDER, SOLVER_IDS, SolverSpec, coefficient_table_reference  # noqa: E402

C = _native.get()
# LD3_FUZZ_EXAMPLES scales the example counts (e.g. 5 for a nightly soak); default keeps CI fast.
_SCALE = float(os.environ.get("LD3_FUZZ_EXAMPLES", "1"))
FUZZ = dict(deadline=None, derandomize=True, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# per-element relative tolerance (x unit roundoff, with slack for the op-math rounding order)
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}
# coefficient gradients are dot products; the reference sums low-precision products itself
DOT_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# ---------------------------------------------------------------------------------------------
# tensor factories: a base leaf plus the view handed to the op
# ---------------------------------------------------------------------------------------------
def _make(shape, dtype, layout, gen):
    """(leaf, view): ``view`` has ``shape`` and the requested memory layout; gradients land in ``leaf``."""
    shape = tuple(shape)
    if layout == "contig" or len(shape) == 0:
        leaf = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        return leaf, leaf
    if layout == "noncontig":  # every other element of a transposed, wider buffer
        wide = shape[:-1] + (2 * shape[-1] + 1,)
        leaf = torch.randn(wide, generator=gen, dtype=torch.float64).to(dtype)
        if len(shape) >= 2:
            leaf = torch.randn(shape[:-2] + (2 * shape[-1] + 1, shape[-2]), generator=gen,
                               dtype=torch.float64).to(dtype)
            return leaf, leaf.transpose(-1, -2)[..., : 2 * shape[-1] : 2]
        return leaf, leaf[: 2 * shape[-1] : 2]
    # "expand": the first dimension is broadcast from size 1 (stride 0)
    small = (1,) + shape[1:]
    leaf = torch.randn(small, generator=gen, dtype=torch.float64).to(dtype)
    return leaf, leaf.expand(shape)


shapes = st.one_of(
    st.lists(st.integers(0, 5), min_size=0, max_size=4),          # incl. 0-d, 0-size, 1-element
    st.sampled_from([[1], [1, 1, 1], [0], [3, 0, 2], [70001], [2, 40000]]),  # multi-chunk / tails
)
layouts = st.sampled_from(["contig", "noncontig", "expand"])


@st.composite
def update_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    k = draw(st.integers(0, 4))
    shape = draw(shapes)
    lay = [draw(layouts) for _ in range(1 + k)]
    ncoef = draw(st.integers(1 + k, 5))
    alias = draw(st.sampled_from([None] + list(range(k))))  # history[alias] is x itself
    out_mode = draw(st.sampled_from(["none", "none", "fresh", "fresh_noncontig", "x", "hist0"]))
    needs = draw(st.lists(st.booleans(), min_size=2 + k, max_size=2 + k))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return dtype, k, shape, lay, ncoef, alias, out_mode, needs, seed


def _close(actual, expected, scale, tol, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs()
    bound = tol * scale.double() + 1e-300
    ok = (err <= bound) | (err == 0)
    assert bool(ok.all()), f"{what}: max excess {float((err / bound).max()):.3g}x tolerance"


@settings(max_examples=int(150 * _SCALE), **FUZZ)
@given(update_cases())
def test_fuzz_multistep_update(case):
    dtype, k, shape, lay, ncoef, alias, out_mode, needs, seed = case
    gen = torch.Generator().manual_seed(seed)
    pairs = [_make(shape, dtype, lay[j], gen) for j in range(1 + k)]
    coef_leaf = torch.randn(ncoef, generator=gen, dtype=torch.float64)
    if alias is not None:
        pairs[1 + alias] = pairs[0]

    if out_mode != "none":
        x = pairs[0][1]
        hist = [p[1] for p in pairs[1:]]
        expected = ops.multistep_update_reference(x.clone(), coef_leaf[: 1 + k], [h.clone() for h in hist])
        if out_mode == "fresh":
            out = torch.empty(shape, dtype=dtype)
        elif out_mode == "fresh_noncontig":
            out = _make(shape, dtype, "noncontig", gen)[1]
        elif out_mode == "x":
            out = x
        else:
            if k == 0:
                out = torch.empty(shape, dtype=dtype)
            else:
                out = hist[0]
        overlapping = out.numel() > 1 and any(s == 0 for s, n in zip(out.stride(), out.shape) if n > 1)
        if overlapping:  # an expanded out would be written through twice: must be refused cleanly
            with pytest.raises(RuntimeError, match="(?i)overlap|memory location"):
                fused.multistep_update(x, coef_leaf, hist, out=out)
            return
        res = fused.multistep_update(x, coef_leaf, hist, out=out)
        assert res is out or res.data_ptr() == out.data_ptr()
        # same op-math, same rounding order: bitwise equal to the reference
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        return

    # autograd path
    leaves_f = []
    leaves_r = []
    views_f = []
    views_r = []
    seen = {}
    for j, (leaf, view) in enumerate(pairs):
        key = id(leaf)
        if key not in seen:
            rg = bool(needs[0 if j == 0 else 1 + j])
            lf = leaf.detach().clone().requires_grad_(rg)
            lr = leaf.detach().clone().requires_grad_(rg)
            seen[key] = (lf, lr, leaf, view)
        lf, lr, leaf0, view0 = seen[key]
        rebuild = (lambda L, v=view0, l0=leaf0: L if v is l0 else
                   L.as_strided(v.shape, v.stride(), v.storage_offset() - l0.storage_offset()))
        views_f.append(rebuild(lf))
        views_r.append(rebuild(lr))
        leaves_f.append(lf)
        leaves_r.append(lr)
    cf = coef_leaf.clone().requires_grad_(bool(needs[1]))
    cr = coef_leaf.clone().requires_grad_(bool(needs[1]))
    out_f = fused.multistep_update(views_f[0], cf, views_f[1:])
    out_r = ops.multistep_update_reference(views_r[0], cr, views_r[1:])
    assert out_f.dtype == dtype and out_f.shape == torch.Size(shape)
    xs = [v.detach() for v in views_r]
    c = coef_leaf[: 1 + k]
    scale = sum(c[j].abs() * xs[j].double().abs() for j in range(1 + k))
    _close(out_f, out_r, scale, RTOL[dtype], "forward")

    if not out_f.requires_grad:
        return
    w = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
    (out_f.double() * w).sum().backward()
    (out_r.double() * w).sum().backward()
    # gradient scales: the reference gradients of sum(|c| |inputs| |w|) (sums over expanded dims)
    abs_leaves = []
    abs_views = []
    seen_abs = {}
    for j, (leaf, view) in enumerate(pairs):
        if id(leaf) not in seen_abs:
            la = leaf.detach().double().abs().requires_grad_()
            seen_abs[id(leaf)] = la
        la = seen_abs[id(leaf)]
        abs_leaves.append(la)
        abs_views.append(la if view is leaf else la.as_strided(view.shape, view.stride(),
                                                                view.storage_offset() - leaf.storage_offset()))
    sc = sum(c[j].abs() * abs_views[j] for j in range(1 + k))
    (sc * w.abs()).sum().backward()
    done = set()
    for j in range(1 + k):
        lf, lr, la = leaves_f[j], leaves_r[j], abs_leaves[j]
        if id(lf) in done or not lf.requires_grad:
            continue
        done.add(id(lf))
        assert lf.grad is not None and lf.grad.dtype == dtype
        _close(lf.grad, lr.grad, la.grad, 2 * RTOL[dtype], f"grad input {j}")
    if cf.requires_grad:
        assert cf.grad.dtype == torch.float64 and cf.grad.shape == (ncoef,)
        dots = torch.stack([(w.abs() * x.double().abs()).sum() for x in xs])
        _close(cf.grad[: 1 + k], cr.grad[: 1 + k], dots, DOT_TOL[dtype], "grad coef")
        assert torch.all(cf.grad[1 + k:] == 0)


@settings(max_examples=int(60 * _SCALE), **FUZZ)
@given(dtype=st.sampled_from(DTYPES), k=st.integers(0, 4), n=st.sampled_from([0, 1, 7, 300, 70001]),
       flags=st.lists(st.booleans(), min_size=3, max_size=3), grad_layout=layouts, seed=st.integers(0, 2 ** 31 - 1))
def test_fuzz_update_backward_entry(dtype, k, n, flags, grad_layout, seed):
    """The raw backward entry with every need_* combination and odd grad layouts (as autograd hands them)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    hist = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(k)]
    coef = torch.randn(1 + k, generator=gen, dtype=torch.float64)
    grad = _make((n,), dtype, grad_layout, gen)[1]
    need_x, need_c, need_h = flags
    gx, gc, gh = C.multistep_update_backward(grad, x, coef, hist, need_x, need_c, need_h)
    g64 = grad.double()
    if need_x:
        _close(gx, (coef[0] * g64).to(dtype), (coef[0] * g64).abs(), RTOL[dtype], "gx")
    else:
        assert gx is None
    if need_h:
        assert len(gh) == k
        for j in range(k):
            _close(gh[j], (coef[1 + j] * g64).to(dtype), (coef[1 + j] * g64).abs(), RTOL[dtype], "gh")
    else:
        assert len(gh) == 0
    if need_c:
        ref = torch.stack([(g64 * t.double()).sum() for t in (x, *hist)])
        dots = torch.stack([(g64.abs() * t.double().abs()).sum() for t in (x, *hist)])
        # op-math (fp32) partial sums for the half types
        tol = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}[dtype]
        _close(gc, ref, dots, tol, "gc")
    else:
        assert gc is None


# ---------------------------------------------------------------------------------------------
# coefficient table and its gradient
# ---------------------------------------------------------------------------------------------
schedules = st.one_of(
    st.builds(lambda a, b: S.EDM(sigma_min=a, sigma_max=b), st.floats(1e-3, 0.1), st.floats(1.0, 120.0)),
    st.builds(lambda a, b: S.VPLinear(beta_min=a, beta_max=b), st.floats(0.01, 1.0), st.floats(5.0, 25.0)),
    st.builds(lambda s: S.VPCosine(s=s), st.floats(1e-3, 0.02)),
    st.builds(lambda sh: S.FlowMatching(shift=sh), st.floats(0.3, 5.0)),
)


@st.composite
def specs(draw):
    kind = draw(st.sampled_from(sorted(SOLVER_IDS)))
    order = draw(st.integers(1, MAX_ORDER[kind]))
    return SolverSpec(kind, order, lower_order_final=draw(st.booleans()),
                      solver_type=draw(st.sampled_from(["midpoint", "heun"])),
                      variant=draw(st.sampled_from(["bh1", "bh2"])), use_corrector=draw(st.booleans()))


@st.composite
def grids(draw, schedule):
    """A random strictly decreasing grid t_max -> t_min; gaps at least ~1/(10 N) of the range
    (closer points make the UniPC/DPM r_k ratios ill-conditioned in both implementations alike)."""
    n = draw(st.integers(1, 9))
    gaps = draw(st.lists(st.floats(0.1, 1.0), min_size=n, max_size=n))
    total = math.fsum(gaps)
    u = [1.0]
    acc = 0.0
    for gp in gaps[:-1]:
        acc += gp
        u.append(1.0 - acc / total)
    u.append(0.0)
    lo, hi = schedule.t_min, schedule.t_max
    return torch.tensor([lo + (hi - lo) * v for v in u], dtype=torch.float64)


@st.composite
def table_cases(draw):
    schedule = draw(schedules)
    return schedule, draw(specs()), draw(grids(schedule)), draw(st.sampled_from(["contig", "strided", "float32"])), \
        draw(st.integers(0, 2 ** 31 - 1))


@settings(max_examples=int(120 * _SCALE), **FUZZ)
@given(table_cases())
def test_fuzz_coefficient_table(case):
    schedule, spec, t, layout, seed = case
    if layout == "strided":
        buf = torch.zeros(2 * t.numel(), dtype=torch.float64)
        buf[::2] = t
        t = buf[::2]
        assert not t.is_contiguous()
    elif layout == "float32":
        t = t.float()
        if not bool((t[1:] < t[:-1]).all()):
            return
    t_f = t.detach().clone().requires_grad_()
    t_r = t.detach().clone().requires_grad_()
    tab_f = fused.coefficient_table(schedule, t_f, spec)
    tab_r = coefficient_table_reference(schedule, t_r.to(torch.float64), spec)
    n = t.numel() - 1
    assert tab_f.shape == (n, 2, 5) and tab_f.dtype == torch.float64
    assert bool(torch.isfinite(tab_f).all()), (schedule, spec, t)
    row_scale = tab_r.detach().abs().amax(-1, keepdim=True).clamp_min(1e-300)
    err = float(((tab_f - tab_r).detach().abs() / row_scale).max())
    assert err < 1e-9, (schedule, spec, t, err)
    assert torch.equal(tab_f == 0, tab_r == 0)

    g = torch.randn(n, 2, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (tab_f * g).sum().backward()
    (tab_r * g).sum().backward()
    assert t_f.grad.dtype == t.dtype and t_f.grad.shape == t.shape
    jref = torch.autograd.functional.jacobian(
        lambda tt: coefficient_table_reference(schedule, tt, spec), t.detach().to(torch.float64), vectorize=True)
    scale = torch.einsum("abcn,abc->n", jref.abs(), g.abs())
    tol = 1e-9 if t.dtype == torch.float64 else 1e-6
    _close(t_f.grad, t_r.grad, scale, tol, f"grad t ({schedule}, {spec})")


@settings(max_examples=int(40 * _SCALE), **FUZZ)
@given(n=st.integers(1, 12), layout=st.sampled_from(["contig", "noncontig", "expand", "float32"]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_fuzz_coefficient_table_backward_entry(n, layout, seed):
    """grad_t = J^T g for arbitrary (random) Jacobians and grad layouts against a dense einsum."""
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(n, 2, 5, 4, generator=gen, dtype=torch.float64)
    for i in range(1, min(n, 3) + 1):  # slots before t_0 are zero by construction
        jac[i - 1, :, :, : 3 - i + 1] = 0
    if layout == "float32":
        grad = torch.randn(n, 2, 5, generator=gen).float()
    else:
        grad = _make((n, 2, 5), torch.float64, layout, gen)[1]
    got = C.coefficient_table_backward(jac, grad)
    dense = torch.zeros(n, 2, 5, n + 1, dtype=torch.float64)
    for i in range(1, n + 1):
        for j in range(4):
            if i - 3 + j >= 0:
                dense[i - 1, :, :, i - 3 + j] = jac[i - 1, :, :, j]
    ref = torch.einsum("abcn,abc->n", dense, grad.double())
    scale = torch.einsum("abcn,abc->n", dense.abs(), grad.double().abs())
    _close(got, ref, scale, 1e-13, "grad_t")


# ---------------------------------------------------------------------------------------------
# the whole-sampler adjoint step (ld3_ext/adjoint.py) vs its PyTorch reference
# ---------------------------------------------------------------------------------------------
@settings(max_examples=int(60 * _SCALE), **FUZZ)
@given(dtype=st.sampled_from(DTYPES), J=st.integers(0, 4), with_v=st.booleans(), with_dots=st.booleans(),
       shape=st.sampled_from([(0,), (1,), (7,), (3, 100), (70001,), (2, 3, 5, 7)]),
       layout=st.sampled_from(["contig", "noncontig", "expand"]), seed=st.integers(0, 2 ** 16))
def test_fuzz_multistep_adjoint(dtype, J, with_v, with_dots, shape, layout, seed):
    from ld3_ext.adjoint import adjoint_step_reference
    if J == 0 and not with_v:
        J = 1  # without v an empty w does nothing
    g = torch.Generator().manual_seed(seed)
    view = lambda: _make(shape, dtype, layout, g)[1]  # noqa: E731  (read-only inputs may be any layout)
    lam = view()
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if with_v else None  # written: contiguous
    older = [view() for _ in range(max(J - (2 if with_v else 1), 0))]
    x, m = view(), view()
    w = torch.randn(J, generator=g, dtype=torch.float64)
    sc = torch.randn(1, generator=g, dtype=torch.float64) if with_v else None
    res = []
    for fn in (C.multistep_adjoint, adjoint_step_reference):
        vv = v.clone() if with_v else None
        dots = torch.zeros(1 + J, dtype=torch.float64) if with_dots else None
        gm = fn(lam, vv, sc, older, x, m, w, dots)
        res.append((gm, vv, dots))
    (gm_n, v_n, d_n), (gm_r, v_r, d_r) = res
    scale_l = lam.double().abs() * (sc.abs().item() if with_v else 1.0) + (v.double().abs() if with_v else 0.0)
    if with_v:
        assert bool(((v_n.double() - v_r.double()).abs() <= RTOL[dtype] * scale_l + 1e-300).all())
    if J > 0:
        Ls = ([v_r] if with_v else [lam]) + ([lam] if with_v else []) + older
        bound = sum(w[j].abs() * Ls[j].double().abs() for j in range(J))
        # the step runs in v's layout, else lam's when dense, else a dense one in lam's dimension order
        assert gm_n.shape == torch.Size(shape) and gm_n.stride() == torch.empty_like(v if with_v else lam).stride()
        assert bool(((gm_n.double() - gm_r.double()).abs() <= 2 * RTOL[dtype] * bound + 1e-300).all())
    else:
        assert gm_n is None
    if with_dots:
        Ls = ([v_r] if with_v else [lam]) + ([lam] if with_v else []) + older
        terms = [(Ls[0].double() * x.double()).abs().sum()] + [(Ls[j].double() * m.double()).abs().sum()
                                                               for j in range(J)]
        for k in range(1 + J):
            assert abs(d_n[k].item() - d_r[k].item()) <= DOT_TOL[dtype] * terms[k].item() + 1e-300, k
