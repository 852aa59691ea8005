"""Bad input must fail early with an exception that names the offending argument."""
from __future__ import annotations

import math

import pytest
import torch

import ld3_ext
from ld3_ext import ModelOutputError
from ld3_ext import discretizations as D
from conftest import OpRecorder, heun_textbook_float64, smooth_mixture

pytestmark = pytest.mark.usefixtures("single_thread")

ALL_SOLVERS = {
    "euler": lambda: ld3_ext.Euler(backend="reference"),
    "heun": lambda: ld3_ext.Heun(backend="reference"),
    "dpmpp": lambda: ld3_ext.DPMSolverPP(3, backend="reference"),
    "unipc": lambda: ld3_ext.UniPC(3, backend="reference"),
    "ipndm": lambda: ld3_ext.IPNDM(4, backend="reference"),
}


@pytest.fixture
def setup():
    sched = ld3_ext.EDM()
    gm = smooth_mixture()
    return sched, gm.model(sched), gm.prior_noise(sched, 3, generator=torch.Generator().manual_seed(0))


def grid(sched, n=5):
    return D.logsnr_uniform(sched, n)


@pytest.mark.parametrize("name", sorted(ALL_SOLVERS))
class TestTimesteps:
    def test_not_1d(self, setup, name):
        sched, model, x = setup
        with pytest.raises(ValueError, match=r"timesteps: must be 1-D"):
            ALL_SOLVERS[name]().sample(model, x, grid(sched).reshape(2, 3))

    def test_not_a_tensor(self, setup, name):
        sched, model, x = setup
        with pytest.raises(TypeError, match=r"timesteps must be a 1-D torch.Tensor"):
            ALL_SOLVERS[name]().sample(model, x, grid(sched).tolist())

    @pytest.mark.parametrize("backend", ["reference", "fused"])
    @pytest.mark.parametrize("which", ["timesteps", "model_timesteps"])
    def test_sparse_grid_is_named(self, setup, name, backend, which):
        # a sparse grid failed deep inside ('Cannot access data pointer', 'aten::ne.Scalar' on SparseCPU)
        sched, model, x = setup
        t = grid(sched)
        kw = {"model_timesteps": t.to_sparse()} if which == "model_timesteps" else {}
        solver = ALL_SOLVERS[name]()
        solver.backend = backend
        with pytest.raises(TypeError, match=rf"^{which} must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
            solver.sample(model, x, t if kw else t.to_sparse(), **kw)

    def test_integer_dtype(self, setup, name):
        sched, model, x = setup
        with pytest.raises(ValueError, match=r"timesteps: must be a floating tensor"):
            ALL_SOLVERS[name]().sample(model, x, torch.tensor([80, 40, 10, 1]))

    @pytest.mark.parametrize("bad", ["increasing", "repeated"])
    def test_not_strictly_decreasing(self, setup, name, bad):
        sched, model, x = setup
        t = grid(sched)
        t = t.flip(0) if bad == "increasing" else torch.cat([t[:3], t[2:]])
        with pytest.raises(ValueError, match=r"timesteps: must be strictly decreasing"):
            ALL_SOLVERS[name]().sample(model, x, t)

    @pytest.mark.parametrize("where", ["above", "below"])
    def test_outside_schedule_range(self, setup, name, where):
        sched, model, x = setup
        t = grid(sched).clone()
        if where == "above":
            t[0] = 81.0
        else:
            t[-1] = 0.001
        with pytest.raises(ValueError, match=r"timesteps: must lie in the schedule's range"):
            ALL_SOLVERS[name]().sample(model, x, t)

    @pytest.mark.parametrize("n", [0, 1])
    def test_too_short(self, setup, name, n):
        sched, model, x = setup
        with pytest.raises(ValueError, match=r"timesteps: needs at least 2 entries"):
            ALL_SOLVERS[name]().sample(model, x, torch.full((n,), 80.0, dtype=torch.float64))

    @pytest.mark.parametrize("bad", [math.nan, math.inf])
    def test_nan_inf(self, setup, name, bad):
        sched, model, x = setup
        t = grid(sched).clone()
        t[2] = bad
        with pytest.raises(ValueError, match=r"timesteps: contains NaN or Inf"):
            ALL_SOLVERS[name]().sample(model, x, t)

    def test_model_timesteps_wrong_length(self, setup, name):
        sched, model, x = setup
        t = grid(sched)
        with pytest.raises(ValueError, match=r"model_timesteps: must have the same length as timesteps"):
            ALL_SOLVERS[name]().sample(model, x, t, t[:-1])

    def test_model_timesteps_nan(self, setup, name):
        sched, model, x = setup
        t = grid(sched)
        tm = t.clone()
        tm[1] = math.nan
        with pytest.raises(ValueError, match=r"model_timesteps: contains NaN or Inf"):
            ALL_SOLVERS[name]().sample(model, x, t, tm)

    def test_model_timesteps_out_of_range(self, setup, name):
        sched, model, x = setup
        t = grid(sched)
        tm = t.clone()
        tm[1] = 200.0
        with pytest.raises(ValueError, match=r"model_timesteps: must lie in the schedule's range"):
            ALL_SOLVERS[name]().sample(model, x, t, tm)

    def test_model_timesteps_outside_domain(self, setup, name):
        """Within the 1e-3 slack of the range check but where sigma = t is not > 0."""
        sched, model, x = setup
        t = grid(sched)
        tm = t.clone()
        tm[-2] = -0.01
        with pytest.raises(ValueError, match=r"model_timesteps: contains times where the schedule is undefined"):
            ALL_SOLVERS[name]().sample(model, x, t, tm)

    def test_devices_differ(self, setup, name):
        """x_T on another device than timesteps ("meta" stands in for an accelerator)."""
        sched, model, x = setup
        t = grid(sched)
        with pytest.raises(ValueError, match=r"timesteps: is on cpu but x_T is on meta"):
            ALL_SOLVERS[name]().sample(model, x.to("meta"), t)
        with pytest.raises(ValueError, match=r"timesteps: is on meta but x_T is on cpu"):
            ALL_SOLVERS[name]().sample(model, x, t.to("meta"))
        with pytest.raises(ValueError, match=r"model_timesteps: is on meta but timesteps is on cpu"):
            ALL_SOLVERS[name]().sample(model, x, t, t.to("meta"))

    def test_integer_x_T(self, setup, name):
        sched, model, x = setup
        with pytest.raises(TypeError, match=r"x_T must be a floating torch.Tensor"):
            ALL_SOLVERS[name]().sample(model, x.long(), grid(sched))

    def test_empty_batch(self, setup, name):
        sched, model, x = setup
        with pytest.raises(ValueError, match=r"x_T must have a non-empty batch dimension"):
            ALL_SOLVERS[name]().sample(model, x[:0], grid(sched))

    @pytest.mark.parametrize("bad", [math.nan, math.inf])
    def test_non_finite_x_T(self, setup, name, bad):
        # named as x_T, not "model returned NaN/Inf at step 0"; nor a silently NaN sample from a network
        # whose output does not depend on x
        sched, model, x = setup
        x = x.clone()
        x[0, 0] = bad
        blind = ld3_ext.wrap_model(lambda xx, t: torch.zeros_like(xx), sched, prediction="x0")
        for m in (model, blind):
            for backend in ("reference", "fused"):
                with pytest.raises(ValueError, match=r"x_T: contains NaN or Inf"):
                    ld3_ext.make_solver(name, backend=backend).sample(m, x, grid(sched))

    def test_unwrapped_model(self, setup, name):
        sched, model, x = setup
        with pytest.raises(TypeError, match=r"model must be a DiffusionModel"):
            ALL_SOLVERS[name]().sample(model.fn, x, grid(sched))

    def test_model_wrong_shape_names_step(self, setup, name):
        sched, model, x = setup
        wrapped = ld3_ext.wrap_model(lambda xx, tt: model.fn(xx, tt)[:, :1], sched, prediction="x0", time_input="t")
        with pytest.raises(ModelOutputError, match=r"shape \(3, 1\) at step 0 .*expected the input's shape \(3, 2\)"):
            ALL_SOLVERS[name]().sample(wrapped, x, grid(sched))

    def test_model_nan_names_step(self, setup, name):
        sched, model, x = setup
        calls = []

        def fn(xx, tt):
            calls.append(1)
            out = model.fn(xx, tt)
            return out * math.nan if len(calls) == 3 else out

        wrapped = ld3_ext.wrap_model(fn, sched, prediction="x0", time_input="t")
        with pytest.raises(ModelOutputError, match=r"NaN/Inf at step 2 \(t="):
            ALL_SOLVERS[name]().sample(wrapped, x, grid(sched))

    @pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
    def test_model_returns_non_floating_tensor(self, setup, name, dtype):
        sched, model, x = setup
        wrapped = ld3_ext.wrap_model(lambda xx, tt: model.fn(xx, tt).to(dtype), sched, prediction="x0", time_input="t")
        with pytest.raises(ModelOutputError, match=rf"model returned a {dtype} tensor at step 0, expected a floating"):
            ALL_SOLVERS[name]().sample(wrapped, x, grid(sched))

    def test_model_returns_non_tensor(self, setup, name):
        sched, model, x = setup
        wrapped = ld3_ext.wrap_model(lambda xx, tt: xx.tolist(), sched, prediction="x0", time_input="t")
        with pytest.raises(ModelOutputError, match=r"model returned list at step 0, expected a tensor"):
            ALL_SOLVERS[name]().sample(wrapped, x, grid(sched))


@pytest.mark.parametrize("cls,max_order", [(ld3_ext.DPMSolverPP, 3), (ld3_ext.UniPC, 3), (ld3_ext.IPNDM, 4)])
def test_order_out_of_range(cls, max_order):
    for bad in (0, -1, max_order + 1):
        with pytest.raises(ValueError, match=rf"order must be in 1..{max_order} for {cls.__name__}, got {bad}"):
            cls(order=bad)
    with pytest.raises(TypeError, match=r"order must be an int, got float"):
        cls(order=2.0)
    with pytest.raises(TypeError, match=r"order must be an int, got bool"):
        cls(order=True)
    with pytest.raises(ValueError, match=r"order must be in 1\.\.\d+ for"):
        ld3_ext.make_solver(cls.name, order=max_order + 1)


def test_single_order_solvers_say_their_order():
    """Euler(order=2) said 'order must be in 1..1', Heun(order=3) 'in 1..2' (and Heun(order=1) 'must be 2')."""
    with pytest.raises(ValueError, match=r"order must be 1 \(it is a first-order method\) for Euler, got 2"):
        ld3_ext.Euler(order=2)
    for bad in (1, 3):
        with pytest.raises(ValueError, match=rf"order must be 2 for Heun \(a second-order method\), got {bad}"):
            ld3_ext.Heun(order=bad)
    with pytest.raises(TypeError, match="order must be an int"):
        ld3_ext.Heun(order=2.0)


def test_other_constructor_arguments():
    with pytest.raises(ValueError, match=r"solver_type must be 'midpoint' or 'heun'"):
        ld3_ext.DPMSolverPP(2, solver_type="taylor")
    with pytest.raises(ValueError, match=r"variant must be 'bh1' or 'bh2'"):
        ld3_ext.UniPC(2, variant="bh3")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        ld3_ext.UniPC(2, backend="cuda")
    with pytest.raises(ValueError, match=r"solver must be one of"):
        ld3_ext.make_solver("ddim")
    with pytest.raises(ValueError, match=r"solver config must name one of"):
        ld3_ext.solver_from_config({"name": "nope"})


def test_solver_config_round_trip():
    for s in (ld3_ext.DPMSolverPP(2, solver_type="heun", lower_order_final=False), ld3_ext.UniPC(3, variant="bh2"),
              ld3_ext.IPNDM(4), ld3_ext.Euler(), ld3_ext.Heun()):
        s2 = ld3_ext.solver_from_config(s.config())
        assert type(s2) is type(s) and s2.config() == s.config()


def test_guidance_without_conditions(setup):
    sched, model, x = setup
    g = ld3_ext.wrap_model(lambda xx, tt, cond: xx, sched, prediction="x0", guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"pass both 'cond' and 'uncond'"):
        ld3_ext.UniPC(backend="reference").sample(g, x, grid(sched), cond=x)


def test_validate_timesteps_without_value_checks_keeps_the_structural_ones():
    """values=False (used while compiling or capturing a CUDA graph) reads no tensor value but still
    rejects a wrong type, shape, dtype or device."""
    from ld3_ext.solvers.base import validate_model_timesteps, validate_timesteps
    sched = ld3_ext.EDM()
    increasing = torch.tensor([0.1, 1.0, 80.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        validate_timesteps(sched, increasing)
    rec = OpRecorder()
    with rec:
        assert validate_timesteps(sched, increasing, values=False) is increasing
        assert validate_model_timesteps(sched, increasing * 1e6, increasing, values=False) is not None
    assert not {"_local_scalar_dense", "is_nonzero", "item"} & set(rec.ops)
    with pytest.raises(TypeError, match="timesteps must be a 1-D torch.Tensor"):
        validate_timesteps(sched, [1.0, 0.5], values=False)
    with pytest.raises(ValueError, match="must be 1-D"):
        validate_timesteps(sched, increasing.reshape(1, 3), values=False)
    with pytest.raises(ValueError, match="floating"):
        validate_timesteps(sched, torch.tensor([3, 2, 1]), values=False)
    with pytest.raises(ValueError, match="model_timesteps: must have the same length"):
        validate_model_timesteps(sched, increasing[:2], increasing, values=False)


@pytest.mark.parametrize("schedule, grid", [
    (ld3_ext.EDM(1e-5, 80.0), [80.0, 1.0, 0.01, -5e-5]),   # within the round-off slack, but sigma = t < 0
    (ld3_ext.VPLinear(t_min=1e-9), [1.0, 0.5, 0.1, 0.0]),  # sigma(0) = 0: IPNDM and Heun returned NaN
], ids=["edm-negative", "vp-zero"])
@pytest.mark.parametrize("solver", [lambda: ld3_ext.DPMSolverPP(3), lambda: ld3_ext.IPNDM(3), lambda: ld3_ext.Heun()],
                         ids=["dpmpp", "ipndm", "heun"])
def test_grid_in_the_slack_past_the_schedules_domain_is_refused(schedule, grid, solver):
    """The range check's round-off slack must not admit times where alpha or sigma is not > 0: the solve returned
    NaN there (or blamed the model)."""
    mix = ld3_ext.testbeds.ring2d()
    with pytest.raises(ValueError, match=r"timesteps: contains times where the schedule is undefined"):
        solver().sample(mix.model(schedule), mix.prior_noise(schedule, 3), torch.tensor(grid, dtype=torch.float64))


def test_nfe_and_step_counts_are_checked():
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=rf"nfe must be an int >= 1, got {bad!r}"):
            ld3_ext.Heun().steps_for_nfe(bad)
        with pytest.raises(ValueError, match=rf"nfe must be an int >= 1, got {bad!r}"):
            ld3_ext.DPMSolverPP().steps_for_nfe(bad)
    with pytest.raises(ValueError, match="num_steps must be an int >= 0, got -2"):
        ld3_ext.Euler().nfe(-2)
    assert (ld3_ext.Heun().nfe(3), ld3_ext.Heun().steps_for_nfe(5), ld3_ext.UniPC().steps_for_nfe(6)) == (6, 2, 6)


@pytest.mark.parametrize("cls", [ld3_ext.DPMSolverPP, ld3_ext.UniPC, ld3_ext.IPNDM, ld3_ext.Euler, ld3_ext.Heun])
def test_checkpoint_model_must_be_a_bool(cls):
    # a truthy string/int would silently turn checkpointing on (bool("no") is True)
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match=r"checkpoint_model must be a bool"):
            cls(checkpoint_model=bad)
    assert cls(checkpoint_model=True).checkpoint_model is True


def test_unhashable_solver_names_are_named():
    # a list/dict name failed the dict lookup as "unhashable type: 'list'", naming nothing
    from ld3_ext.functional import get_solver
    for bad in (["dpmpp"], {"name": "dpmpp"}):
        with pytest.raises(ValueError, match=r"solver must be one of"):
            ld3_ext.make_solver(bad)
        with pytest.raises(ValueError, match=r"solver must be a Solver or one of"):
            get_solver(bad)
        with pytest.raises(ValueError, match=r"solver config must name one of"):
            ld3_ext.solver_from_config({"name": bad, "order": 2})


@pytest.mark.parametrize("cls", [ld3_ext.DPMSolverPP, ld3_ext.UniPC, ld3_ext.IPNDM])
def test_numpy_integer_order(cls):
    # taken like every other count in the library (e.g. `for order in np.arange(1, 4)`), stored as an int so
    # the config stays JSON
    import json
    import numpy as np
    s = cls(order=np.int64(2))
    assert s.order == 2 and type(s.order) is int
    assert json.loads(json.dumps(s.config()))["order"] == 2
    assert type(ld3_ext.make_solver(cls.name, order=np.int32(3)).order) is int
    with pytest.raises(TypeError, match=r"order must be an int"):
        cls(order=np.float64(2.0))


def test_validate_timesteps_needs_a_schedule_without_the_range_check_too():
    # check_range=False still checks the schedule is defined at every time: a None schedule was an AttributeError
    from ld3_ext.solvers import validate_timesteps
    t = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)
    for check_range in (True, False):
        with pytest.raises(TypeError, match=r"schedule must be an ld3_ext NoiseSchedule"):
            validate_timesteps(None, t, check_range=check_range)
    assert validate_timesteps(ld3_ext.VPLinear(), t, check_range=False) is t


@pytest.mark.parametrize("name", ["step", "returns"])
def test_model_keywords_that_clash_with_predict_are_named(name):
    """A model keyword named step or returns reached predict twice: TypeError 'got multiple values for keyword
    argument', from inside the solver; now the sample call names them, for every solver and backend."""
    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(lambda x, t, **kw: 0.9 * x, s, prediction="x0")
    x = torch.randn(2, 3, dtype=torch.float64)
    grid = D.logsnr_uniform(s, 3)
    for solver in (ld3_ext.DPMSolverPP(2), ld3_ext.Heun(), ld3_ext.UniPC(2, backend="reference")):
        with pytest.raises(TypeError, match=rf"model keyword arguments \['{name}'\] clash with DiffusionModel.predict"):
            solver.sample(model, x, grid, **{name: 1})
    assert torch.isfinite(ld3_ext.DPMSolverPP(2).sample(model, x, grid, other=1)).all()  # others pass through


def test_predict_takes_a_one_element_time_of_any_shape_and_an_integer_time():
    """t of shape [1, 1] broadcast x0 to one more dimension than x (eps kept x's shape); an integer t reached
    VPDiscrete, whose knot tables were then cast to integers (alpha(1) = 0.135 instead of 0.068)."""
    s = ld3_ext.VPDiscrete.linear()
    model = ld3_ext.wrap_model(lambda x, t: 0.3 * x, s, prediction="eps")
    x = torch.randn(4, dtype=torch.float64)
    want = model.predict(x, torch.tensor(1.0, dtype=torch.float64))
    for t in (torch.tensor([[1.0]], dtype=torch.float64), torch.tensor(1), torch.tensor([1]), 1):
        got = model.predict(x, t)
        for a, b in zip(got, want):
            assert a.shape == x.shape
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="VPDiscrete: times must be a floating tensor"):
        s.alpha(torch.tensor(1))


def test_wrap_model_names_a_non_bool_check_output_a_bool_guidance_and_a_bad_time_input():
    """check_output='no' was truthy (checks stayed on), guidance_scale=True became 1.0, and a time_input callable
    returning a float failed inside the network call with "'float' object has no attribute 'dtype'"."""
    s = ld3_ext.EDM()
    with pytest.raises(TypeError, match="check_output"):
        ld3_ext.wrap_model(lambda x, t: x, s, prediction="x0", check_output="no")
    with pytest.raises(TypeError, match="guidance_scale must be a number or None, got True"):
        ld3_ext.wrap_model(lambda x, t, **kw: x, s, prediction="x0", guidance_scale=True)
    m = ld3_ext.wrap_model(lambda x, t: x, s, prediction="x0", time_input=lambda t: float(t))
    with pytest.raises(TypeError, match="time_input: the callable must return a torch.Tensor"):
        m.predict(torch.randn(2, 3), torch.tensor(1.0))
    ok = ld3_ext.wrap_model(lambda x, t: 0.5 * x, s, prediction="x0", time_input=lambda t: 2 * t, check_output=False)
    assert ok.check_output is False and torch.isfinite(ok.predict(torch.randn(2, 3), torch.tensor(1.0))[0]).all()


def _collide(times, j):
    """times (float64) with entry j replaced by the double just below entry j-1 (the same float64 lambda at 1e6)."""
    t = torch.tensor(times, dtype=torch.float64)
    t[j] = torch.nextafter(t[j - 1], torch.zeros((), dtype=torch.float64))
    return t


def _one_ulp_grid():
    """EDM at sigma = 1e6: t and the next double below have the same lambda = -log t in float64."""
    return _collide([1e6, 0.0, 10.0, 0.01], 1)


@pytest.mark.parametrize("solver", [lambda: ld3_ext.DPMSolverPP(order=2), lambda: ld3_ext.DPMSolverPP(order=3),
                                    lambda: ld3_ext.UniPC(order=2), lambda: ld3_ext.UniPC(order=3, variant="bh2")])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_a_grid_step_with_zero_lambda_step_is_named_not_blamed_on_the_model(solver, backend):
    """Distinct times with one float64 lambda: the step had h = 0, infinite coefficients, and the solve failed
    with "model returned NaN/Inf at step 2" (the model was fine).  Now the grid is refused naming the entries,
    as a DegenerateGridError (a ValueError; a FloatingPointError for LD3's time_mode="auto" trials)."""
    from ld3_ext import DegenerateGridError, fused

    schedule = ld3_ext.EDM(sigma_min=0.002, sigma_max=1e7)
    model = ld3_ext.wrap_model(lambda x, t: 0.9 * x, schedule, prediction="x0")
    s = solver()
    s.backend = backend
    spec = s.spec()
    # the colliding step first, in the middle (read by the order >= 2 steps after it), and the grid's entry names
    for grid, j in ((_one_ulp_grid(), 1), (_collide([1e7, 3e6, 1e6, 0.0, 10.0, 0.01], 3), 3)):
        with pytest.raises(DegenerateGridError, match=rf"timesteps: entries {j - 1} and {j} .* same log-SNR") as info:
            s.sample(model, torch.randn(2, 3, dtype=torch.float64), grid)
        assert isinstance(info.value, ValueError) and isinstance(info.value, FloatingPointError)
        with pytest.raises(DegenerateGridError, match=rf"coefficient_table: timesteps: entries {j - 1} and {j}"):
            ld3_ext.ops.coefficient_table(schedule, grid, spec, backend=backend)
    # the low-level tables check too (ops.coefficient_table checks before it dispatches to them)
    with pytest.raises(DegenerateGridError, match="entries 0 and 1"):
        ld3_ext.coefficients.coefficient_table_reference(schedule, _one_ulp_grid(), spec)
    with pytest.raises(DegenerateGridError, match="entries 0 and 1"):
        fused.coefficient_table(schedule, _one_ulp_grid(), spec)


@pytest.mark.parametrize("solver", [lambda: ld3_ext.DPMSolverPP(order=2), lambda: ld3_ext.DPMSolverPP(order=3),
                                    lambda: ld3_ext.UniPC(order=3, variant="bh2")])
def test_a_collision_only_a_final_first_order_step_reads_still_solves(solver):
    """lower_order_final makes the last step first order, which divides by no lambda step: a collision there
    solved finitely before the check and still does (the check looks only at the steps order >= 2 rows read)."""
    schedule = ld3_ext.EDM(sigma_min=0.002, sigma_max=1e7)
    model = ld3_ext.wrap_model(lambda x, t: 0.9 * x, schedule, prediction="x0")
    grid = _collide([1e7, 3e6, 1e6, 6e5, 0.0], 4)
    x_T = torch.randn(2, 3, dtype=torch.float64) * 1e6
    y = solver().sample(model, x_T, grid)
    # the ODE dx/dsigma = (x - 0.9 x)/sigma has x = x_T (sigma/sigma_T)^0.1; three real steps over a factor of 17
    # in sigma land within 4.9-7.1 % of it (measured), and the zero-length last step changes nothing
    exact = x_T * (grid[-1] / grid[0]) ** 0.1
    assert ((y - exact).abs().max() / exact.abs().max()).item() < 0.1


def test_a_float32_reference_table_checks_lambda_in_float32():
    """coefficient_table_reference computes in the grid's dtype: two float32 times one float32-ulp apart at 80 have
    one float32 lambda (not one float64 lambda) and gave a non-finite float32 table."""
    from ld3_ext import DegenerateGridError

    big = torch.tensor(80.0)
    grid = torch.stack([big, torch.nextafter(big, torch.zeros(())), torch.tensor(10.0), torch.tensor(0.01)])
    with pytest.raises(DegenerateGridError, match=r"entries 0 and 1 .* in float32"):
        ld3_ext.coefficients.coefficient_table_reference(ld3_ext.EDM(), grid, ld3_ext.DPMSolverPP(order=2).spec())
    # the solvers compute the table in float64, where these two times differ: they solve
    model = ld3_ext.wrap_model(lambda x, t: 0.9 * x, ld3_ext.EDM(), prediction="x0")
    x_T = torch.randn(2, 3)
    y = ld3_ext.DPMSolverPP(order=2).sample(model, x_T, grid)
    y_ref = ld3_ext.DPMSolverPP(order=2, backend="reference").sample(model, x_T, grid)
    # both tables in float64: one map.  (Not near the ODE's solution: the second step's lambda step is ~2e7 times
    # the first's, so the order-2 difference (m_1 - m_0)/r of two float32 outputs one float32 ulp apart in time is
    # rounding noise times 2e7 -- the method's own conditioning on such a grid, the same on both backends)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)


def test_ld3_scheduler_refuses_such_a_grid_when_built():
    """LD3Scheduler checked its grid without the solver: a colliding grid was accepted and failed only inside
    set_timesteps, named "coefficient_table: timesteps"."""
    pytest.importorskip("diffusers")
    from ld3_ext import DegenerateGridError
    from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler

    # flow matching: 0.003 and the double below it have one float64 lambda = log((1 - t)/t)
    grid = _collide([0.9, 0.5, 0.1, 0.003, 0.0, 0.001], 4)
    with pytest.raises(DegenerateGridError, match=r"ld3_timesteps: entries 3 and 4"):
        LD3Scheduler.from_timesteps(grid, solver="dpmpp", schedule=ld3_ext.FlowMatching())


@pytest.mark.parametrize("solver", [lambda: ld3_ext.Euler(), lambda: ld3_ext.IPNDM(order=4),
                                    lambda: ld3_ext.DPMSolverPP(order=1), lambda: ld3_ext.UniPC(order=1),
                                    lambda: ld3_ext.Heun()])
def test_solvers_without_lambda_divisions_still_take_such_a_grid(solver):
    """First-order steps, Euler, iPNDM and Heun divide by no lambda step (phi_1(0) = 0): the same grid solves to
    finite values, as before."""
    schedule = ld3_ext.EDM(sigma_min=0.002, sigma_max=1e6)
    model = ld3_ext.wrap_model(lambda x, t: 0.9 * x, schedule, prediction="x0")
    x_T, grid = torch.randn(2, 3, dtype=torch.float64) * 1e6, _one_ulp_grid()
    sv = solver()
    y = sv.sample(model, x_T, grid)
    # oracles on this linear model (the steps are huge, so the results are far from the ODE's solution; what is
    # checked is that each solver computes its own map on this grid): a first-order step (DDIM) multiplies x by
    # 0.9 + 0.1 r with r = sigma_{i+1}/sigma_i; Heun is EDM's Algorithm 2 (conftest); iPNDM's and UniPC's (whose
    # corrector makes order 1 no plain DDIM) native and reference tables and updates agree
    if isinstance(sv, ld3_ext.Heun):
        want = heun_textbook_float64(model, x_T, grid)
    elif isinstance(sv, (ld3_ext.IPNDM, ld3_ext.UniPC)):
        sv_ref = solver()
        sv_ref.backend = "reference"
        want = sv_ref.sample(model, x_T, grid)
    else:
        r = grid[1:] / grid[:-1]
        want = x_T * torch.prod(0.9 + 0.1 * r)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=0)


def test_validate_timesteps_names_a_bad_spec_or_lambda_dtype():
    from ld3_ext.solvers.base import validate_timesteps

    grid = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    with pytest.raises(TypeError, match=r"spec must be a SolverSpec or None, got str"):
        validate_timesteps(ld3_ext.EDM(), grid, spec="dpmpp")
    for bad in (torch.int64, "float64"):
        with pytest.raises(TypeError, match=r"lambda_dtype must be a floating torch.dtype"):
            validate_timesteps(ld3_ext.EDM(), grid, spec=ld3_ext.DPMSolverPP(order=2).spec(), lambda_dtype=bad)


def test_functional_sample_names_a_degenerate_pair_of_sigmas():
    """ld3_ext.sample (k-diffusion style) named the pair "timesteps", a name the caller never used."""
    from ld3_ext import DegenerateGridError

    big = torch.tensor(1e6, dtype=torch.float64)
    sigmas = torch.stack([torch.tensor(2e6, dtype=torch.float64), big,
                          torch.nextafter(big, torch.zeros((), dtype=torch.float64)),
                          torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)])
    with pytest.raises(DegenerateGridError, match=r"^sigmas: entries 1 and 2 \(1000000.0 and 999999.99"):
        ld3_ext.sample(lambda x, sig: 0.9 * x, torch.randn(2, 3, dtype=torch.float64), sigmas, solver="dpmpp_3m")
    # a solver without lambda divisions takes it, as before
    y = ld3_ext.sample(lambda x, sig: 0.9 * x, torch.randn(2, 3, dtype=torch.float64), sigmas, solver="euler")
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("schedule", [ld3_ext.EDM(), ld3_ext.VPLinear(), ld3_ext.VPCosine(), ld3_ext.FlowMatching(),
                                      ld3_ext.VPLinear(beta_min=0.3, beta_max=9.0, t_min=1e-4)],
                         ids=["edm", "vplinear", "vpcosine", "flow", "vplinear_custom"])
def test_native_lambda_is_the_schedules_own(schedule):
    """_C.schedule_lambda (the table's lambda, which the grid check's screen reads) against the schedule's torch
    lambda: both branches of VPCosine, both ends of every schedule."""
    from ld3_ext import _native
    if not _native.native_available():
        pytest.skip("ld3_ext._C is not built")
    lo, hi = schedule.t_min, schedule.t_max
    t = torch.cat([torch.linspace(hi, lo, 97, dtype=torch.float64),
                   lo + (hi - lo) * torch.logspace(-12, 0, 25, dtype=torch.float64)])
    kind, (p0, p1) = schedule.native_spec()
    got = torch.tensor(_native._C.schedule_lambda(kind, p0, p1, t.tolist()), dtype=torch.float64)
    want = schedule.lambda_(t)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=4e-15, atol=4e-15)
    with pytest.raises(RuntimeError, match="unknown schedule kind 9"):
        _native._C.schedule_lambda(9, 0.0, 0.0, [0.5])


def test_the_lambda_step_check_spends_no_torch_ops_on_a_clear_grid(monkeypatch):
    """The degenerate-grid check computed lambda with torch ops on every call (about 13 us warm, 50 us after a
    kernel had swept the caches: 8 % of a fused update's forward + backward); on a native schedule it now reads the
    extension's lambda and falls back to that exact check only for a step too small to call (same verdicts)."""
    from ld3_ext import DegenerateGridError, _native
    from ld3_ext.solvers.base import validate_timesteps
    if not _native.native_available():
        pytest.skip("ld3_ext._C is not built")
    calls = []
    schedule = ld3_ext.EDM(sigma_min=0.002, sigma_max=1e7)
    real = type(schedule).lambda_
    monkeypatch.setattr(type(schedule), "lambda_", lambda self, t: calls.append(1) or real(self, t))
    spec = ld3_ext.DPMSolverPP(order=3).spec()
    grid = torch.tensor([80.0, 40.0, 20.0, 10.0, 5.0], dtype=torch.float64)
    validate_timesteps(schedule, grid, spec=spec)
    assert calls == []
    # a float32 table's check, and a step far below the screen's margin (not degenerate): the exact check decides
    validate_timesteps(schedule, grid, spec=spec, lambda_dtype=torch.float32)
    assert len(calls) == 1
    close = torch.tensor([80.0, 80.0 * (1 - 1e-12), 20.0, 5.0], dtype=torch.float64)
    validate_timesteps(schedule, close, spec=spec)
    assert len(calls) == 2
    with pytest.raises(DegenerateGridError, match="entries 0 and 1"):
        validate_timesteps(schedule, _one_ulp_grid(), spec=spec)
    assert len(calls) == 3


def test_a_patched_schedule_gets_the_exact_lambda_check():
    """The screen reads the extension's closed form; a schedule whose log_sigma was replaced on the instance is not
    that form, so the exact check (the instance's own lambda) decides: here two times that are distinct in the
    closed form collide in the replacement's float32 log."""
    from ld3_ext import DegenerateGridError
    from ld3_ext.solvers.base import validate_timesteps
    spec = ld3_ext.DPMSolverPP(order=2).spec()
    grid = torch.tensor([80.0, 80.0 - 1e-6, 40.0, 20.0, 10.0], dtype=torch.float64)
    validate_timesteps(ld3_ext.EDM(), grid, spec=spec)  # distinct in float64
    patched = ld3_ext.EDM()
    patched.log_sigma = lambda t: torch.log(t.float()).to(t.dtype)
    with pytest.raises(DegenerateGridError, match="entries 0 and 1"):
        validate_timesteps(patched, grid, spec=spec)


def test_a_solver_spec_subclass_without_hash_is_still_checked():
    """The steps the check reads are cached per spec; a SolverSpec subclass defining __eq__ (so no __hash__) cannot
    key the cache and is checked uncached, with the same verdicts."""
    from ld3_ext import DegenerateGridError
    from ld3_ext.solvers.base import SolverSpec, validate_timesteps

    class EqSpec(SolverSpec):
        def __eq__(self, other):
            return super().__eq__(other)

    spec = EqSpec("dpmpp", order=3)
    with pytest.raises(TypeError):
        hash(spec)
    validate_timesteps(ld3_ext.EDM(), torch.tensor([80.0, 40.0, 20.0, 10.0, 5.0], dtype=torch.float64), spec=spec)
    with pytest.raises(DegenerateGridError):
        validate_timesteps(ld3_ext.EDM(), torch.tensor([80.0, 40.0, 40.0 - 2 ** -47, 10.0, 5.0],
                                                       dtype=torch.float64), spec=spec)
