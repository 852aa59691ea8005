"""The shared argument checks (ld3_ext._checks) and the shared solver arguments (ld3_ext.solvers: ORDERLESS,
as_solver, Solver.exact_steps): their rules, and that the places that had a copy of them now use them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ld3_ext
from ld3_ext import _checks, coefficients, testbeds
from ld3_ext.baselines.gits import gits_dp
from ld3_ext.solvers import (ORDERLESS, SOLVERS, DPMSolverPP, Euler, Heun, IPNDM, UniPC, as_solver,
                             make_solver)
from ld3_ext.training import PseudoHuberLoss
from ld3_ext.training.losses import loss_name


# ---- count -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [2.5, "3", True, None, torch.tensor(3)])
def test_count_refuses_what_is_not_an_int(v):
    with pytest.raises(TypeError, match=r"^n must be an int >= 1, got "):
        _checks.count("n", v)
    with pytest.raises(ValueError, match=r"^n must be an int >= 1, got "):  # the older checks' exception
        _checks.count("n", v, type_error=False)


def test_count_range_and_return():
    assert _checks.count("n", 3) == 3 and type(_checks.count("n", np.int64(3))) is int
    assert _checks.count("n", 0, 0) == 0
    assert _checks.count("k", None, 1, none_ok=True) is None
    with pytest.raises(ValueError, match=r"^n must be an int >= 1, got 0$"):
        _checks.count("n", 0)
    with pytest.raises(ValueError, match=r"^k must be None or an int >= 2, got 1$"):
        _checks.count("k", 1, 2, none_ok=True)
    with pytest.raises(ValueError, match=r"^order must be an int in 1\.\.3, got 4$"):
        _checks.count("order", 4, 1, 3)


# ---- real ------------------------------------------------------------------------------------------------
def test_real_reads_numbers_as_the_schedules_do():
    for v in (0.5, 1, np.float32(0.5), np.int64(2), torch.tensor(0.25), torch.tensor(3, dtype=torch.int64)):
        assert _checks.real("x", v) == float(v)
    for v in (True, "0.5", None, [0.5], torch.ones(2), 1 + 2j):
        with pytest.raises(TypeError, match=r"^x must be a finite number, got "):
            _checks.real("x", v)
    for v in (math.nan, math.inf, -math.inf, 10 ** 400):
        with pytest.raises(ValueError, match=r"^x must be a finite number, got "):
            _checks.real("x", v)


@pytest.mark.parametrize("bounds, rule, good, bad", [
    (dict(above=0), "a finite number > 0", [1e-300, 5], [0, -1, math.inf]),
    (dict(at_least=0), "a finite number >= 0", [0, 5], [-1e-300, math.nan]),
    (dict(at_least=0, below=1), r"a number in \[0, 1\)", [0, 0.5], [1, -0.1]),
    (dict(above=0, at_most=1), r"a number in \(0, 1\]", [1, 1e-9], [0, 1.5]),
    (dict(at_most=2), "a finite number <= 2", [2, -7], [2.5]),
])
def test_real_bounds(bounds, rule, good, bad):
    for v in good:
        assert _checks.real("x", v, **bounds) == v
    for v in bad:
        with pytest.raises(ValueError, match=rf"^x must be {rule}, got "):
            _checks.real("x", v, **bounds)


# ---- flag, seed ------------------------------------------------------------------------------------------
def test_flag():
    assert _checks.flag("f", True) is True and _checks.flag("f", np.False_) is False
    for v in ("False", 0, 1, None, torch.tensor(True)):
        with pytest.raises(TypeError, match=r"^f must be a bool \(True or False\), got "):
            _checks.flag("f", v)
    assert coefficients.check_flag is _checks.flag  # the solvers' flag rule is the same function


def test_seed():
    assert _checks.seed("seed", 0) == 0 and _checks.seed("seed", np.int64(2 ** 63 - 1)) == 2 ** 63 - 1
    for v in (-1, 2 ** 63, 1.5, True, "1", None):
        with pytest.raises(ValueError, match=r"^seed must be an int in \[0, 2\*\*63\), got "):
            _checks.seed("seed", v)


# ---- the former copies use the shared checks ---------------------------------------------------------------
def test_pseudo_huber_c_reads_numbers_as_the_other_settings():
    assert PseudoHuberLoss(np.float64(0.5)).c == 0.5
    assert PseudoHuberLoss(torch.tensor(0.5)).c == 0.5  # a 0-d tensor is a number (the schedules' rule)
    assert loss_name(PseudoHuberLoss(1)) == "pseudo_huber(c=1)"  # as given: settings hashes are unchanged
    with pytest.raises(TypeError, match="c must"):
        PseudoHuberLoss(torch.ones(2))


class _TinyLpipsNet(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(seed)))

    def forward(self, a, b):
        return ((a - b) * self.w.view(1, 3, 1, 1)).square().mean((1, 2, 3))


def test_loss_names_tell_apart_lpips_networks_and_loss_subclasses():
    """Two LPIPS losses over other networks were both recorded as "lpips": a checkpoint was resumed with the other
    one.  A PseudoHuberLoss subclass (which may compute anything) was recorded as the plain pseudo-Huber loss."""
    from ld3_ext.training.losses import LPIPSLoss
    a, b, a2 = LPIPSLoss(net=_TinyLpipsNet(0)), LPIPSLoss(net=_TinyLpipsNet(1)), LPIPSLoss(net=_TinyLpipsNet(0))
    assert loss_name(a).startswith("lpips(") and loss_name(a) != loss_name(b)
    assert loss_name(a) == loss_name(a2)  # the same weights: the same loss
    assert loss_name("lpips") == "lpips"

    class Scaled(PseudoHuberLoss):
        def __call__(self, pred, target):
            return 2 * super().__call__(pred, target)

    assert loss_name(Scaled(1)) != loss_name(PseudoHuberLoss(1)) == "pseudo_huber(c=1)"


def test_gits_coeff_is_a_real_number():
    cost = np.zeros((5, 5))
    assert gits_dp(cost, 2, coeff=torch.tensor(1.15)) == gits_dp(cost, 2, coeff=1.15)
    for bad, exc in ((True, TypeError), ("1.1", TypeError), (0.0, ValueError), (math.nan, ValueError)):
        with pytest.raises(exc, match="coeff must be a finite number > 0"):
            gits_dp(cost, 2, coeff=bad)


def test_counts_take_numpy_ints_alike():
    """testbeds took numpy ints, the solvers and discretizations did not: one count rule for all now."""
    assert testbeds.ring2d(np.int64(3)).means.shape == (3, 2)
    assert DPMSolverPP().steps_for_nfe(np.int64(4)) == 4 and Heun().nfe(np.int64(2)) == 4
    grid = ld3_ext.discretizations.logsnr_uniform(ld3_ext.EDM(), np.int64(4))
    assert torch.equal(grid, ld3_ext.discretizations.logsnr_uniform(ld3_ext.EDM(), 4))


# ---- solvers: ORDERLESS, as_solver -------------------------------------------------------------------------
def test_orderless_solvers_have_no_order_setting():
    assert set(ORDERLESS) <= set(SOLVERS)
    for name in SOLVERS:
        solver = make_solver(name, order=2)
        assert solver.order == (SOLVERS[name]().order if name in ORDERLESS else 2)


def test_as_solver():
    s = DPMSolverPP(2)
    assert as_solver(s) is s and as_solver(None) is None
    assert as_solver(None, default="unipc").config() == UniPC(3).config()
    assert as_solver(None, default=s) is s
    # options a named solver does not have are left out: the order of Euler/Heun, the variant of all but UniPC
    assert as_solver("unipc", order=2, variant="bh2").config() == UniPC(2, variant="bh2").config()
    assert as_solver("dpmpp", order=2, variant="bh2").config() == DPMSolverPP(2).config()
    assert as_solver("heun", order=3, variant="bh2").config() == Heun().config()
    assert isinstance(as_solver("euler", order=3), Euler) and isinstance(as_solver("ipndm", order=4), IPNDM)
    with pytest.raises(TypeError, match=r"^teacher_solver must be an ld3_ext Solver or a solver name, got int"):
        as_solver(5, name="teacher_solver")
    with pytest.raises(ValueError, match=r"^teacher_solver must be an ld3_ext Solver or one of .*'rk45'"):
        as_solver("rk45", name="teacher_solver")
    with pytest.raises(ValueError, match="order"):
        as_solver("dpmpp", order=9)


# ---- Solver.exact_steps ------------------------------------------------------------------------------------
def test_exact_steps():
    assert Heun().exact_steps(6) == 3 and DPMSolverPP().exact_steps(5) == 5
    with pytest.raises(ValueError, match=r"^--nfe 5: heun spends 2 evaluations a step; use 4 or 6$"):
        Heun().exact_steps(5, "--nfe")
    with pytest.raises(ValueError, match=r"^Heun cannot use exactly teacher_nfe=21 \(it spends 2 evaluations per "
                                         r"step\); use teacher_nfe=20 or teacher_nfe=22$"):
        Heun().exact_steps(21, "teacher_nfe")
    with pytest.raises(ValueError, match=r"; use nfe=4$"):  # only suggestions of at least min_steps steps
        Heun().exact_steps(3, min_steps=2)
    with pytest.raises(ValueError, match="nfe must be an int >= 1"):
        Heun().exact_steps(0)


def test_dmn_order_for_names_what_is_not_a_solver():
    from ld3_ext.baselines.dmn import order_for
    for bad in ("dpmpp", None, object()):
        with pytest.raises(TypeError, match="solver must be an ld3_ext solver"):
            order_for(bad)


def test_output_checks_and_plain_grad_name_bad_arguments():
    from ld3_ext.layout import plain_grad
    model = ld3_ext.wrap_model(lambda x, t: x, ld3_ext.EDM(), prediction="x0")
    with pytest.raises(TypeError, match="check_output must be a bool"):
        with model.output_checks("no"):
            pass
    assert model.check_output is True
    with pytest.raises(TypeError, match="plain_grad: g must be a tensor or None"):
        plain_grad([1.0])
