"""Input checks of the public API entry points: the coefficient tables, the k-diffusion-style functional API,
DiffusionModel.predict, the solvers' flags and orders, the diffusers adapter and the fused update's out=.
Bad input raises ValueError/TypeError naming the argument; valid input keeps working."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ld3_ext
from ld3_ext import EDM, FlowMatching, discretizations as D, functional, ops
from ld3_ext.coefficients import SolverSpec, coefficient_table_reference
from ld3_ext.solvers import DPMSolverPP, Euler, Heun, IPNDM, UniPC, validate_timesteps

NAN = math.nan
F64 = torch.float64
SCHED = EDM()
GRID = D.logsnr_uniform(SCHED, 5)
SPEC = SolverSpec("dpmpp", 3)
BAD_GRIDS = {
    "increasing": GRID.flip(0),
    "nan": torch.tensor([80.0, NAN], dtype=F64),
    "out of range": torch.tensor([80.0, -1.0], dtype=F64),
}
needs_native = pytest.mark.skipif(not ld3_ext.native_available(), reason="native extension not built")


def _model(schedule=SCHED):
    return ld3_ext.wrap_model(lambda x, t: 0.5 * x, schedule, prediction="x0")


# ---- 1. coefficient tables apply the solvers' grid rules ----------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("bad", sorted(BAD_GRIDS))
def test_ops_coefficient_table_refuses_bad_grids(backend, bad):
    with pytest.raises(ValueError, match="timesteps"):
        ops.coefficient_table(SCHED, BAD_GRIDS[bad], SPEC, backend=backend)


@pytest.mark.parametrize("bad", sorted(BAD_GRIDS))
def test_reference_and_fused_tables_refuse_bad_grids(bad):
    with pytest.raises(ValueError, match="timesteps"):
        coefficient_table_reference(SCHED, BAD_GRIDS[bad], SPEC)
    if ld3_ext.native_available():
        from ld3_ext import fused
        with pytest.raises(ValueError, match="timesteps"):
            fused.coefficient_table(SCHED, BAD_GRIDS[bad], SPEC)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_coefficient_table_on_a_valid_grid_is_unchanged(backend):
    ref = coefficient_table_reference(SCHED, GRID, SPEC, validate=False)
    torch.testing.assert_close(ops.coefficient_table(SCHED, GRID, SPEC, backend), ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(coefficient_table_reference(SCHED, GRID, SPEC), ref)
    # an integer grid is read as float64, as before
    t_int = torch.tensor([80, 10, 1])
    torch.testing.assert_close(ops.coefficient_table(SCHED, t_int, SPEC, backend),
                               coefficient_table_reference(SCHED, t_int.double(), SPEC))


@pytest.mark.parametrize("solver", [lambda: DPMSolverPP(3), lambda: UniPC(3), lambda: IPNDM(3)],
                         ids=["dpmpp", "unipc", "ipndm"])
def test_solvers_do_not_validate_the_grid_twice(solver, monkeypatch):
    """sample() validated the grid: the table must not read it back again (no extra host sync)."""
    calls = []
    real = ops.check_grid
    monkeypatch.setattr(ops, "check_grid", lambda *a: (calls.append(1), real(*a)))
    out = solver().sample(_model(), torch.randn(2, 3, dtype=F64), GRID)
    assert calls == [] and torch.isfinite(out).all()


# ---- 2. to_denoiser: one sigma per call ------------------------------------------------------------------
def test_to_denoiser_refuses_differing_per_sample_sigmas():
    den = functional.to_denoiser(ld3_ext.wrap_model(lambda x, t: x / (1 + t.reshape(-1, 1) ** 2), SCHED,
                                                    prediction="x0"))
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="sigma"):
        den(x, torch.tensor([1.0, 50.0]))
    with pytest.raises(ValueError, match="sigma"):
        den(x, torch.tensor([]))
    with pytest.raises(TypeError, match=r"\bx\b"):
        den([1.0], 1.0)
    torch.testing.assert_close(den(x, torch.tensor([2.0, 2.0])), den(x, torch.tensor(2.0)))


# ---- 3. Heun's NFE budget ------------------------------------------------------------------------------
def test_heun_steps_for_nfe_needs_two_evaluations():
    with pytest.raises(ValueError, match="nfe"):
        Heun().steps_for_nfe(1)
    assert [Heun().steps_for_nfe(k) for k in (2, 3, 5)] == [1, 1, 2]


def test_scheduler_with_a_one_step_heun_grid_still_takes_num_inference_steps_1():
    pytest.importorskip("diffusers")
    from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler
    vpd = ld3_ext.VPDiscrete.linear()
    sch = LD3Scheduler.from_timesteps(D.logsnr_uniform(vpd, 1), solver="heun", schedule=vpd)
    sch.set_timesteps(1)
    assert sch.timesteps.numel() == 2


# ---- 4. functional.sample sigmas -----------------------------------------------------------------------
@pytest.mark.parametrize("sigmas, exc", [
    (torch.tensor([80 + 5j, 1 + 0j]), TypeError),
    (torch.tensor([True, False]), TypeError),
    (None, TypeError),
    (["a", "b"], TypeError),
], ids=["complex", "bool", "None", "strings"])
def test_functional_sample_refuses_non_real_sigmas(sigmas, exc):
    with pytest.raises(exc, match="sigmas"):
        functional.sample(lambda x, s: 0.5 * x, torch.randn(2, 3), sigmas)


# ---- 5. DiffusionModel.predict --------------------------------------------------------------------------
@pytest.mark.parametrize("x, t, exc, name", [
    (torch.ones(2, 3, dtype=torch.long), torch.tensor(1.0), TypeError, "x"),
    (torch.tensor(1.0), torch.tensor(1.0), ValueError, "x"),
    ([1.0], torch.tensor(1.0), TypeError, "x"),
    (torch.ones(1, 2), torch.tensor(1 + 1j), TypeError, "t"),
    (torch.ones(1, 2), torch.tensor(True), TypeError, "t"),
], ids=["int x", "0-d x", "list x", "complex t", "bool t"])
def test_predict_refuses_bad_x_and_t(x, t, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        _model().predict(x, t)


def test_predict_float_inputs_still_work():
    x0, eps = _model().predict(torch.ones(2, 3, dtype=F64), torch.tensor(1.0))
    assert x0.dtype == F64 and torch.allclose(x0, torch.full((2, 3), 0.5, dtype=F64))


# ---- 6. LD3Scheduler.add_noise -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scheduler():
    pytest.importorskip("diffusers")
    from ld3_ext.integrations import diffusers as DI
    from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    vpd = DI.schedule_from_diffusers_config(cfg)[0]
    return LD3Scheduler.from_timesteps(D.logsnr_uniform(vpd, 5), scheduler_config=cfg)


@pytest.mark.parametrize("case", ["negative", "nan", "beyond N", "noise batch", "noise shape", "too many timesteps"])
def test_add_noise_refuses_bad_timesteps_and_noise(scheduler, case):
    x = torch.randn(1, 4, 8, 8)
    noise, ts, name = x, torch.tensor([500]), "timesteps"
    if case == "negative":
        ts = torch.tensor([-5])
    elif case == "nan":
        ts = torch.tensor([NAN])
    elif case == "beyond N":
        ts = torch.tensor([50000])
    elif case == "noise batch":
        noise, name = torch.randn(2, 4, 8, 8), "noise"
    elif case == "noise shape":
        noise, name = torch.randn(1, 4, 8, 1), "noise"
    else:
        ts = torch.tensor([500, 400, 300])
    with pytest.raises(ValueError, match=name):
        scheduler.add_noise(x, noise, ts)


def test_add_noise_valid_inputs(scheduler):
    x, n = torch.randn(2, 4, 8, 8, dtype=F64), torch.randn(2, 4, 8, 8, dtype=F64)
    s = scheduler.schedule
    for ts in (torch.tensor([999, 0]), torch.tensor([500]), scheduler.timesteps[:2] if scheduler.timesteps is not None
               else torch.tensor([10, 20])):
        out = scheduler.add_noise(x, n, ts)
        assert out.shape == x.shape and torch.isfinite(out).all()
    t = s.t_from_index(torch.tensor([999.0, 0.0], dtype=F64))
    want = s.alpha(t).reshape(-1, 1, 1, 1) * x + s.sigma(t).reshape(-1, 1, 1, 1) * n
    torch.testing.assert_close(scheduler.add_noise(x, n, torch.tensor([999, 0])), want)


class _HostReads:
    """A dispatch mode that records the ops which read tensor values back to the host: ``.item()``/``bool()``
    (_local_scalar_dense) and selections by a boolean mask (their output shape depends on the values: on a GPU
    each is a device-to-host read and a sync)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        reads = self.reads = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
                    t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
                if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default) or (
                        func is torch.ops.aten.index.Tensor and any(t.dtype == torch.bool for t in tensors[1:])):
                    reads.append(str(func))
                return func(*args, **(kwargs or {}))
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@pytest.mark.parametrize("which", ["own and other", "other", "own"])
def test_add_noise_reads_back_once(scheduler, which):
    """The range check of add_noise's timesteps (all but this solve's own) reads the device once: no boolean-mask
    selection of the others first (a second read-back and host sync on a GPU)."""
    scheduler.set_timesteps()
    own, other = scheduler.timesteps[1], torch.tensor(500.0)
    ts = {"own and other": torch.stack([own, other]), "other": torch.stack([other, other]),
          "own": torch.stack([own, own])}[which]
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    with _HostReads() as r:
        out = scheduler.add_noise(x, x, ts)
    assert r.reads == ["aten._local_scalar_dense.default"] and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"timesteps must be finite and in \[0, 999\].*\[-5\.0\]"):
        scheduler.add_noise(x, x, torch.stack([own, torch.tensor(-5.0)]))


def test_scheduler_solver_by_name_is_the_librarys(scheduler):
    from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler
    from ld3_ext.solvers import make_solver
    grid = D.logsnr_uniform(scheduler.schedule, 4)
    for name in ("dpmpp", "unipc", "ipndm", "euler", "heun"):
        sch = LD3Scheduler.from_timesteps(grid, solver=name, schedule=scheduler.schedule)
        assert sch.solver.config() == make_solver(name).config()
    with pytest.raises(TypeError, match="solver"):
        LD3Scheduler.from_timesteps(grid, solver=5, schedule=scheduler.schedule)
    with pytest.raises(ValueError, match="solver"):
        LD3Scheduler.from_timesteps(grid, solver="rk45", schedule=scheduler.schedule)


# ---- 7. meta tensors, a missing schedule ----------------------------------------------------------------
def test_meta_tensors_are_named():
    with pytest.raises(ValueError, match="x_T"):
        DPMSolverPP().sample(_model(), torch.randn(2, 3, device="meta"), GRID.to("meta"))
    with pytest.raises(ValueError, match="sigmas"):
        functional.sample(lambda x, s: x, torch.randn(2, 3), torch.tensor([1.0, 0.1], device="meta"))
    with pytest.raises(ValueError, match=r"\bx\b"):
        functional.sample(lambda x, s: x, torch.randn(2, 3, device="meta"), torch.tensor([1.0, 0.1]))


def test_validate_timesteps_needs_a_schedule():
    with pytest.raises(TypeError, match="schedule"):
        validate_timesteps(None, GRID)


# ---- 8. flags, orders, diffusers fields ------------------------------------------------------------------
@pytest.mark.parametrize("make, name", [
    (lambda: DPMSolverPP(lower_order_final="False"), "lower_order_final"),
    (lambda: UniPC(use_corrector="False"), "use_corrector"),
    (lambda: UniPC(lower_order_final=None), "lower_order_final"),
    (lambda: IPNDM(lower_order_final="yes"), "lower_order_final"),
    (lambda: SolverSpec("dpmpp", 2, "no"), "lower_order_final"),
    (lambda: SolverSpec("unipc", 2, use_corrector="no"), "use_corrector"),
])
def test_string_flags_are_refused(make, name):
    with pytest.raises(TypeError, match=name):
        make()


def test_numpy_bools_are_flags():
    assert DPMSolverPP(lower_order_final=np.False_).lower_order_final is False
    assert UniPC(use_corrector=np.True_).use_corrector is True
    assert SolverSpec("dpmpp", 2, np.False_).lower_order_final is False


@pytest.mark.parametrize("make", [lambda: Euler(order=3), lambda: Heun(order=7), lambda: Heun(order=1),
                                  lambda: functional.sample(lambda x, s: x, torch.randn(1, 2), [1.0, 0.1],
                                                            solver="euler", order=3)],
                         ids=["euler3", "heun7", "heun1", "functional euler3"])
def test_an_order_the_solver_does_not_have_is_refused(make):
    with pytest.raises(ValueError, match="order"):
        make()


def test_own_orders_and_configs_still_build():
    assert Euler(order=1).order == 1 and Heun(order=2).order == 2
    for s in (Euler(), Heun(), DPMSolverPP(2), UniPC(2, use_corrector=False)):
        assert ld3_ext.solvers.solver_from_config(s.config()).config() == s.config()


def test_diffusers_network_time_and_flow_shift():
    from ld3_ext.integrations import diffusers as DI
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DI.network_time_fn(FlowMatching(), 0)
    assert float(DI.network_time_fn(FlowMatching(), 1000)(torch.tensor(0.5))) == 500.0
    for bad in (0.0, -2.0, NAN):
        with pytest.raises(ValueError, match="shift"):
            DI.schedule_from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": bad})
    for cfg, want in (({}, 1.0), ({"shift": None}, 1.0), ({"shift": 3.0}, 3.0)):
        got = DI.schedule_from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **cfg})[0]
        assert got.shift == want


def test_diffusers_flow_shift_is_checked_by_the_schedule_rule():
    """One rule for a shift: the diffusers config refuses what FlowMatching refuses, with FlowMatching's message
    (naming shift) as a DiffusersConfigError, and accepts what FlowMatching accepts."""
    from ld3_ext.integrations import diffusers as DI
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
    for bad in (0.0, -2.0, NAN, math.inf, "3", True, [2.0]):
        with pytest.raises((TypeError, ValueError)) as want:
            FlowMatching(shift=bad)
        for call in (lambda: DI.schedule_from_diffusers_config({**cfg, "shift": bad}),
                     lambda: DI.schedule_from_diffusers_config(cfg, shift=bad)):
            with pytest.raises(DI.DiffusersConfigError, match="shift") as got:
                call()
            assert str(got.value) == str(want.value)
    for ok in (2.5, np.float32(2.5), torch.tensor(2.5, dtype=F64)):
        assert DI.schedule_from_diffusers_config({**cfg, "shift": ok})[0].shift == FlowMatching(shift=ok).shift == 2.5


# ---- 9. fused update into an overlapping out= ------------------------------------------------------------
@needs_native
def test_fused_update_refuses_an_expanded_out():
    from ld3_ext import fused
    x, h = torch.randn(4, 5), [torch.randn(4, 5)]
    coef = torch.tensor([1.0, 0.5], dtype=F64)
    with pytest.raises(ValueError, match="out"):
        fused.multistep_update(x, coef, h, out=torch.empty(1, 5).expand(4, 5))
    out = torch.empty(4, 5)
    assert fused.multistep_update(x, coef, h, out=out) is out
    torch.testing.assert_close(out, x + 0.5 * h[0])


def test_coefficient_tables_work_under_vmap():
    """The grid check reads values back, which a vmap-wrapped grid cannot give: it is skipped there (as while
    compiling), and the tables equal the unbatched ones."""
    import ld3_ext
    from ld3_ext import coefficients, fused, ops
    s = ld3_ext.VPLinear()
    spec = coefficients.SolverSpec("dpmpp", 2, True)
    base = ld3_ext.discretizations.logsnr_uniform(s, 4).double()
    grids = torch.stack([base, base.clone()])
    for fn in (lambda t: ops.coefficient_table(s, t, spec), lambda t: fused.coefficient_table(s, t, spec),
               lambda t: coefficients.coefficient_table_reference(s, t, spec)):
        out = torch.func.vmap(fn)(grids)
        torch.testing.assert_close(out[0], coefficients.coefficient_table_reference(s, base, spec))
