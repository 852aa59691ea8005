"""Arguments that used to be truncated, silently replaced or passed to torch unchecked are now named."""
import pytest
import torch

from ld3_ext import testbeds
from ld3_ext.baselines import dmn, gits, gits_cost_matrix
from ld3_ext.schedules import EDM


@pytest.fixture(scope="module")
def tiny():
    gm = testbeds.ring2d()
    schedule = EDM()
    return gm, schedule, gm.model(schedule)


@pytest.mark.parametrize("bad, exc", [(2.7, TypeError), ("3", TypeError), (True, TypeError), (0, ValueError)])
def test_gits_names_a_max_jump_that_is_not_a_positive_int(tiny, bad, exc):
    # 2.7 used to be truncated to 2: a smaller search graph than asked for, without a word
    _, schedule, model = tiny
    with pytest.raises(exc, match="max_jump"):
        gits(model, nfe=3, n_samples=4, fine_steps=6, sample_shape=(2,), max_jump=bad)


def test_gits_cost_matrix_names_a_fractional_max_jump(tiny):
    _, schedule, model = tiny
    grid = torch.linspace(schedule.t_max, schedule.t_min, 5, dtype=torch.float64)
    states = [torch.zeros(2, 2, dtype=torch.float64) for _ in range(5)]
    with pytest.raises(TypeError, match="max_jump"):
        gits_cost_matrix(model, grid, states, max_jump=2.7)


def test_gits_whole_max_jump_still_limits_the_jumps(tiny):
    _, schedule, model = tiny
    res = gits(model, nfe=3, n_samples=4, fine_steps=6, sample_shape=(2,), max_jump=2, return_info=True)
    path = list(res.path)
    assert max(b - a for a, b in zip(path[:-1], path[1:])) <= 2


@pytest.mark.parametrize("bad", [1.5, -1, 2**63])
def test_gits_names_a_bad_seed(tiny, bad):
    _, schedule, model = tiny
    with pytest.raises(ValueError, match="seed"):
        gits(model, nfe=3, n_samples=4, fine_steps=6, sample_shape=(2,), seed=bad)


@pytest.mark.parametrize("bad", ["", "LogSNR", "uniform"])
def test_dmn_names_an_init_it_does_not_know(bad):
    # "" used to fall back to the default init silently
    with pytest.raises(ValueError, match="init"):
        dmn(EDM(), nfe=4, init=bad)


def test_dmn_default_init_is_still_the_default():
    a = dmn(EDM(), nfe=4, maxiter=20)
    b = dmn(EDM(), nfe=4, init="logsnr", maxiter=20)
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


@pytest.mark.parametrize("bad", [1.5, -3, "0", True])
def test_random3072_names_a_bad_seed(bad):
    # the same rule as every other seed in the library (ld3_ext._checks.seed)
    with pytest.raises(ValueError, match="seed"):
        testbeds.random3072(seed=bad)


def test_helpers_refuse_grids_they_cannot_score():
    """loglinear_interp took inf as positive (two infs back); dmn_objective scored [] and [0.0] as 0.0, a decreasing
    grid as a number, and failed in a broadcast on 2-D input; dmn_lambdas('a') failed in isfinite; path_cost
    indexed out of range (IndexError) and scored a backwards path (an API review)."""
    import numpy as np
    from ld3_ext.baselines.ays import loglinear_interp
    from ld3_ext.baselines.dmn import dmn_lambdas, dmn_objective
    from ld3_ext.baselines.gits import path_cost
    for bad in ([np.inf, 2.0, 1.0], [3.0, np.nan, 1.0], "a", [[2.0, 1.0]]):
        with pytest.raises(ValueError, match="sigmas must be a 1-D, finite, positive, strictly decreasing list"):
            loglinear_interp(bad, 5)
    for bad in ([], [0.0], [3.0, 2.0, 1.0, 0.0], np.ones((2, 12)), [0.0, np.inf], "ab"):
        with pytest.raises(ValueError, match="lams must be a 1-D grid of at least 2 finite, strictly increasing"):
            dmn_objective(bad)
    with pytest.raises(ValueError, match="trunc_num must be an int >= 0"):
        dmn_objective([0.0, 1.0, 2.0, 3.0], trunc_num=-5)
    with pytest.raises(TypeError, match="lambda_min must be a finite number"):
        dmn_lambdas("a", 5.0, 3)
    for bad in ([0, 5], [0, 2, 1, 3], [0], [0, 1.5]):
        with pytest.raises(ValueError, match="path must"):
            path_cost(np.ones((4, 4)), bad)
    with pytest.raises(ValueError, match=r"cost must be a square"):
        path_cost(np.ones((4, 3)), [0, 1])
    # valid input still scores: the bound of a grid, and a path's weighted sum
    lams = dmn_lambdas(-5.0, 5.0, 4)
    assert dmn_objective(lams) > 0 and np.all(np.diff(lams) > 0)
    assert path_cost(np.arange(16.0).reshape(4, 4), [0, np.int64(1), 3], coeff=2.0) == 1.0 + 2.0 * 7.0
    assert loglinear_interp([10.0, 1.0], 3).tolist() == pytest.approx([10.0, 10 ** 0.5, 1.0])
