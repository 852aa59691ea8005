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
