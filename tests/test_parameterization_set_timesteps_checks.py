"""TimeParameterization.set_timesteps names a grid that is not one, as init_timesteps (init=) and LearnedSchedule do
since the API audit: None failed inside torch.as_tensor ("must be real number, not NoneType", naming no argument),
and a [1, N+1] or [2, k] table was flattened silently."""
import pytest
import torch

from ld3_ext import EDM
from ld3_ext.training import TimeParameterization, init_timesteps


@pytest.mark.parametrize("bad", [None, {"t": 1.0}, "edm"])
def test_a_value_that_is_no_grid_is_named(bad):
    p = TimeParameterization(EDM(), 5)
    with pytest.raises(TypeError, match="timesteps must be a grid of times"):
        p.set_timesteps(bad)


@pytest.mark.parametrize("shape", [(1, 6), (2, 3)])
def test_a_grid_that_is_not_1d_is_refused(shape):
    s = EDM()
    p = TimeParameterization(s, 5)
    t = init_timesteps(s, 5, "logsnr")
    with pytest.raises(ValueError, match=r"timesteps must be 1-D \(a grid of times\), got shape"):
        p.set_timesteps(t.reshape(shape))
    p.set_timesteps(t)  # the 1-D grid itself is taken
    torch.testing.assert_close(p()[0], t, rtol=1e-9, atol=1e-9)  # forward() -> (timesteps, model timesteps)
