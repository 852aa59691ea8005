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


def _legacy_copy(model):
    """The module tree as older ld3_ext built it: every DiffusionModel's network registered as fn and net."""
    import copy
    old = copy.deepcopy(model)
    for m in old.modules():
        if isinstance(m, ld3_ext.DiffusionModel) and m._network_is_net():
            m._modules = collections.OrderedDict([("fn", m._modules["net"]), *m._modules.items()])
    return old


def test_a_wrapped_network_is_in_the_state_dict_once():
    """It was registered as fn and net: every weight twice in state_dict (an edit to fn.* was silently overwritten
    by net.* on load, safetensors refused the shared tensors, repr printed the network twice)."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    m = ld3_ext.wrap_model(torch.nn.Linear(4, 4), ld3_ext.EDM(), prediction="edm")
    sd = m.state_dict()
    assert list(sd) == ["net.weight", "net.bias"] and m.fn is m.net
    assert repr(m).count("Linear(") == 1
    import tempfile
    import os
    with tempfile.TemporaryDirectory() as d:
        save_file(sd, os.path.join(d, "m.safetensors"))
        back = load_file(os.path.join(d, "m.safetensors"))
    m2 = ld3_ext.wrap_model(torch.nn.Linear(4, 4), ld3_ext.EDM(), prediction="edm")
    m2.load_state_dict(back)
    assert torch.equal(m2.net.weight, m.net.weight)
    # a state dict of the older layout loads (strict): net.'s entries win, as they did; fn.'s alone stand in
    legacy = _legacy_copy(m).state_dict()
    assert sorted(legacy) == ["fn.bias", "fn.weight", "net.bias", "net.weight"]
    m3 = ld3_ext.wrap_model(torch.nn.Linear(4, 4), ld3_ext.EDM(), prediction="edm")
    m3.load_state_dict(legacy)
    assert torch.equal(m3.net.weight, m.net.weight)
    m4 = ld3_ext.wrap_model(torch.nn.Linear(4, 4), ld3_ext.EDM(), prediction="edm")
    m4.load_state_dict({k.replace("net.", "fn."): v for k, v in sd.items()})
    assert torch.equal(m4.net.bias, m.net.bias)
    # a plain callable stays fn, and assigning one replaces it
    f = ld3_ext.wrap_model(lambda x, t: x, ld3_ext.EDM(), prediction="edm")
    assert not list(f.state_dict()) and f.fn(3, 0) == 3
    f.fn = lambda x, t: 2 * x
    assert f.fn(3, 0) == 6


def test_weights_hashes_keep_the_layout_they_were_made_over():
    """Teacher caches, checkpoints and schedule files are keyed by weights hashes made over the older layout: the
    same numbers (the digits model's as recorded before the change), so none of them is refused."""
    from ld3_ext.functional import _VEModel
    from ld3_ext.models import load_model
    from ld3_ext.training.callable_identity import _module_weights
    from ld3_ext.training.teacher import state_dict_hash
    digits, _ = load_model("digits")
    assert state_dict_hash(digits) == "d56a1a2cab81e2ce83efb715794d23eb20facaec7dd29776d2b07423da117261"
    assert _module_weights(digits) == "2705e6a078fbf6fc"
    torch.manual_seed(0)
    w = ld3_ext.wrap_model(torch.nn.Linear(3, 3), ld3_ext.EDM(), prediction="edm")
    for model in (digits, w, _VEModel(w, ld3_ext.EDM())):
        old = _legacy_copy(model)
        from ld3_ext.atomic_io import tensors_sha256
        assert state_dict_hash(model) == tensors_sha256(old.state_dict())
        import hashlib
        h = hashlib.sha256()
        for k, v in old.state_dict().items():
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"{k}:{t.dtype}:{tuple(v.shape)}:".encode() + t.view(torch.uint8).numpy().tobytes())
        assert _module_weights(model) == h.hexdigest()[:16]


def test_an_older_pickle_of_a_wrapped_model_loads_with_one_registration(tmp_path):
    torch.manual_seed(0)
    m = ld3_ext.wrap_model(torch.nn.Linear(4, 4), ld3_ext.EDM(), prediction="edm")
    old = _legacy_copy(m)
    old.__dict__.pop("_fn")
    again = pickle.loads(pickle.dumps(old))
    assert list(again.state_dict()) == ["net.weight", "net.bias"] and again.fn is again.net
    plain = ld3_ext.wrap_model(lambda x, t: x, ld3_ext.EDM(), prediction="edm")
    plain.__dict__["fn"] = plain.__dict__.pop("_fn")  # an older pickle of a plain callable: the attribute fn
    fresh = ld3_ext.DiffusionModel.__new__(ld3_ext.DiffusionModel)
    fresh.__setstate__(dict(plain.__dict__))
    assert fresh.fn is plain.__dict__["fn"] and fresh.fn(3, 0) == 3


class _Hooked(torch.nn.Module):
    """A network whose state_dict hook renames its entries (as FSDP's hooks do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(3, 3)
        self._register_state_dict_hook(_Hooked._rename)

    @staticmethod
    def _rename(module, state, prefix, local_metadata):
        for k in [k for k in state if k.startswith(prefix + "lin.")]:
            state[prefix + "flat." + k[len(prefix) + 4:]] = state.pop(k)
        return state

    def forward(self, x, t):
        return self.lin(x)


def test_weights_hashes_of_a_hooked_network_and_module_fingerprints_keep_the_older_layout():
    """legacy_state_dict skipped state_dict hooks (FSDP's, a user's): such a network's hash changed; and a module
    holding a DiffusionModel, fingerprinted by its parameter names, got new names (diff review)."""
    from ld3_ext.atomic_io import tensors_sha256
    from ld3_ext.training.callable_identity import describe_callable
    from ld3_ext.training.teacher import state_dict_hash
    m = ld3_ext.wrap_model(_Hooked(), ld3_ext.EDM(), prediction="edm")
    assert list(m.state_dict()) == ["net.flat.weight", "net.flat.bias"]
    assert state_dict_hash(m) == tensors_sha256(_legacy_copy(m).state_dict())

    class Holder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x, 1.0)
    assert describe_callable(Holder(m)) == describe_callable(Holder(_legacy_copy(m)))


def test_replacing_a_wrapped_network_module_with_a_plain_callable_is_refused():
    """It was accepted with the old module still registered: its weights stayed in the state dict and the weights
    hash, so two models with different callables had one identity (before this layout it was torch's TypeError)."""
    m = ld3_ext.wrap_model(torch.nn.Linear(3, 3), ld3_ext.EDM(), prediction="edm")
    for bad in (lambda x, t: x, None):
        with pytest.raises(TypeError, match="fn: cannot replace the wrapped network module"):
            m.fn = bad
    assert isinstance(m.fn, torch.nn.Linear)
    new = torch.nn.Linear(3, 3)
    m.fn = new  # another module: registered as net in its place
    assert m.fn is new and m.net is new and list(m.state_dict()) == ["net.weight", "net.bias"]
