"""Copies and round trips of public objects (serialization audit): model kwargs held in a namedtuple or an
OrderedDict survive .to()/.half(); LearnedSchedule.to_dict() is a copy; a solver's repr shows how it runs where
that is not the default; the models the library builds itself pickle (spawn workers, torch.save)."""
import collections
import pickle

import pytest
import torch

import ld3_ext
from ld3_ext import discretizations
from ld3_ext.schedule_file import LearnedSchedule

NT = collections.namedtuple("NT", "a b")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, extra=None, more=None):
        return self.lin(x) + extra.a + more["k"]


def test_namedtuple_and_ordereddict_model_kwargs_follow_to():
    """type(namedtuple)(generator) raised TypeError in .to(), after the weights had been converted and before the
    kwargs were: a half-converted model; an OrderedDict came back a plain dict."""
    kw = {"extra": NT(torch.zeros(4), torch.ones(4)), "more": collections.OrderedDict(k=torch.ones(4))}
    m = ld3_ext.wrap_model(_Net(), ld3_ext.VPLinear(), model_kwargs=kw)
    m.to(torch.float64)
    assert m.net.lin.weight.dtype == torch.float64
    extra, more = m.model_kwargs["extra"], m.model_kwargs["more"]
    assert type(extra) is NT and extra.a.dtype == extra.b.dtype == torch.float64
    assert type(more) is collections.OrderedDict and more["k"].dtype == torch.float64
    x = torch.randn(2, 4, dtype=torch.float64)
    y = ld3_ext.DPMSolverPP(2).sample(m, x, discretizations.logsnr_uniform(ld3_ext.VPLinear(), 4))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()
    dd = collections.defaultdict(list, k=torch.ones(4))  # a dict subclass that takes no pairs: a plain dict
    m2 = ld3_ext.wrap_model(_Net(), ld3_ext.VPLinear(), model_kwargs={"extra": NT(torch.zeros(4), 1), "more": dd})
    m2.half()
    assert m2.model_kwargs["more"]["k"].dtype == torch.float16 and m2.model_kwargs["extra"].b == 1


def test_to_dict_is_a_copy():
    """Editing the exported dict changed the schedule's own solver and schedule configs."""
    s = ld3_ext.VPLinear()
    ls = LearnedSchedule(discretizations.logsnr_uniform(s, 6), solver_config=ld3_ext.UniPC(order=2).config(), nfe=6,
                         schedule_config=s.config(), extra={"note": {"k": 1}})
    d = ls.to_dict()
    d["solver"]["order"] = 3
    d["schedule"]["t_min"] = 0.01
    d["note"]["k"] = 2
    assert ls.solver().order == 2 and ls.schedule.t_min == s.t_min and ls.extra["note"]["k"] == 1
    assert ls.to_dict()["solver"]["order"] == 2


@pytest.mark.parametrize("solver", [ld3_ext.DPMSolverPP(3, backend="reference", checkpoint_model=True),
                                    ld3_ext.UniPC(2, backend="fused"), ld3_ext.Heun(checkpoint_model=True),
                                    ld3_ext.Euler()], ids=lambda s: s.name)
def test_a_solver_repr_shows_its_non_default_settings_and_evaluates_back(solver):
    text = repr(solver)
    assert ("backend=" in text) == (solver.backend != "auto")
    assert ("checkpoint_model=True" in text) == solver.checkpoint_model
    again = eval(text, {k: getattr(ld3_ext, k) for k in ("DPMSolverPP", "UniPC", "Heun", "Euler")})
    assert again.__dict__ == solver.__dict__ and repr(again) == text


@pytest.mark.parametrize("float64", [False, True])
def test_a_test_bed_model_pickles_and_samples_the_same(float64, tmp_path):
    """Its network was a local closure: pickle (spawn DataLoader workers, torch.save of the model) failed."""
    mix = ld3_ext.testbeds.ring2d()
    s = ld3_ext.VPLinear()
    model = mix.model(s, float64=float64)
    again = pickle.loads(pickle.dumps(model))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = mix.prior_noise(s, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    grid = discretizations.logsnr_uniform(s, 5)
    want = ld3_ext.DPMSolverPP(3).sample(model, x, grid)
    for m in (again, loaded):
        assert m.testbed.parameters_sha256() == mix.parameters_sha256() and m.name == model.name
        torch.testing.assert_close(ld3_ext.DPMSolverPP(3).sample(m, x, grid), want, rtol=0, atol=0)
