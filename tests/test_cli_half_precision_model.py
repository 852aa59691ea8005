"""The CLI solves in the precision of a factory model's weights, as LD3Trainer does by default: it fed every
non-test-bed model float32 states, so a factory returning a float16/bfloat16 (or float64) network failed inside
the network ("mat1 and mat2 must have the same dtype") in every command."""
import sys
import types

import pytest
import torch

import ld3_ext
from ld3_ext import cli

from _cli_run import one_line_errors, run_cli  # noqa: F401  (the fixture: one-line errors)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(12, 12)
        with torch.no_grad():
            self.lin.weight.mul_(0.1)

    def forward(self, x, t):
        return self.lin(x.reshape(x.shape[0], -1)).reshape(x.shape)


def _factory(dtype):
    def make():
        torch.manual_seed(0)
        schedule = ld3_ext.VPLinear()
        model = ld3_ext.wrap_model(_Net().to(dtype), schedule, prediction="eps", time_input="t", name="net")
        model.sample_shape = (3, 2, 2)
        return model, schedule
    return make


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sample_runs_a_factory_model_in_its_weights_dtype(dtype, tmp_path, monkeypatch, capsys):
    mod = types.ModuleType("ld3_half_factory_mod")
    mod.make = _factory(dtype)
    monkeypatch.setitem(sys.modules, "ld3_half_factory_mod", mod)
    args = cli.build_parser().parse_args(["sample", "--model", "ld3_half_factory_mod:make", "--out", str(tmp_path)])
    assert cli._load(args)[2] == dtype
    rc, out, err = run_cli(["sample", "--model", "ld3_half_factory_mod:make", "--nfe", "4", "--n", "6",
                            "--teacher-nfe", "10", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    assert (tmp_path / "o" / "samples.png").is_file()


def test_rmse_of_half_states_is_taken_in_float32():
    # in float16 the square of an error of 1e-4 is 1e-8, below float16's smallest subnormal: an RMSE of 0
    a = torch.zeros(2, 8, dtype=torch.float16)
    b = torch.full((2, 8), 1e-4, dtype=torch.float16)
    got = cli._rmse(a, b)
    assert float(got[0]) == pytest.approx(float(b[0, 0]), rel=1e-3)


class _CastingNet(_Net):
    """A network that casts its input to its own (half) weights and back, as the README advises for iPNDM."""

    def forward(self, x, t):
        w = self.lin.weight.dtype
        return super().forward(x.to(w), t).to(x.dtype)


@pytest.mark.parametrize("flag, want", [(None, torch.bfloat16), ("auto", torch.bfloat16), ("float32", torch.float32),
                                        ("float64", torch.float64)])
def test_dtype_flag_picks_the_state_precision(flag, want, tmp_path, monkeypatch, capsys):
    """--dtype: the states' precision (auto: the weights'); a casting half network ran on float32 states before the
    default followed the weights, and keeps doing so with --dtype float32 (diff review)."""
    def make():
        torch.manual_seed(0)
        schedule = ld3_ext.VPLinear()
        model = ld3_ext.wrap_model(_CastingNet().to(torch.bfloat16), schedule, prediction="eps", time_input="t",
                                   name="net")
        model.sample_shape = (3, 2, 2)
        return model, schedule
    mod = types.ModuleType("ld3_cast_factory_mod")
    mod.make = make
    monkeypatch.setitem(sys.modules, "ld3_cast_factory_mod", mod)
    extra = [] if flag is None else ["--dtype", flag]
    args = cli.build_parser().parse_args(["sample", "--model", "ld3_cast_factory_mod:make", *extra])
    assert cli._load(args)[2] == want
    rc, out, err = run_cli(["sample", "--model", "ld3_cast_factory_mod:make", "--nfe", "4", "--n", "6",
                            "--teacher-nfe", "10", "--out", str(tmp_path / "o"), *extra], capsys)
    assert rc == 0, err


def test_dtype_flag_refuses_other_names(capsys):
    rc, out, err = run_cli(["sample", "--model", "gmm:ring2d", "--dtype", "int8"], capsys)
    assert rc == 2 and "--dtype" in err
