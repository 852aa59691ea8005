"""load_or_generate_teacher / generate_teacher_data solve in the dtype LD3Trainer defaults to (the weights' dtype;
float64 for the test beds, float32 for other weight-less models), as gits() and the CLI now do.  Their float32
default failed inside a float16/bfloat16/float64 network ("mat1 and mat2 must have the same dtype"), and made a test
bed's cache that LD3Trainer with the same model refused (settings.dtype float32 vs float64)."""
import pytest
import torch

import ld3_ext
from ld3_ext import testbeds
from ld3_ext.training import LD3Trainer, generate_teacher_data, make_teacher
from ld3_ext.solvers import DPMSolverPP
from ld3_ext.training.teacher import TeacherConfig, load_or_generate_teacher


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t):
        return self.lin(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_network_gets_states_in_its_weights_dtype(dtype):
    torch.manual_seed(0)
    s = ld3_ext.VPLinear()
    model = ld3_ext.wrap_model(_Net().to(dtype), s, prediction="eps", time_input="t", name="lin")
    model.sample_shape = (4,)
    data = load_or_generate_teacher(model, config=TeacherConfig(n_train=3, n_valid=2, nfe=6), progress=False)
    assert data.train_target.dtype == dtype and data.valid_target.dtype == dtype
    fn, settings = make_teacher(model, "solver", DPMSolverPP(2), 6, "logsnr", None)
    out = generate_teacher_data(model, fn, settings, 3, (4,), progress=False)
    assert out["target"].dtype == dtype


def test_a_test_beds_cache_is_the_one_the_trainer_reuses(tmp_path):
    s = ld3_ext.EDM()
    model = testbeds.ring2d().model(s)
    made = load_or_generate_teacher(model, config=TeacherConfig(n_train=6, n_valid=4, nfe=10), cache_dir=str(tmp_path),
                                    progress=False)
    assert made.train_target.dtype == torch.float64
    tr = LD3Trainer(model, s, "dpmpp", nfe=4, n_train=6, n_valid=4, teacher_nfe=10, teacher_cache=str(tmp_path),
                    init="logsnr", time_mode="lambda", rounds_v1=1, rounds_v2=0, progress=False)
    tr.fit()  # raised TeacherCacheMismatch: "settings.dtype: cache has 'float32', requested 'float64'"
    assert tr.dtype == torch.float64


@pytest.mark.parametrize("device", [3, "gpu0", "meta"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_device_the_teacher_cannot_use_is_named_before_any_work(device, tmp_path):
    """As LD3Trainer(device=...): torch's bare RuntimeError ("Cannot access accelerator device when none is
    available", "Invalid device string") or AssertionError named no argument, raised in the first chunk after the
    cache folder had been made."""
    s = ld3_ext.EDM()
    model = testbeds.ring2d().model(s)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"load_or_generate_teacher: device="):
        load_or_generate_teacher(model, config=TeacherConfig(n_train=2, n_valid=2, nfe=6), device=device,
                                 cache_dir=str(cache), progress=False)
    assert not cache.exists()
    fn, settings = make_teacher(model, "solver", DPMSolverPP(2), 6, "logsnr", None)
    with pytest.raises(ValueError, match=r"generate_teacher_data: device="):
        generate_teacher_data(model, fn, settings, 2, (2,), device=device, progress=False)
