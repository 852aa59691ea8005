"""Kinds of tensors the kernels cannot walk (sparse, mkldnn, nested) and incoming gradients a user may pass.

* ``grad_outputs`` that is sparse or a lazily negated view (``torch._neg_view``) holds valid values: every fused
  backward node (update, coefficient table, whole sampler) takes it, as the reference backend does.
* A sparse or nested argument of a native entry point is refused with a message naming the argument, never
  with an ATen-internal error ("Please file an issue").
"""
import re

import pytest
import torch

import ld3_ext
from ld3_ext import _native, discretizations, fused
from ld3_ext.coefficients import SolverSpec, coefficient_table_reference
from ld3_ext.ops import multistep_update_reference

pytestmark = pytest.mark.skipif(not _native.native_available(), reason="native extension not built")
D = torch.float64


def _grad_kinds(g):
    # each equals g in value
    return {"sparse": g.to_sparse(), "neg_view": torch._neg_view(-g)}


@pytest.mark.parametrize("kind", ["sparse", "neg_view"])
def test_update_backward_takes_any_grad_outputs(kind):
    g = torch.Generator().manual_seed(0)
    x0, m0 = torch.randn(3, 4, dtype=D, generator=g), torch.randn(3, 4, dtype=D, generator=g)
    c0 = torch.tensor([0.5, 0.2], dtype=D)
    go = torch.randn(3, 4, dtype=D, generator=g)
    res = {}
    for name, f in (("reference", multistep_update_reference), ("fused", fused.multistep_update)):
        x, m, c = x0.clone().requires_grad_(), m0.clone().requires_grad_(), c0.clone().requires_grad_()
        res[name] = torch.autograd.grad(f(x, c, [m]), [x, m, c], grad_outputs=_grad_kinds(go)[kind])
    want = torch.autograd.grad(multistep_update_reference(x, c, [m]), [x, m, c], grad_outputs=go)
    for a, b, w in zip(res["fused"], res["reference"], want):
        torch.testing.assert_close(a.to_dense(), w, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(b.to_dense(), w, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", ["sparse", "neg_view"])
def test_update_double_backward_takes_any_grad_outputs(kind):
    x = torch.randn(5, dtype=D, requires_grad=True)
    c = torch.tensor([0.5, 0.2], dtype=D, requires_grad=True)
    m = torch.randn(5, dtype=D)
    go = torch.randn(5, dtype=D)
    got = torch.autograd.grad(fused.multistep_update(x, c, [m]), c, _grad_kinds(go)[kind], create_graph=True)[0]
    want = torch.autograd.grad(multistep_update_reference(x, c, [m]), c, go, create_graph=True)[0]
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


@pytest.mark.parametrize("kind", ["sparse", "neg_view"])
def test_table_backward_takes_any_grad_outputs(kind):
    sch, spec = ld3_ext.EDM(), SolverSpec("dpmpp", order=3)
    t0 = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002], dtype=D)
    go = torch.randn(4, 2, 5, dtype=D, generator=torch.Generator().manual_seed(1))
    t = t0.clone().requires_grad_()
    want = torch.autograd.grad(coefficient_table_reference(sch, t, spec), t, go)[0]
    for make in (lambda tt: fused.coefficient_table(sch, tt, spec),
                 lambda tt: fused._CoefficientTable.apply(tt, fused._table_args(sch.native_spec(), spec), sch, spec)):
        t = t0.clone().requires_grad_()
        got = torch.autograd.grad(make(t), t, _grad_kinds(go)[kind])[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["sparse", "neg_view"])
def test_whole_sampler_backward_takes_any_grad_outputs(kind):
    sch = ld3_ext.EDM()
    x_T = 80 * torch.randn(2, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    go = torch.randn(2, 3, dtype=D, generator=torch.Generator().manual_seed(3))
    t = discretizations.edm(sch, nfe=5).to(D)
    res = {}
    for backend in ("reference", "fused"):
        model = ld3_ext.wrap_model(lambda x, tt: 0.9 * x, sch, prediction="x0", backend=backend)
        x = x_T.clone().requires_grad_()
        y = ld3_ext.DPMSolverPP(order=3, backend=backend).sample(model, x, t)
        if backend == "fused":
            assert type(y.grad_fn).__name__ == "_WholeSamplerBackward"
        res[backend] = torch.autograd.grad(y, x, _grad_kinds(go)[kind])[0].to_dense()  # reference: sparse in, out
        want = torch.autograd.grad(ld3_ext.DPMSolverPP(order=3, backend=backend).sample(
            model, x, t), x, go)[0]
        torch.testing.assert_close(res[backend], want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(res["fused"], res["reference"], rtol=1e-12, atol=1e-12)


def _nested():
    return torch.nested.nested_tensor([torch.randn(4, dtype=D), torch.randn(3, dtype=D)])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensors_are_refused_naming_the_argument():
    c1, c2 = torch.tensor([0.5], dtype=D), torch.tensor([0.5, 0.25], dtype=D)
    with pytest.raises(TypeError, match=r"x must be a dense \(strided\) tensor, got a nested tensor"):
        fused.multistep_update(_nested(), c1, [])
    with pytest.raises(TypeError, match=r"history\[0\] must be a dense \(strided\) tensor, got a nested tensor"):
        fused.multistep_update(torch.randn(2, 4, dtype=D), c2, [_nested()])
    with pytest.raises(RuntimeError, match=r"multistep_update: x must be a dense \(strided\) tensor"):
        _native.get().multistep_update(_nested(), c1, [])
    with pytest.raises(RuntimeError, match=r"multistep_adjoint: lam_prev must be a dense \(strided\) tensor"):
        _native.get().multistep_adjoint(_nested(), None, None, [], None, None, c1, None)


def _adjoint_args(**kw):
    lam, v, x, m = (torch.randn(3, 4, dtype=D) for _ in range(4))
    a = dict(lam_prev=lam, v=v, scale=torch.tensor([0.5], dtype=D), older=[], x=x, m=m,
             w=torch.tensor([0.1, 0.2], dtype=D), dots=torch.zeros(5, dtype=D))
    a.update(kw)
    return a


@pytest.mark.parametrize("name", ["v", "scale", "x", "m", "w", "dots"])
def test_adjoint_step_names_a_sparse_argument(name):
    a = _adjoint_args()
    a[name] = a[name].to_sparse()
    with pytest.raises(RuntimeError, match=rf"multistep_adjoint: {name} must be a dense \(strided\) tensor"):
        _native.get().multistep_adjoint(**a)


def test_adjoint_step_names_overlapping_dots():
    a = _adjoint_args(dots=torch.zeros(1, dtype=D).expand(5))
    with pytest.raises(RuntimeError, match="multistep_adjoint: dots has entries that share memory"):
        _native.get().multistep_adjoint(**a)


def test_adjoint_step_names_the_index_of_a_bad_older_term():
    x = torch.randn(3, 4, dtype=D)
    a = _adjoint_args(older=[x, x[:2]], w=torch.ones(3, dtype=D))
    with pytest.raises(RuntimeError, match=re.escape("multistep_adjoint: older[1] has shape")):
        _native.get().multistep_adjoint(**a)


def test_update_names_the_index_of_a_negated_history_term():
    x, m = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    with pytest.raises(RuntimeError, match=re.escape("multistep_update: history[1] is a lazily negated")):
        _native.get().multistep_update(x, torch.tensor([0.5, 0.2, 0.1], dtype=D), [m, torch._neg_view(m)])


def test_table_entry_points_name_a_sparse_argument():
    C = _native.get()
    t = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002], dtype=D)
    tab, jac = C.coefficient_table(t, 0, 0.0, 0.0, 1, 3, True, False, False, False)
    with pytest.raises(RuntimeError, match=r"coefficient_table: timesteps must be a dense \(strided\) tensor"):
        C.coefficient_table(t.to_sparse(), 0, 0.0, 0.0, 1, 3, True, False, False, False)
    with pytest.raises(RuntimeError, match=r"coefficient_table_backward: grad must be a dense \(strided\) tensor"):
        C.coefficient_table_backward(jac, torch.randn_like(tab).to_sparse())
    with pytest.raises(RuntimeError, match=r"coefficient_table_backward: jac must be a dense \(strided\) tensor"):
        C.coefficient_table_backward(jac.to_sparse(), torch.randn_like(tab))


def test_update_backward_entry_names_a_sparse_grad():
    x, m = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    with pytest.raises(RuntimeError, match=r"multistep_update_backward: grad must be a dense \(strided\) tensor"):
        _native.get().multistep_update_backward(x.to_sparse(), x, torch.tensor([0.5, 0.2], dtype=D), [m])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_nested_time_grid_is_refused_naming_it_on_every_path():
    nt = torch.nested.nested_tensor([torch.tensor([80.0, 1.0, 0.01], dtype=D), torch.tensor([2.0, 1.0], dtype=D)])
    spec, sch = ld3_ext.DPMSolverPP(2).spec(), ld3_ext.EDM()
    model = ld3_ext.wrap_model(lambda x, t: x, sch, prediction="x0")
    grid = torch.tensor([80.0, 1.0, 0.01], dtype=D)
    for call, name in ((lambda: fused.coefficient_table(sch, nt, spec), "timesteps"),
                       (lambda: ld3_ext.ops.coefficient_table(sch, nt, spec), "timesteps"),
                       (lambda: ld3_ext.DPMSolverPP(2).sample(model, torch.randn(2, 3, dtype=D), nt), "timesteps"),
                       (lambda: ld3_ext.DPMSolverPP(2).sample(model, torch.randn(2, 3, dtype=D), grid,
                                                              model_timesteps=nt), "model_timesteps")):
        with pytest.raises(TypeError, match=rf"{name} must be a dense \(strided\) tensor, got a nested tensor"):
            call()
