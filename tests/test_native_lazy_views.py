"""Tensors whose values torch negates lazily (torch._neg_view, z.conj().imag: a bit on the tensor, not in memory)
reached the kernels, which read and write raw storage: silently wrong signs everywhere.  Each native entry point
now refuses them naming the argument; also the table backward's size cap (an int index overflowed: SIGSEGV)."""
import pytest
import torch

from ld3_ext import _native, fused
from ld3_ext.coefficients import SolverSpec
from ld3_ext.schedules import EDM

pytestmark = pytest.mark.skipif(not _native.native_available(), reason="native extension not built")
D = torch.float64


def _neg(t):
    return torch._neg_view(t)


def test_the_public_conj_imag_view_is_a_lazily_negated_tensor():
    x = torch.tensor([1 + 2j]).conj().imag
    assert x.is_neg() and float(x) == -2.0
    with pytest.raises(RuntimeError, match="x is a lazily negated"):
        fused.multistep_update(x, torch.tensor([1.0], dtype=D), [])


@pytest.mark.parametrize("which", ["x", "coef", "history[0]", "out"])
def test_update_refuses_a_negated_view(which):
    x, m, coef = torch.ones(5), torch.ones(5), torch.tensor([0.5, 1.0], dtype=D)
    args = {"x": x, "coef": coef, "m": m, "out": None}
    key = {"history[0]": "m"}.get(which, which)
    args[key] = _neg(torch.zeros(5) if which == "out" else args[key].clone())
    with pytest.raises(RuntimeError, match=rf"{__import__('re').escape(which)} is a lazily negated"):
        fused.multistep_update(args["x"], args["coef"], [args["m"]], out=args["out"])


def test_update_of_resolved_views_is_right():
    x = _neg(torch.ones(5)).resolve_neg()
    y = fused.multistep_update(x, torch.tensor([2.0], dtype=D), [])
    torch.testing.assert_close(y, torch.full((5,), -2.0), rtol=0, atol=0)


def test_update_backward_and_autograd_refuse_a_negated_view():
    C = _native.get()
    with pytest.raises(RuntimeError, match="grad is a lazily negated"):
        C.multistep_update_backward(_neg(torch.ones(4)), torch.ones(4), torch.tensor([3.0], dtype=D), [],
                                    True, True, True)
    x = _neg(torch.ones(4)).requires_grad_()
    with pytest.raises(RuntimeError, match="lazily negated"):
        fused.multistep_update(x, torch.tensor([3.0], dtype=D), [])


def test_adjoint_step_refuses_a_negated_view():
    C = _native.get()
    with pytest.raises(RuntimeError, match="v is a lazily negated"):
        C.multistep_adjoint(torch.ones(4), _neg(torch.ones(4)), torch.tensor(1.0, dtype=D), [], None, None,
                            torch.tensor([1.0], dtype=D), None)
    with pytest.raises(RuntimeError, match="lam_prev is a lazily negated"):
        C.multistep_adjoint(_neg(torch.ones(4)), torch.ones(4), torch.tensor(1.0, dtype=D), [], None, None,
                            torch.tensor([1.0], dtype=D), None)


def test_coefficient_table_refuses_a_negated_grid():
    t = _neg(torch.tensor([-80.0, -10.0, -1.0], dtype=D))  # reads as 80, 10, 1: the grid check passes
    with pytest.raises(RuntimeError, match="timesteps is a lazily negated"):
        fused.coefficient_table(EDM(), t, SolverSpec("dpmpp", 2))
    good = fused.coefficient_table(EDM(), t.resolve_neg(), SolverSpec("dpmpp", 2))
    assert bool(torch.isfinite(good).all())


def test_coefficient_table_backward_caps_its_size():
    """53,687,100 rows overflowed the Jacobian's int index (SIGSEGV); the forward already capped the grid."""
    C = _native.get()
    jac = torch.zeros(1, 2, 5, 4, dtype=D).expand(10_000_001, 2, 5, 4)  # no memory behind the rows
    grad = torch.zeros(1, 2, 5, dtype=D).expand(10_000_001, 2, 5)
    with pytest.raises(RuntimeError, match="at most 10,000,000 steps"):
        C.coefficient_table_backward(jac, grad)
