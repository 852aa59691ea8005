"""Baseline schedules: DMN, GITS (DP search and published lists), AYS, and the registry."""
import itertools
import math

import numpy as np
import pytest
import torch

from ld3_ext import EDM, DPMSolverPP, Euler, UniPC, VPDiscrete, VPLinear, discretizations, testbeds
from ld3_ext.baselines import (AYS_SIGMAS, GITS_PRESETS, ays, ays_sigmas, baseline_timesteps, dmn, dmn_objective,
                               gits, gits_dp, gits_preset, loglinear_interp, path_cost)
from ld3_ext.baselines.dmn import dmn_lambdas, exp_lagrange_weights
from ld3_ext.baselines.gits import gits_cost_matrix, teacher_states
from ld3_ext.metrics import teacher_rmse
from conftest import smooth_mixture


def _valid_grid(t, schedule, nfe):
    assert t.dtype == torch.float64 and t.shape == (nfe + 1,)
    assert float(t[0]) == schedule.t_max and float(t[-1]) == schedule.t_min
    assert bool((t[1:] < t[:-1]).all())


@pytest.fixture(scope="module")
def gmm_setup():
    """digits64 mixture on EDM, 64 noises, and an accurate teacher (UniPC(3), 200 logSNR steps)."""
    s = EDM(0.002, 80.0)
    gm = testbeds.digits64()
    model = gm.model(s)
    x_T = gm.prior_noise(s, 64, torch.Generator().manual_seed(0))
    teacher = UniPC(order=3).sample(model, x_T, discretizations.logsnr_uniform(s, 200))
    return s, model, x_T, teacher


# ---------------------------------------------------------------------------------------------- DMN
def test_exp_lagrange_weights_exact():
    # one node: integral of e^lam; two nodes sum to the same (Lagrange basis sums to 1)
    assert exp_lagrange_weights(np.array([0.0]), 0.0, 1.0)[0] == pytest.approx(np.e - 1, rel=1e-13)
    w = exp_lagrange_weights(np.array([-0.7, 0.0]), 0.0, 1.3)
    assert w.sum() == pytest.approx(np.exp(1.3) - 1, rel=1e-13)
    # linear basis through (-0.7, 0): weight of node 0 is integral e^l * (l + 0.7)/0.7
    want = ((1.3 + 0.7 - 1) * np.exp(1.3) - (0.7 - 1)) / 0.7
    assert w[1] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("nfe", [3, 5])
def test_dmn_valid_grid_and_lower_bound(nfe):
    s = EDM(0.002, 80.0)
    t = dmn(s, nfe)
    _valid_grid(t, s, nfe)
    lam = s.lambda_(t).numpy()
    uni = np.linspace(s.lambda_min, s.lambda_max, nfe + 1)
    trunc = 3 if nfe <= 7 else 0
    assert dmn_objective(lam, trunc_num=trunc) <= dmn_objective(uni, trunc_num=trunc) + 1e-12


def test_dmn_latent_on_vp_discrete():
    s = VPDiscrete.linear()
    t = dmn(s, 5, space="latent")
    _valid_grid(t, s, 5)


def test_dmn_beats_time_uniform_on_mixture(gmm_setup):
    s, model, x_T, teacher = gmm_setup
    solver = DPMSolverPP(order=3)
    err = {name: float(teacher_rmse(solver.sample(model, x_T, t), teacher).mean())
           for name, t in [("uniform", discretizations.time_uniform(s, 5)), ("dmn", dmn(s, 5))]}
    assert err["dmn"] < 0.5 * err["uniform"], err


def test_dmn_bad_args():
    s = EDM()
    with pytest.raises(ValueError, match="nfe must be an int >= 1, got 0"):
        dmn(s, 0)
    with pytest.raises(ValueError, match="space must be .pixel. or .latent., got .rgb."):
        dmn(s, 4, space="rgb")
    with pytest.raises(ValueError, match=r"order must be an int in 1\.\.3, got 4"):
        dmn(s, 4, order=4)
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule, got str"):
        dmn("edm", 4)



@pytest.mark.parametrize("kw,message", [({"maxiter": 0}, "maxiter must be an int >= 1, got 0"),
                                        ({"maxiter": -5}, "maxiter must be an int >= 1, got -5"),
                                        ({"trunc_num": -1}, "trunc_num must be None or an int >= 0, got -1"),
                                        ({"trunc_num": 2.5}, "trunc_num must be None or an int >= 0, got 2.5")])
def test_dmn_refuses_a_bad_maxiter_or_trunc_num(kw, message):
    """maxiter <= 0 silently returned the logSNR start grid; trunc_num -1 / 2.5 silently acted as 0 / 3."""
    with pytest.raises(ValueError, match=message):
        dmn(EDM(), 5, **kw)

# --------------------------------------------------------------------------------------------- GITS
@pytest.mark.parametrize("coeff", [1.0, 1.15])
def test_gits_dp_is_optimal_by_brute_force(coeff):
    rng = np.random.default_rng(0)
    m, nfe = 9, 4
    cost = np.triu(rng.random((m + 1, m + 1)) + 0.1, 1)
    cost[np.tril_indices(m + 1)] = np.inf
    path = gits_dp(cost, nfe, coeff)
    assert len(path) == nfe + 1 and path[0] == 0 and path[-1] == m
    assert all(a < b for a, b in zip(path[:-1], path[1:]))
    best = min(path_cost(cost, [0, *mid, m], coeff) for mid in itertools.combinations(range(1, m), nfe - 1))
    assert path_cost(cost, path, coeff) == pytest.approx(best, rel=1e-12)


def test_gits_dp_errors():
    cost = np.zeros((5, 5))
    with pytest.raises(ValueError, match=r"nfe \(the fine grid has 4 intervals\) must be an int in 1\.\.4, got 5"):
        gits_dp(cost, 5)          # more jumps than fine intervals
    with pytest.raises(ValueError, match=r"cost must be a square matrix, got shape \(4, 5\)"):
        gits_dp(np.zeros((4, 5)), 2)



@pytest.mark.parametrize("kw,name", [({"n_samples": -1}, "n_samples"), ({"n_samples": 2.5}, "n_samples"),
                                     ({"n_samples": 0}, "n_samples"), ({"fine_steps": 10.5}, "fine_steps"),
                                     ({"fine_steps": "60"}, "fine_steps")])
def test_gits_names_a_bad_sample_count_or_fine_grid_size(kw, name):
    """These failed inside torch.randn (RuntimeError / TypeError), as an empty x_T, as "nfe must be an int"
    from the fine grid, or as a str-int comparison."""
    s = EDM(0.002, 80.0)
    model = smooth_mixture(dim=2).model(s)
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
        gits(model, nfe=3, sample_shape=(2,), **{"fine_steps": 10, **kw})

def test_gits_on_mixture_beats_logsnr_subset(gmm_setup):
    s, model, _, _ = gmm_setup
    nfe, fine = 4, 20
    res = gits(model, nfe=nfe, sample_shape=(1, 8, 8), n_samples=16, fine_steps=fine, spacing="logsnr",
               coeff=1.0, seed=1, teacher_substeps=2, return_info=True)
    _valid_grid(res.timesteps, s, nfe)
    assert len(res.path) == nfe + 1
    # the logSNR grid with nfe steps is the subset 0, 5, 10, ... of a logSNR fine grid with 20 steps
    logsnr_path = list(range(0, fine + 1, fine // nfe))
    assert torch.allclose(res.grid[logsnr_path], discretizations.logsnr_uniform(s, nfe), rtol=1e-12)
    assert res.total_cost <= path_cost(res.cost, logsnr_path) + 1e-12
    # the timesteps are grid points (endpoints exact)
    assert torch.allclose(res.timesteps, res.grid[res.path], rtol=1e-12)


def test_gits_cost_uses_one_call_per_start_point():
    s = EDM()
    gm = testbeds.ring2d()
    calls = {"n": 0}
    base = gm.model(s)

    def counted(x, t):
        calls["n"] += 1
        return base.fn(x, t)

    from ld3_ext import wrap_model
    model = wrap_model(counted, s, prediction="x0", time_input="t")
    gits(model, nfe=3, sample_shape=(2,), n_samples=8, fine_steps=10, teacher_substeps=1,
         teacher_solver=Euler(), solver=Euler())
    assert calls["n"] == 10 + 10  # teacher: one Euler call per fine interval; cost: one per start point


def test_gits_presets_convert():
    s = EDM(0.002, 80.0)
    for nfe, sig in GITS_PRESETS["cifar10"].items():
        t = gits_preset("cifar10", s, nfe)
        _valid_grid(t, s, nfe)
        assert torch.allclose(t, torch.tensor(sig, dtype=torch.float64))
    sd = VPDiscrete.linear()
    # [GAS] App. D.1 gives the SD GITS NFE-5 list in t units
    want = torch.tensor([1, 0.7669, 0.4839, 0.2341, 0.0676, 0.001], dtype=torch.float64)
    assert torch.allclose(gits_preset("sd", sd, 5), want, atol=1e-4)
    with pytest.raises(ValueError, match="another schedule"):
        gits_preset("sd", s, 5)
    with pytest.raises(ValueError, match="GITS preset .cifar10. has NFE .*, not 3"):
        gits_preset("cifar10", s, 3)
    with pytest.raises(ValueError, match="GITS presets exist for .*, got .imagenet."):
        gits_preset("imagenet", s, 5)


# ---------------------------------------------------------------------------------------------- AYS
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_ays_published_at_nfe10(which):
    sd = VPDiscrete.linear()
    t = ays(sd, 10, model=which)
    _valid_grid(t, sd, 10)
    assert ays_sigmas(which, 10) == AYS_SIGMAS[which]
    sig = sd.edm_sigma(t)
    assert torch.allclose(sig[1:-1], torch.tensor(AYS_SIGMAS[which][1:-1], dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize("nfe", [1, 4, 5, 7, 20, 30])
def test_ays_interpolation_monotone(nfe):
    sd = VPDiscrete.linear()
    for which in ("sd15", "sdxl"):
        t = ays(sd, nfe, model=which)
        _valid_grid(t, sd, nfe)
        sig = np.array(ays_sigmas(which, nfe))
        assert sig[0] == AYS_SIGMAS[which][0] and sig[-1] == AYS_SIGMAS[which][-1]
        # log sigma is piecewise linear in the normalised index, so at nfe = 5 every other value is kept
    assert ays_sigmas("sdxl", 5) == pytest.approx(AYS_SIGMAS["sdxl"][::2], rel=1e-12)


@pytest.mark.parametrize("nfe", [3, 7, 20])
def test_ays_interpolates_log_sigma_linearly(nfe):
    """Off the knots (nfe = 5 and 10 land on them, where any interpolation agrees): the AYS paper's
    loglinear_interp, written out -- output j sits at u = j/nfe of the 10 published intervals."""
    for which in ("sd15", "sdxl"):
        knots = AYS_SIGMAS[which]
        want = []
        for j in range(nfe + 1):
            pos = j / nfe * (len(knots) - 1)
            k = min(int(pos), len(knots) - 2)
            frac = pos - k
            want.append(math.exp((1 - frac) * math.log(knots[k]) + frac * math.log(knots[k + 1])))
        assert ays_sigmas(which, nfe) == pytest.approx(want, rel=1e-12)


def test_ays_other_schedule_maps_range():
    s = EDM(0.002, 80.0)
    t = ays(s, 6)
    _valid_grid(t, s, 6)
    # fit_range=False keeps the published interior values when they fit inside the range ...
    t_raw = ays(s, 10, fit_range=False)
    assert torch.allclose(t_raw[1:-1], torch.tensor(AYS_SIGMAS["sd15"][1:-1], dtype=torch.float64))
    # ... and refuses when they do not
    with pytest.raises(ValueError, match="leave the schedule"):
        ays(EDM(0.5, 5.0), 6, fit_range=False)
    _valid_grid(ays(EDM(0.5, 5.0), 6), EDM(0.5, 5.0), 6)
    with pytest.raises(ValueError, match="AYS lists exist for .*, got .sd3."):
        ays(s, 6, model="sd3")
    # the mapping itself, value by value: u is the published list's log sigma normalised to [0, 1] over the
    # list's own ends, and the mapped log sigma is log smin + u * (log smax - log smin)
    for sched, nfe, model, fit in [(s, 6, "sd15", "auto"), (s, 10, "sd15", True), (s, 7, "sdxl", True),
                                   (EDM(0.5, 5.0), 6, "sd15", "auto"), (EDM(0.5, 5.0), 13, "sdxl", True)]:
        t = ays(sched, nfe, model=model, fit_range=fit)
        _valid_grid(t, sched, nfe)
        p0, p1 = AYS_SIGMAS[model][0], AYS_SIGMAS[model][-1]
        u = (np.log(np.asarray(ays_sigmas(model, nfe))) - math.log(p1)) / (math.log(p0) - math.log(p1))
        lo, hi = math.log(sched.sigma_min), math.log(sched.sigma_max)
        expected = lo + u * (hi - lo)
        got = np.log(sched.edm_sigma(t).numpy())
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        # and the interior really moved off the published values (the schedule does not match SD's range)
        assert np.abs(got[1:-1] - np.log(ays_sigmas(model, nfe))[1:-1]).min() > 1e-3



def test_ays_fit_range_takes_only_auto_or_a_real_bool():
    """fit_range=1 equals True but is not it: it passed the old membership check and then kept the
    unmapped SD sigmas on EDM, as if False had been asked for."""
    s = EDM(0.002, 80.0)
    mapped = ays(s, 10, fit_range=True)
    assert torch.equal(ays(s, 10, fit_range=np.True_), mapped)
    assert not torch.allclose(mapped[1:-1], torch.tensor(AYS_SIGMAS["sd15"][1:-1], dtype=torch.float64), rtol=0.1)
    for bad in (1, 1.0, "yes", None):
        with pytest.raises(ValueError, match="fit_range must be 'auto', True or False"):
            ays(s, 10, fit_range=bad)



@pytest.mark.parametrize("call,message", [
    (lambda: loglinear_interp([3.0, 2.0, 1.0], 4.0), "n_points must be an int >= 2, got 4.0"),
    (lambda: loglinear_interp([3.0, 2.0, 1.0], "4"), "n_points must be an int >= 2, got '4'"),
    (lambda: ays_sigmas(["sd15"], 4), r"AYS lists exist for .*, got \['sd15'\]"),
    (lambda: gits_preset(["cifar10"], EDM(), 4), r"GITS presets exist for .*, got \['cifar10'\]"),
    (lambda: baseline_timesteps(["dmn"], EDM(), 4), r"unknown baseline \['dmn'\]")])
def test_baseline_names_and_point_counts_of_the_wrong_type_are_named(call, message):
    """These failed inside np.linspace, a str/int comparison or a dict lookup ("unhashable type: 'list'")."""
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------------- registry
def test_registry(gmm_setup):
    s, model, _, _ = gmm_setup
    _valid_grid(baseline_timesteps("dmn", s, 4), s, 4)
    _valid_grid(baseline_timesteps("gits_ffhq", s, 6), s, 6)
    _valid_grid(baseline_timesteps("ays_sd15", VPDiscrete.linear(), 8), VPDiscrete.linear(), 8)
    _valid_grid(baseline_timesteps("gits", s, 3, model=model, sample_shape=(1, 8, 8), n_samples=4,
                                   fine_steps=8, teacher_substeps=1), s, 3)
    with pytest.raises(ValueError, match="needs the model"):
        baseline_timesteps("gits", s, 4)
    with pytest.raises(ValueError, match="model-free"):
        baseline_timesteps("dmn", s, 4, model=model)
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_timesteps("ld3", s, 4)
    with pytest.raises(TypeError, match="gits needs the model"):
        gits(lambda x, t: x, EDM(), 3)


def test_gits_refuses_a_two_evaluation_solver(gmm_setup):
    """GITS replays the prediction at each start point: Heun's second evaluation would get it back and the
    costs would be Euler's (measured: 0.095 against a real Heun step's 2.99)."""
    from ld3_ext import Heun
    from ld3_ext.baselines.gits import gits_cost_matrix
    s, model, x_T, _ = gmm_setup
    grid = discretizations.logsnr_uniform(s, 4)
    with pytest.raises(ValueError, match="solver: GITS scores one-evaluation steps; Heun makes 2"):
        gits_cost_matrix(model, grid, [x_T] * 5, solver=Heun())


def _dmn_objective_mpmath(lams, order, trunc_num):
    """The DMN bound as LD3's StepOptim states it, from mpmath quadrature (independent of the Gauss-Legendre
    weights): a first-order step's |w J| on its own, the first trunc_num steps as a norm, the rest signed per node."""
    import mpmath
    n = len(lams) - 1
    lam = [mpmath.mpf(float(v)) for v in lams]
    w = [mpmath.exp(-v) for v in lam]  # the pixel weight sigma/alpha = e^-lambda
    total, acc = mpmath.mpf(0), [mpmath.mpf(0)] * (n + 1)
    for s in range(n):
        k = max(1, min(order, s + 1, n - s))
        idx = list(range(s - k + 1, s + 1))
        terms = []
        for j in idx:
            def basis(x, j=j):
                out = mpmath.mpf(1)
                for m in idx:
                    if m != j:
                        out *= (x - lam[m]) / (lam[j] - lam[m])
                return out
            terms.append(w[j] * mpmath.quad(lambda x: mpmath.exp(x) * basis(x), [lam[s], lam[s + 1]]))
        if k == 1 or s < trunc_num:
            total += mpmath.sqrt(sum(t ** 2 for t in terms))
        else:
            for j, t in zip(idx, terms):
                acc[j] += t
    return float(total + sum(abs(a) for a in acc))


@pytest.mark.parametrize("n", [4, 7, 8, 10])
def test_dmn_objective_matches_the_stepoptim_bound(n):
    """For N >= 8 (trunc_num 0) the first step's term used to join the signed node sums and cancel there
    (objectives off by up to a third)."""
    import numpy as np
    from ld3_ext.baselines import dmn_objective
    s = EDM()
    rng = np.random.default_rng(n)
    for _ in range(3):
        lams = np.concatenate([[s.lambda_min], np.sort(rng.uniform(s.lambda_min, s.lambda_max, n - 1)), [s.lambda_max]])
        trunc = 3 if n <= 7 else 0
        want = _dmn_objective_mpmath(lams, 3, trunc)
        got = dmn_objective(lams, order=3, space="pixel", trunc_num=trunc)
        assert abs(got - want) <= 1e-9 * want, (got, want)


def _dmn_objective_closed_form(lams, order, space, trunc_num):
    """The DMN bound in torch float64 from its definition (module docstring of baselines.dmn), with the step
    integrals in closed form: J = e^lam_s sum_p c_p int_0^h u^p e^u du for the Lagrange basis expanded in
    u = lam - lam_s (independent of the library's Gauss-Legendre weights); differentiable by autograd."""
    lam = lams
    n = lam.numel() - 1
    alpha, sigma = torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()  # variance preserving
    w = sigma / alpha if space == "pixel" else sigma ** 2 / alpha
    alone = lam.new_zeros(())
    signed = [lam.new_zeros(()) for _ in range(n + 1)]
    for s in range(n):
        k = max(1, min(order, s + 1, n - s))
        nodes = list(range(s - k + 1, s + 1))
        h = lam[s + 1] - lam[s]
        m0 = torch.exp(h) - 1
        m1 = h * torch.exp(h) - m0
        m2 = h * h * torch.exp(h) - 2 * m1
        terms = []
        for j in nodes:
            poly = [lam.new_ones(())]  # coefficients of l_j in powers of u, lowest first
            for m in nodes:
                if m != j:
                    d, den = lam[m] - lam[s], lam[j] - lam[m]
                    poly = [(poly[p - 1] if p > 0 else 0) / den - (poly[p] * d / den if p < len(poly) else 0)
                            for p in range(len(poly) + 1)]
            terms.append(w[j] * torch.exp(lam[s]) * sum(c * mom for c, mom in zip(poly, (m0, m1, m2))))
        if k == 1 or s < trunc_num:
            alone = alone + torch.sqrt(sum(t * t for t in terms))
        else:
            for j, t in zip(nodes, terms):
                signed[j] = signed[j] + t
    return alone + sum(v.abs() for v in signed)


@pytest.mark.parametrize("space", ["pixel", "latent"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dmn_objective_and_its_gradient_match_the_closed_form(space, order):
    """Values to round-off; the central differences of dmn_objective (what trust-constr follows) against the
    oracle's autograd gradient (measured <= 1e-8 relative)."""
    s = EDM()
    rng = np.random.default_rng(10 * order + (space == "latent"))
    for n in (2, 3, 5, 9):
        for trunc in (0, 3):
            lams = np.concatenate([[s.lambda_min], np.sort(rng.uniform(s.lambda_min, s.lambda_max, n - 1)),
                                   [s.lambda_max]])
            x = torch.tensor(lams, requires_grad=True)
            want = _dmn_objective_closed_form(x, order, space, trunc)
            (grad,) = torch.autograd.grad(want, x)
            got = dmn_objective(lams, order=order, space=space, trunc_num=trunc)
            assert got == pytest.approx(want.item(), rel=1e-12, abs=0), (n, trunc)
            step = 1e-6
            fd = np.array([(dmn_objective(lams + step * e, order, space, trunc)
                            - dmn_objective(lams - step * e, order, space, trunc)) / (2 * step)
                           for e in np.eye(n + 1)[1:-1]])
            assert np.abs(fd - grad[1:-1].numpy()).max() <= 1e-6 * np.abs(grad[1:-1].numpy()).max(), (n, trunc)


@pytest.mark.parametrize("space", ["pixel", "latent"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("nfe", [3, 5])
def test_dmn_grid_is_a_local_minimum_of_the_closed_form(space, order, nfe):
    """Below NFE 8 (trunc_num 3) the bound is smooth at the optimum: no coordinate or random move of 1e-2 or
    1e-3 lowers the oracle (measured: none lowers it at all) and its gradient vanishes (measured ~2e-6)."""
    s = EDM()
    lam = dmn_lambdas(s.lambda_min, s.lambda_max, nfe, order=order, space=space)
    x = torch.tensor(lam, requires_grad=True)
    best = _dmn_objective_closed_form(x, order, space, 3)
    (grad,) = torch.autograd.grad(best, x)
    best = best.item()
    assert float(grad[1:-1].abs().max()) < 1e-4 * best
    rng = np.random.default_rng(nfe)
    moves = [*np.eye(nfe + 1)[1:-1], *-np.eye(nfe + 1)[1:-1]]
    moves += [np.concatenate([[0.0], v / np.linalg.norm(v), [0.0]]) for v in rng.standard_normal((10, nfe - 1))]
    for size in (1e-2, 1e-3):
        for move in moves:
            moved = _dmn_objective_closed_form(torch.tensor(lam + size * move), order, space, 3)
            assert float(moved) >= best * (1 - 1e-12), (size, move)


def _chord_distance(x, start, end):
    """Per sample, the distance of x from the line through start and end, by Pythagoras in numpy (the library
    projects out the chord's direction instead)."""
    x, b, c = (np.asarray(v.flatten(1), dtype=np.float64) for v in (x, start, end))
    out = []
    for xs, bs, cs in zip(x, b, c):
        a, d = cs - xs, cs - bs
        along = a @ d / np.linalg.norm(d)
        out.append(math.sqrt(max(a @ a - along * along, 0.0)))
    return np.array(out)


def _gits_brute_force(gm, schedule, grid, states, nfe, coeff, max_jump=None, metric="l2"):
    """GITS' search from its definition, over every sub-grid 0 = p_0 < p_1 < ... < p_nfe = M of the fine grid:
    jump i -> j is one DDIM step (first-order data prediction, the mixture's exact posterior mean) from the
    teacher state at g_i, scored ("l2") by the per-sample RMSE to the teacher state at g_j averaged over the batch,
    or ("dev", GITS' default) by the batch mean of its distance from the chord states[0] -> states[-1] less the
    teacher state's; jump k of a path weighs coeff^k.  Returns (the least total, its path, the jump costs)."""
    m = grid.numel() - 1
    alpha, sigma = schedule.alpha(grid), schedule.sigma(grid)
    jumps = {}
    for i in range(m):
        d = gm.denoise(states[i], alpha[i], sigma[i])
        for j in range(i + 1, m + 1):
            x = sigma[j] / sigma[i] * states[i] + (alpha[j] - alpha[i] * sigma[j] / sigma[i]) * d
            if metric == "dev":
                jumps[i, j] = float(_chord_distance(x, states[0], states[-1]).mean()
                                    - _chord_distance(states[j], states[0], states[-1]).mean())
            else:
                jumps[i, j] = float((x - states[j]).flatten(1).pow(2).mean(1).sqrt().mean())
    best, best_path = math.inf, None
    for mid in itertools.combinations(range(1, m), nfe - 1):
        path = [0, *mid, m]
        if max_jump is not None and any(b - a > max_jump for a, b in zip(path[:-1], path[1:])):
            continue
        total = sum(coeff ** k * jumps[a, b] for k, (a, b) in enumerate(zip(path[:-1], path[1:])))
        if total < best:
            best, best_path = total, path
    return best, best_path, jumps


@pytest.fixture(scope="module", params=["edm", "vp_linear"])
def accurate_fine_trajectories(request):
    """A 3-d mixture, 6 noises, a 9-point EDM fine grid and the accurate ODE states on it (DOP853)."""
    schedule = {"edm": EDM(0.002, 80.0), "vp_linear": VPLinear()}[request.param]
    gm = smooth_mixture(dim=3, n_modes=3, std=0.4, seed=5)
    grid = discretizations.edm(schedule, 8)
    states = [gm.prior_noise(schedule, 6, generator=torch.Generator().manual_seed(2))]
    for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()):
        states.append(gm.reference_solution(schedule, states[-1], t_start=a, t_end=b, rtol=1e-8, atol=1e-8))
    return gm, schedule, grid, states


@pytest.mark.parametrize("metric", ["dev", "l2"])
@pytest.mark.parametrize("max_jump", [None, 4])
def test_gits_cost_and_search_match_brute_force_over_every_sub_grid(accurate_fine_trajectories, max_jump, metric):
    """The library's cost matrix and DP on given teacher states against every sub-grid costed from the
    definition: the same path and the same cost to round-off, for 2-4 jumps and coeff 1 and 1.15."""
    gm, schedule, grid, states = accurate_fine_trajectories
    kw = {} if metric == "dev" else {"metric": metric}  # "dev" is the default
    cost = gits_cost_matrix(gm.model(schedule), grid, states, solver=Euler(), max_jump=max_jump, **kw)
    # round-off: a jump from x ~ 80 landing ~1e-3 from the teacher state keeps ~12 digits of its cost; the chord
    # distances differ by a few hundred ulps of the states between the two formulas
    tol = dict(rel=1e-9, abs=0) if metric == "l2" else dict(rel=1e-9, abs=1e-10)
    for nfe in (2, 3, 4):
        for coeff in (1.0, 1.15):
            path = gits_dp(cost, nfe, coeff)
            best, best_path, jumps = _gits_brute_force(gm, schedule, grid, states, nfe, coeff, max_jump, metric)
            assert path == best_path, (nfe, coeff)
            assert path_cost(cost, path, coeff) == pytest.approx(best, **tol), (nfe, coeff)
    for (i, j), c in jumps.items():
        want = c if max_jump is None or j - i <= max_jump else math.inf
        assert cost[i, j] == pytest.approx(want, **tol), (i, j)
    assert np.isinf(cost[np.tril_indices(9)]).all()


@pytest.mark.parametrize("metric", ["dev", "l2"])
def test_gits_search_matches_brute_force_on_its_own_teacher(metric):
    """gits() end to end (fine grid, teacher trajectories, cost, DP, timesteps) against the brute force on the
    states of its teacher."""
    s = EDM(0.002, 80.0)
    gm = smooth_mixture(dim=3, n_modes=3, std=0.4, seed=5)
    model = gm.model(s)
    x_T = gm.prior_noise(s, 6, generator=torch.Generator().manual_seed(2))
    res = gits(model, nfe=3, x_T=x_T, fine_steps=8, spacing="logsnr", coeff=1.15, teacher_substeps=2,
               return_info=True, metric=metric)
    assert torch.equal(res.grid, discretizations.logsnr_uniform(s, 8))
    states = teacher_states(model, x_T, res.grid, substeps=2)
    best, best_path, _ = _gits_brute_force(gm, s, res.grid, states, 3, 1.15, metric=metric)
    assert res.path == best_path
    assert res.total_cost == pytest.approx(best, rel=1e-9, abs=1e-10 if metric == "dev" else 0)
    assert torch.equal(res.timesteps[1:-1], res.grid[best_path[1:-1]])


def test_gits_metric_is_checked_and_the_chord_distance_is_exact():
    """line_deviation on hand-made points: the distance from the line through start and end (3-4-5 triangles),
    0 on the line, the distance to the point when start == end; an unknown metric is named."""
    from ld3_ext.baselines.gits import line_deviation
    start = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    end = torch.tensor([[4.0, 0.0], [3.0, 4.0], [5.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    pts = torch.tensor([[1.0, 3.0], [3.0, 4.0], [-7.0, 1.0], [5.0, 6.0]], dtype=torch.float64)
    assert torch.equal(line_deviation(pts, start, end), torch.tensor([3.0, 0.0, 0.0, 5.0], dtype=torch.float64))
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)  # invariant under a rotation
    torch.testing.assert_close(line_deviation(pts @ rot, start @ rot, end @ rot), line_deviation(pts, start, end),
                               rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"line_deviation: end must have the shape of points \[B, \.\.\.\] \(\(4, 2\)\)"):
        line_deviation(pts, start, end[:2])
    with pytest.raises(ValueError, match=r"points must have the shape of points"):
        line_deviation(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"line_deviation: start must be a real floating tensor \[B, \.\.\.\], got list"):
        line_deviation(pts, [0.0, 0.0], end)
    with pytest.raises(TypeError, match=r"points must be a real floating tensor .* got a torch.int64 tensor"):
        line_deviation(pts.long(), start, end)
    with pytest.raises(ValueError, match=r"metric must be one of \('dev', 'l2'\).*got 'l1'"):
        gits(testbeds.ring2d().model(EDM()), nfe=3, sample_shape=(2,), metric="l1")


def test_gits_refuses_an_impossible_jump_limit_or_substep_count_before_the_teacher():
    """Both were found only after the teacher trajectories (the costly part): max_jump too small for nfe jumps
    to cover the fine grid failed in the search, a teacher_substeps of 0 or 2.5 inside torch.linspace."""
    s = EDM()
    calls = []
    base = testbeds.ring2d().model(s)

    def counted(x, t):
        calls.append(1)
        return base.fn(x, t)

    from ld3_ext import wrap_model
    model = wrap_model(counted, s, prediction="x0", time_input="t")
    kw = dict(sample_shape=(2,), n_samples=4, fine_steps=10)
    with pytest.raises(ValueError, match=r"nfe=3 jumps of at most max_jump=3 .* need nfe \* max_jump >= fine_steps"):
        gits(model, nfe=3, max_jump=3, **kw)
    for bad in (0, 2.5, "2"):
        with pytest.raises(ValueError, match="teacher_substeps must be an int >= 1"):
            gits(model, nfe=3, teacher_substeps=bad, **kw)
    assert calls == []
    assert gits(model, nfe=3, max_jump=4, teacher_substeps=1, **kw).shape == (4,)  # the bound itself is fine


def test_gits_preset_checks_tol_and_the_order_of_what_it_returns():
    s = EDM(0.002, 80.0)
    for bad in (-0.1, float("nan"), "0.02"):
        with pytest.raises((ValueError, TypeError), match="tol must be"):
            gits_preset("cifar10", s, 10, tol=bad)
    # a generous tol lets a list made for sigma_max 80 through on sigma_max 13: its second value (13.93) lies
    # past the snapped first one -- returned as a non-monotone grid before
    with pytest.raises(ValueError, match="not strictly decreasing on this schedule"):
        gits_preset("cifar10", EDM(0.002, 13.0), 10, tol=2.0)


def test_ays_with_one_interval_and_no_range_fit():
    """nfe=1 has no inner sigma to range-check: it failed on numpy's max of an empty array."""
    s = EDM(0.01, 20.0)
    t = ays(s, 1, fit_range=False)
    assert torch.equal(t, torch.tensor([s.t_max, s.t_min], dtype=torch.float64))
    with pytest.raises(ValueError, match="leave the schedule's range"):
        ays(EDM(0.01, 5.0), 10, fit_range=False)


def test_line_deviation_takes_scalar_samples():
    """[B] inputs (one scalar per sample, the [B, ...] of the docstring with no trailing dims) raised an IndexError
    from flatten(1) naming no argument (review); in 1-D every point lies on the chord, unless start == end."""
    from ld3_ext.baselines import line_deviation
    p, s, e = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 3.0])
    torch.testing.assert_close(line_deviation(p, s, e), torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(line_deviation(p, e, e), torch.tensor([0.0, 1.0, 0.0]))
    # no samples at all: no deviations (an empty [0] failed in flatten(1) too)
    assert line_deviation(torch.zeros(0), torch.zeros(0), torch.zeros(0)).shape == (0,)


def _label_model(dim=4):
    """x0 = x / (1 + sigma^2) + emb(y): a conditional network that broadcasts one label over the batch."""
    import ld3_ext
    emb = torch.nn.Embedding(3, dim).double()
    emb.requires_grad_(False)

    def net(x, sigma, y=None):
        return x / (1 + sigma.reshape(-1, 1) ** 2) + emb(y).to(x.dtype)
    return ld3_ext.wrap_model(net, EDM(), prediction="x0", time_input="sigma", cond_key="y")


def test_gits_model_kwargs_checks_and_one_broadcast_condition():
    """gits(model_kwargs=): one condition [1] is broadcast to every teacher sample (as the network does), a
    mapping with non-string keys or a list of names is a TypeError naming model_kwargs, and conditions the network
    cannot take are named with the sample shape."""
    from ld3_ext.baselines import gits
    model = _label_model()
    x_T = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(nfe=4, x_T=x_T, fine_steps=12)
    one = gits(model, model_kwargs={"y": torch.tensor([1])}, **kw)
    assert torch.equal(one, gits(model, model_kwargs={"y": torch.ones(8, dtype=torch.long)}, **kw))
    for bad in ({1: torch.zeros(8, dtype=torch.long)}, ["y"]):
        with pytest.raises(TypeError, match="model_kwargs must be a dict"):
            gits(model, model_kwargs=bad, **kw)
    with pytest.raises(ValueError, match=r"or model_kwargs \['y'\] do not fit the network"):
        gits(model, model_kwargs={"y": torch.full((8,), 7, dtype=torch.long)}, **kw)  # no embedding row 7


def test_gits_cost_matrix_and_teacher_states_pass_model_kwargs():
    """The public building blocks take model_kwargs too (every network call gets them)."""
    model = _label_model()
    x_T = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = discretizations.get_discretization("edm", model.schedule, 5)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    states = teacher_states(model, x_T, grid, model_kwargs={"y": y})
    other = teacher_states(model, x_T, grid, model_kwargs={"y": (y + 1) % 3})
    assert not torch.equal(states[-1], other[-1])
    cost = gits_cost_matrix(model, grid, states, model_kwargs={"y": y})
    assert cost.shape == (6, 6) and np.isfinite(cost[0, 1:]).all()
    assert not np.array_equal(cost, gits_cost_matrix(model, grid, states, model_kwargs={"y": (y + 1) % 3}))


def test_gits_calls_a_network_with_trainable_weights_without_grad():
    """gits() scores its cost matrix without autograd, as gits_cost_matrix does: a network whose weights require
    grad (any nn.Module a --model factory returns) built a graph per call and `ld3 eval` warned "Converting a
    tensor with requires_grad=True to a scalar"."""
    import warnings
    from ld3_ext import wrap_model
    s = EDM()
    base = testbeds.ring2d().model(s)
    grad_modes = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))  # requires grad

        def forward(self, x, t):
            grad_modes.append(torch.is_grad_enabled())
            return base.fn(x, t) * self.scale

    model = wrap_model(Net(), s, prediction="x0", time_input="t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = gits(model, nfe=3, sample_shape=(2,), n_samples=8, fine_steps=10, teacher_substeps=1,
                 teacher_solver=Euler(), solver=Euler())
    assert t.shape == (4,) and not t.requires_grad
    assert grad_modes and not any(grad_modes)
