"""cli._baseline_grids runs GITS in the states' dtype; without one it falls back on GITS' own default (the weights'
dtype), not on float64: its float64 fallback (and the comment "GITS' own default is float64") predate gits() taking
the weights' dtype, and fed a float32 network float64 states ("the model fails on samples of shape ...")."""
import torch

import ld3_ext
from ld3_ext import cli


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x, t):
        return 0.01 * self.lin(x)


def test_gits_baseline_without_a_dtype_takes_the_weights_dtype():
    torch.manual_seed(0)
    s = ld3_ext.EDM()
    model = ld3_ext.wrap_model(_Net(), s, prediction="eps", name="net")
    model.sample_shape = (2,)
    got = cli._baseline_grids(["gits"], s, 4, model=model)["gits"]
    assert torch.equal(got, cli._baseline_grids(["gits"], s, 4, model=model, dtype=torch.float32)["gits"])
