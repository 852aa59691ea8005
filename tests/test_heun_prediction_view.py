"""Heun takes the noise-prediction view for networks that do not predict x0 (solvers/heun.py).

Its x0 form weighs the history by dt/s_{i+1}; an x0 made from a noise prediction carries the rounding of
x - sigma eps, which that weight amplified: in float32 one EDM step 80 -> 0.002 was 1.2e-3 off and the last
time's gradient 24x too large.  The oracle is EDM's Algorithm 2 written out in y = x/alpha with d = eps
(float64, autograd for the time gradients), independent of the multistep tables.
"""
import pytest
import torch

import ld3_ext
from ld3_ext import ops
from ld3_ext.solvers.heun import heun_multistep_table, heun_view

BACKENDS = ["reference", "fused"]


def _eps_net(x, tt):
    # smooth in x and in the network time, so time gradients flow through the network too
    return 0.5 * torch.tanh(x) + 0.01 * torch.log1p(tt).reshape(-1, *([1] * (x.dim() - 1))) * x


def _textbook_heun(schedule, eps_fn, x_T, t):
    """EDM Algorithm 2 (no churn) in y = x/alpha, s = sigma/alpha, d = eps; float64 tensors in, autograd-able."""
    alpha, s = schedule.alpha(t), schedule.edm_sigma(t)
    y = x_T / alpha[0]
    for i in range(t.numel() - 1):
        dt = s[i + 1] - s[i]
        d0 = eps_fn(alpha[i] * y, t[i])
        y_pred = y + dt * d0
        d1 = eps_fn(alpha[i + 1] * y_pred, t[i + 1])
        y = y + dt * (d0 + d1) / 2
    return alpha[-1] * y


def _net_time_eps(schedule):
    model = ld3_ext.wrap_model(_eps_net, schedule, prediction="eps")

    def eps_fn(x, tt):
        return _eps_net(x, model.network_time(tt).reshape(()).expand(x.shape[0]))
    return model, eps_fn


def test_heun_view_rule():
    for p in ("x0", "edm", "v", "velocity"):
        assert heun_view(p) == "x0"
    for p in ("eps", "score"):
        assert heun_view(p) == "eps"
    assert heun_view("eps", coupled=False) == "x0"
    with pytest.raises(TypeError, match="prediction must be a prediction name"):
        heun_view(None)
    with pytest.raises(TypeError, match="coupled must be True or False"):
        heun_view("eps", coupled=torch.tensor(True))
    with pytest.raises(ValueError, match="view"):
        heun_multistep_table(ld3_ext.EDM(), torch.tensor([80.0, 1.0], dtype=torch.float64), view="sample")


@pytest.mark.parametrize("schedule", [ld3_ext.EDM(), ld3_ext.VPLinear(), ld3_ext.FlowMatching()],
                         ids=lambda s: type(s).__name__)
def test_views_are_the_same_map_in_float64(schedule):
    """One Heun step from each table, fed the same network's x0 and eps (x0 = (x - sigma eps)/alpha)."""
    g = torch.Generator().manual_seed(0)
    t = ld3_ext.discretizations.get_discretization("logsnr", schedule, 3).to(torch.float64)
    tab_x0, orders = heun_multistep_table(schedule, t, "x0")
    tab_eps, orders_eps = heun_multistep_table(schedule, t, "eps")
    assert orders == orders_eps
    x = torch.randn(2, 5, dtype=torch.float64, generator=g)
    for i in range(t.numel() - 1):
        a_i, s_i = schedule.alpha(t[i]), schedule.sigma(t[i])
        a_j, s_j = schedule.alpha(t[i + 1]), schedule.sigma(t[i + 1])
        e0 = torch.randn(2, 5, dtype=torch.float64, generator=g)
        e1 = torch.randn(2, 5, dtype=torch.float64, generator=g)
        outs = []
        for tab, m0 in ((tab_x0, (x - s_i * e0) / a_i), (tab_eps, e0)):
            r = tab[2 * i, 0]
            z = r[0] * x + r[1] * m0
            m1 = (z - s_j * e1) / a_j if tab is tab_x0 else e1
            r = tab[2 * i + 1, 0]
            outs.append(r[0] * z + r[1] * m1 + r[2] * m0)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        x = outs[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", [ld3_ext.EDM(), ld3_ext.VPLinear()], ids=lambda s: type(s).__name__)
def test_heun_matches_textbook_float64_with_time_gradients(schedule, backend):
    model, eps_fn = _net_time_eps(schedule)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 4, dtype=torch.float64, generator=g) * float(schedule.prior_std())
    t = ld3_ext.discretizations.get_discretization("edm", schedule, 4).to(torch.float64)
    w = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    t1 = t.clone().requires_grad_()
    ours = ld3_ext.Heun(backend=backend).sample(model, x_T, t1)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), t1)
    t2 = t.clone().requires_grad_()
    ref = _textbook_heun(schedule, eps_fn, x_T, t2)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), t2)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10 * float(g_ref.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_eps_network_on_a_long_last_step(backend):
    """One EDM step 80 -> 0.002: the x0 form was 1.2e-3 off in the sample and 24x off in dL/dt_N."""
    schedule = ld3_ext.EDM()
    model, eps_fn = _net_time_eps(schedule)
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g) * 80.0
    w = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    t = torch.tensor([80.0, 0.002], dtype=torch.float64)
    t64 = t.clone().requires_grad_()
    truth = _textbook_heun(schedule, eps_fn, x_T, t64)
    (g_true,) = torch.autograd.grad((truth * w).sum(), t64)
    t32 = t.clone().requires_grad_()
    got = ld3_ext.Heun(backend=backend).sample(model, x_T.float(), t32)
    (g_got,) = torch.autograd.grad((got.double() * w).sum(), t32)
    err = float((got.detach().double() - truth.detach()).abs().max() / truth.detach().abs().max())
    assert err < 2e-6, err
    rel = ((g_got - g_true).abs() / g_true.abs()).max()
    assert rel < 1e-4, (g_got, g_true)


def _textbook_decoupled_heun(schedule, eps_fn, x_T, t, tm):
    """Heun with decoupled model times as the library defines it: EDM's d = (y - x0(t~_i)) / s(t_i), the network's
    x0 = (x - sigma(t~) eps) / alpha(t~) made at the model time t~ and used in the solver time's formulas."""
    alpha, s = schedule.alpha(t), schedule.edm_sigma(t)

    def d(x, i):
        x0 = (x - schedule.sigma(tm[i]) * eps_fn(x, tm[i])) / schedule.alpha(tm[i])
        return (x / alpha[i] - x0) / s[i]
    y = x_T / alpha[0]
    for i in range(t.numel() - 1):
        dt = s[i + 1] - s[i]
        d0 = d(alpha[i] * y, i)
        y_pred = y + dt * d0
        y = y + dt * (d0 + d(alpha[i + 1] * y_pred, i + 1)) / 2
    return alpha[-1] * y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", [ld3_ext.EDM(), ld3_ext.VPLinear()], ids=lambda s: type(s).__name__)
def test_decoupled_model_times_keep_the_x0_definition(schedule, backend):
    """With model times apart from the grid the two forms are different samplers (0.8 relative at a 15 % shift):
    an eps network keeps the x0 form there, as schedules learned with decoupled times were fitted to, gradients
    w.r.t. both time vectors included; the functional sampler (an x0 model inside) agrees."""
    model, eps_fn = _net_time_eps(schedule)
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(2, 3, 4, dtype=torch.float64, generator=g) * float(schedule.prior_std())
    t = ld3_ext.discretizations.get_discretization("edm", schedule, 4).to(torch.float64)
    tm = t.clone()
    tm[1:-1] = t[1:-1] + 0.15 * (t[:-2] - t[1:-1])
    w = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    t1, tm1 = t.clone().requires_grad_(), tm.clone().requires_grad_()
    ours = ld3_ext.Heun(backend=backend).sample(model, x_T, t1, tm1)
    g_ours = torch.autograd.grad((ours * w).sum(), [t1, tm1])
    t2, tm2 = t.clone().requires_grad_(), tm.clone().requires_grad_()
    ref = _textbook_decoupled_heun(schedule, eps_fn, x_T, t2, tm2)
    g_ref = torch.autograd.grad((ref * w).sum(), [t2, tm2])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))
    # the same values as separate tensors without grad: coupled by value, but not the grid itself -> x0 form too
    same = ld3_ext.Heun(backend=backend).sample(model, x_T, t, t.clone())
    torch.testing.assert_close(same, ld3_ext.Heun(backend=backend).sample(model, x_T, t), rtol=1e-12, atol=1e-12)


def test_the_functional_sampler_agrees_with_decoupled_model_sigmas():
    schedule = ld3_ext.EDM()
    model, _ = _net_time_eps(schedule)
    x_T = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 80.0
    t = ld3_ext.discretizations.get_discretization("edm", schedule, 4).to(torch.float64)
    tm = t.clone()
    tm[1:-1] = t[1:-1] * 1.03
    ours = ld3_ext.Heun().sample(model, x_T, t, tm)
    functional = ld3_ext.sample(model, x_T, t, solver="heun", model_sigmas=tm)
    torch.testing.assert_close(functional, ours, rtol=1e-12, atol=1e-12)


def test_scheduler_takes_the_same_view():
    """LD3Scheduler's Heun (diffusers loop) equals solver.sample with an eps network, bitwise -- on the grid's own
    times in the noise view (and in float32 near the float64 solve, which the x0 view was not), with stored model
    times in the x0 view."""
    pytest.importorskip("diffusers")
    from ld3_ext.integrations.diffusers_scheduler import LD3Scheduler
    sched = LD3Scheduler(solver_config={"name": "heun"}, prediction_type="epsilon")
    sched.set_timesteps(1)
    schedule = sched.schedule
    model = ld3_ext.wrap_model(_eps_net, schedule, prediction="eps")
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(1, 2, 4, 4, generator=g) * sched.init_noise_sigma

    def run(s):
        x = x_T.clone()
        for ts in s.timesteps:
            x = s.step(_eps_net(x, ts.reshape(1).float()), ts, x).prev_sample
        return x
    t = sched._full[0]
    x = run(sched)
    assert torch.equal(x, ld3_ext.Heun().sample(model, x_T, t))
    truth = ld3_ext.Heun().sample(model, x_T.double(), t)
    assert float((x.double() - truth).abs().max() / truth.abs().max()) < 1e-5
    stored = LD3Scheduler.from_timesteps(t, t.clone(), solver="heun", schedule=schedule, prediction_type="epsilon")
    stored.set_timesteps()
    assert torch.equal(run(stored), ld3_ext.Heun().sample(model, x_T, t, t.clone()))


def test_a_coupled_schedule_file_samples_as_it_was_trained():
    """A schedule learned with decoupled=False stores model_timesteps equal to its timesteps; sampled with both as
    separate tensors, Heun took the x0 view (7.5e-3 off in float32) where the trainer had taken the noise view.
    solver_model_timesteps() hands a solver None for such a file, its model times otherwise."""
    from ld3_ext.schedule_file import LearnedSchedule
    schedule = ld3_ext.EDM()
    model, _ = _net_time_eps(schedule)
    t = torch.tensor([80.0, 0.002], dtype=torch.float64)
    ls = LearnedSchedule(t, t.clone(), solver_config={"name": "heun", "order": 2}, nfe=2,
                         schedule_config=schedule.config())
    assert ls.solver_model_timesteps() is None
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 80.0
    assert torch.equal(ls.sample(model, x_T), ld3_ext.Heun().sample(model, x_T, t))
    t3 = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    tm3 = torch.tensor([80.0, 1.1, 0.002], dtype=torch.float64)
    decoupled = LearnedSchedule(t3, tm3, solver_config={"name": "heun", "order": 2}, nfe=4,
                                schedule_config=schedule.config())
    assert torch.equal(decoupled.solver_model_timesteps(), tm3)


@pytest.mark.parametrize("schedule, grid", [
    (ld3_ext.EDM(), [0.002, 1.0, 80.0]),             # increasing
    (ld3_ext.EDM(), [80.0, 1.0, 1.0, 0.002]),        # a repeated time
    (ld3_ext.EDM(), [80.0, float("nan"), 0.002]),
    (ld3_ext.EDM(), [80.0, 1.0, 0.0]),               # sigma = 0: the x0 form divides by it
    (ld3_ext.FlowMatching(), [1.5, 0.5, 0.01]),      # alpha < 0: not a time of the schedule
])
def test_heun_table_refuses_grids_the_solvers_refuse(schedule, grid):
    """Called directly (the diffusers scheduler does) it returned finite tables on increasing grids and NaN ones
    on undefined times, where ops.coefficient_table names the grid."""
    t = torch.tensor(grid, dtype=torch.float64)
    with pytest.raises(ValueError, match="timesteps"):
        heun_multistep_table(schedule, t)
    with pytest.raises(ValueError, match="timesteps"):  # as the multistep tables do
        ops.coefficient_table(schedule, t, ld3_ext.DPMSolverPP(order=2).spec())


def test_heun_table_validate_false_reads_nothing_back():
    """Heun.sample checked its grid already: validate=False builds the table without a second check."""
    table, orders = heun_multistep_table(ld3_ext.EDM(), torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64),
                                         validate=False)
    assert table.shape == (4, 2, 5) and orders == [1, 2, 1, 2]
    with pytest.raises(TypeError, match="validate must be a bool"):
        heun_multistep_table(ld3_ext.EDM(), torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64), validate="no")


@pytest.mark.parametrize("view", ["x0", "eps"])
def test_heun_table_time_derivative_where_alpha_vanishes(view):
    """Flow matching near t = 1: s = t/(1-t), the x0 form's a = sigma_1/sigma_0 = t_1/t_0 exactly, so
    da/dt_0 = -t_1/t_0^2 and da/dt_1 = 1/t_0.  Written as alpha_1 s_1/(alpha_0 s_0) the derivative cancelled terms
    of size 1/alpha^2 and came out 3e-8 relative off at t_0 = 1 - 1e-8; the eps form's a = alpha_1/alpha_0 is
    checked against its own closed form (1-t_1)/(1-t_0)."""
    t0, t1 = 1.0 - 1e-8, 0.5
    t = torch.tensor([t0, t1], dtype=torch.float64, requires_grad=True)
    table, _ = heun_multistep_table(ld3_ext.FlowMatching(), t, view)
    a = table[0, 0, 0]
    da = torch.autograd.grad(a, t)[0]
    if view == "x0":
        want_a, want = t1 / t0, [-t1 / t0 ** 2, 1.0 / t0]
    else:
        want_a, want = (1 - t1) / (1 - t0), [(1 - t1) / (1 - t0) ** 2, -1.0 / (1 - t0)]
    assert abs(a.item() - want_a) <= 1e-12 * abs(want_a)
    for got, w in zip(da.tolist(), want):
        assert abs(got - w) <= 1e-12 * abs(w), (view, da.tolist(), want)
