"""LD3Trainer's default solve precision is what its docstring says: the weights' dtype, float64 for the analytic test
beds, float32 for any other weight-less model (a plain function may wrap a float32 network).  The docstring said
float64 for every weight-less model."""
import re

import torch

import ld3_ext
from ld3_ext.solvers import DPMSolverPP
from ld3_ext.testbeds import GaussianMixture
from ld3_ext.training import LD3Trainer


def _dtype(model, schedule):
    return LD3Trainer(model, schedule, DPMSolverPP(2), 4, sample_shape=(2,), progress=False).dtype


def test_default_dtype_is_the_documented_one():
    s = ld3_ext.VPLinear()
    weightless = ld3_ext.wrap_model(lambda x, t: 0.5 * x, s, prediction="x0", name="weightless")
    half = ld3_ext.wrap_model(torch.nn.Linear(2, 2).half(), s, prediction="x0")
    testbed = GaussianMixture([[0.3, 0.3]], [[0.5, 0.5]]).model(s)
    testbed.testbed = True
    assert (_dtype(weightless, s), _dtype(half, s), _dtype(testbed, s)) == (torch.float32, torch.float16, torch.float64)
    doc = " ".join(LD3Trainer.__doc__.split())
    said = re.search(r"seed, device, dtype : (.*?)\. \w+", doc).group(1)
    assert "float32 for other weight-less models" in said and "float64 for the analytic test beds" in said, said
