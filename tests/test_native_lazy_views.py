"""Tensors whose values torch negates lazily (torch._neg_view, z.conj().imag: a bit on the tensor, not in memory)
reached the kernels, which read and write raw storage: silently wrong signs everywhere.  Each native entry point
refuses them naming the argument; the Python layer (fused.*, the solvers) resolves them first, as torch's own ops
read them (an out= stays refused); also the table backward's size cap (an int index overflowed: SIGSEGV)."""
import pytest
import torch

from ld3_ext import _native, fused
from ld3_ext.coefficients import SolverSpec
from ld3_ext.schedules import EDM

pytestmark = pytest.mark.skipif(not _native.native_available(), reason="native extension not built")
D = torch.float64


def _neg(t):
    return torch._neg_view(t)


def test_the_public_conj_imag_view_is_read_with_its_sign():
    x = torch.tensor([1 + 2j]).conj().imag
    assert x.is_neg() and float(x) == -2.0
    y = fused.multistep_update(x, torch.tensor([1.0], dtype=D), [])
    torch.testing.assert_close(y, torch.tensor([-2.0]), rtol=0, atol=0)


def test_the_kernels_refuse_a_negated_view_naming_it():
    """The raw entry points read storage: they refuse (the Python layer resolves before calling them)."""
    C = _native.get()
    x, m, coef = torch.ones(5), torch.ones(5), torch.tensor([0.5, 1.0], dtype=D)
    for name, args in {"x": (_neg(x), coef, [m]), "coef": (x, _neg(coef), [m]), "history[0]": (x, coef, [_neg(m)])}.items():
        with pytest.raises(RuntimeError, match=rf"{__import__('re').escape(name)} is a lazily negated"):
            C.multistep_update(*args)


@pytest.mark.parametrize("which", ["x", "coef", "history[0]", "history[1]"])
@pytest.mark.parametrize("grad", [False, True])
def test_update_resolves_a_negated_view(which, grad):
    """Each input may be a lazily negated view: the result and every gradient are those of the same values
    stored plainly (as torch's own ops read them), for the Python layer resolves them before the kernel."""
    g = torch.Generator().manual_seed(1)
    x, m0, m1 = (torch.randn(3, 4, dtype=D, generator=g) for _ in range(3))
    coef = torch.tensor([0.5, 0.25, -0.125], dtype=D)
    plain = {"x": x, "coef": coef, "history[0]": m0, "history[1]": m1}
    leaves = {k: v.detach().requires_grad_(grad) for k, v in plain.items()}
    # the lazy input is a view of its own leaf (its gradient comes back through both negations)
    lazy_leaves = {k: (_neg(-v.detach().requires_grad_(grad)) if k == which else v.detach().requires_grad_(grad))
                   for k, v in plain.items()}
    assert lazy_leaves[which].is_neg() and torch.equal(lazy_leaves[which], plain[which])
    want = fused.multistep_update(leaves["x"], leaves["coef"], [leaves["history[0]"], leaves["history[1]"]])
    got = fused.multistep_update(lazy_leaves["x"], lazy_leaves["coef"],
                                 [lazy_leaves["history[0]"], lazy_leaves["history[1]"]])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not got.is_neg()
    if grad:
        w = torch.randn(3, 4, dtype=D, generator=g)
        gw = torch.autograd.grad(want, list(leaves.values()), w)
        gg = torch.autograd.grad(got, [lazy_leaves[k] for k in plain], w)
        for k, a, b in zip(plain, gw, gg):
            torch.testing.assert_close(b, a, rtol=1e-15, atol=0, msg=k)


def test_update_refuses_a_negated_out():
    """out= cannot be resolved (a copy would be written, out left unchanged): refused, naming it."""
    x, m, coef = torch.ones(5), torch.ones(5), torch.tensor([0.5, 1.0], dtype=D)
    out = _neg(torch.zeros(5))
    with pytest.raises(RuntimeError, match="out is a lazily negated"):
        fused.multistep_update(x, coef, [m], out=out)
    with pytest.raises(RuntimeError, match="out is a lazily negated"):
        fused.multistep_update(_neg(-x), coef, [m], out=out)
    assert bool((out == 0).all())


def test_update_of_resolved_views_is_right():
    x = _neg(torch.ones(5)).resolve_neg()
    y = fused.multistep_update(x, torch.tensor([2.0], dtype=D), [])
    torch.testing.assert_close(y, torch.full((5,), -2.0), rtol=0, atol=0)


def test_update_backward_and_autograd_kernels_refuse_a_negated_view():
    C = _native.get()
    with pytest.raises(RuntimeError, match="grad is a lazily negated"):
        C.multistep_update_backward(_neg(torch.ones(4)), torch.ones(4), torch.tensor([3.0], dtype=D), [],
                                    True, True, True)
    with pytest.raises(RuntimeError, match="x is a lazily negated"):
        C.multistep_update_autograd(_neg(torch.ones(4)).requires_grad_(), torch.tensor([3.0], dtype=D), [])


def test_adjoint_step_refuses_a_negated_view():
    C = _native.get()
    with pytest.raises(RuntimeError, match="v is a lazily negated"):
        C.multistep_adjoint(torch.ones(4), _neg(torch.ones(4)), torch.tensor(1.0, dtype=D), [], None, None,
                            torch.tensor([1.0], dtype=D), None)
    with pytest.raises(RuntimeError, match="lam_prev is a lazily negated"):
        C.multistep_adjoint(_neg(torch.ones(4)), torch.ones(4), torch.tensor(1.0, dtype=D), [], None, None,
                            torch.tensor([1.0], dtype=D), None)


def test_coefficient_table_resolves_a_negated_grid():
    """The kernel refuses a lazily negated grid; the public function resolves it: the table and its gradient are
    those of the plain grid (a grid that reads 80, 10, 1 but is stored -80, -10, -1)."""
    plain = torch.tensor([80.0, 10.0, 1.0, 0.1], dtype=D)
    with pytest.raises(RuntimeError, match="timesteps is a lazily negated"):
        _native.get().coefficient_table(_neg(-plain), 0, 0.002, 80.0, 1, 3, True, False, False, False)
    spec = SolverSpec("dpmpp", 3)
    leaf_a, leaf_b = plain.clone().requires_grad_(), plain.clone().requires_grad_()
    want = fused.coefficient_table(EDM(), leaf_a, spec)
    lazy = _neg(-leaf_b)
    assert lazy.is_neg()
    got = fused.coefficient_table(EDM(), lazy, spec)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    w = torch.randn(want.shape, dtype=D, generator=torch.Generator().manual_seed(0))
    (ga,) = torch.autograd.grad(want, leaf_a, w)
    (gb,) = torch.autograd.grad(got, leaf_b, w)
    torch.testing.assert_close(gb, ga, rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("solver", ["dpmpp3", "heun"])
def test_a_sample_from_a_negated_view_equals_the_plain_one(backend, solver):
    """x_T = z.conj().imag (a lazily negated view) samples as its values do, with gradients, on both backends (the
    model wrapper's conversions and the whole-sampler node call the kernels)."""
    import ld3_ext
    s = EDM()
    model = ld3_ext.wrap_model(lambda x, t: 0.3 * torch.tanh(x), s, prediction="eps")
    grid = ld3_ext.discretizations.logsnr_uniform(s, 5)
    sv = ld3_ext.DPMSolverPP(order=3, backend=backend) if solver == "dpmpp3" else ld3_ext.Heun(backend=backend)
    x = torch.randn(2, 3, 4, 4, dtype=D, generator=torch.Generator().manual_seed(0))
    z = torch.complex(torch.zeros_like(x), -x)
    lazy = z.conj().imag
    assert lazy.is_neg() and torch.equal(lazy, x)
    ta, tb = grid.clone().requires_grad_(), grid.clone().requires_grad_()
    want = sv.sample(model, x, ta)
    got = sv.sample(model, lazy, tb)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    w = torch.randn_like(want)
    (ga,) = torch.autograd.grad(want, ta, w)
    (gb,) = torch.autograd.grad(got, tb, w)
    torch.testing.assert_close(gb, ga, rtol=0, atol=0)


def test_coefficient_table_backward_caps_its_size():
    """53,687,100 rows overflowed the Jacobian's int index (SIGSEGV); the forward already capped the grid."""
    C = _native.get()
    jac = torch.zeros(1, 2, 5, 4, dtype=D).expand(10_000_001, 2, 5, 4)  # no memory behind the rows
    grad = torch.zeros(1, 2, 5, dtype=D).expand(10_000_001, 2, 5)
    with pytest.raises(RuntimeError, match="at most 10,000,000 steps"):
        C.coefficient_table_backward(jac, grad)


@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_a_model_returning_a_negated_view_trains_as_the_plain_one(prediction):
    """A network whose output is a lazily negated view reaches the whole-sampler node's history (the wrapper passes
    an x0 output through as it is) and its VJP: outputs and the gradients w.r.t. x_T and the grid equal those of the
    same network returning plain tensors, and the reference backend's."""
    import ld3_ext
    s = EDM()
    plain = ld3_ext.wrap_model(lambda x, t: 0.3 * torch.tanh(x), s, prediction=prediction)
    lazy = ld3_ext.wrap_model(lambda x, t: _neg(-0.3 * torch.tanh(x)), s, prediction=prediction)
    grid = ld3_ext.discretizations.logsnr_uniform(s, 5)
    x0 = torch.randn(2, 3, 4, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    results = []
    for model, backend in ((plain, "reference"), (plain, "fused"), (lazy, "fused")):
        x, t = x0.clone().requires_grad_(), grid.clone().requires_grad_()
        y = ld3_ext.DPMSolverPP(order=3, backend=backend).sample(model, x, t)
        if backend == "fused":
            assert type(y.grad_fn).__name__ == "_WholeSamplerBackward"
        w = torch.randn(y.shape, dtype=D, generator=torch.Generator().manual_seed(3))
        results.append((y, *torch.autograd.grad(y, (x, t), w)))
    for got in results[1:]:
        for a, b, name in zip(got, results[0], ("sample", "grad x_T", "grad timesteps")):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    for a, b in zip(results[2], results[1]):  # the lazy output reads exactly as the plain one on the fused path
        assert torch.equal(a, b)
