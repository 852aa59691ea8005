"""Shared fixtures and helpers for the ld3_ext test-suite (kept small on purpose)."""
from __future__ import annotations

import math
import os
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))  # make tests/_oracles.py importable
warnings.filterwarnings("ignore", message=".*native extension ld3_ext._C is not available.*")

import ld3_ext  # noqa: E402
from ld3_ext.testbeds import GaussianMixture  # noqa: E402

#: one factory per schedule type (fresh objects per test); test modules extend it with variants
BASE_SCHEDULES = {
    "edm": lambda: ld3_ext.EDM(),
    "vp_linear": lambda: ld3_ext.VPLinear(),
    "vp_cosine": lambda: ld3_ext.VPCosine(),
    "vp_discrete": lambda: ld3_ext.VPDiscrete.linear(),  # SD / LDM scaled-linear betas
    "flow": lambda: ld3_ext.FlowMatching(),
}


def smooth_mixture(dim: int = 2, n_modes: int = 3, std: float = 0.4, seed: int = 0) -> GaussianMixture:
    """A small Gaussian mixture with wide components: its probability-flow ODE is smooth everywhere,
    so solver errors reach their asymptotic rates at modest N."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_modes, dim, generator=g, dtype=torch.float64)
    stds = std * (1.0 + 0.5 * torch.rand(n_modes, dim, generator=g, dtype=torch.float64))
    weights = 0.5 + torch.rand(n_modes, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights, name="smooth")


def random_decreasing_grid(t_max: float, t_min: float, n: int, seed: int = 0, log: bool = True) -> torch.Tensor:
    """A random strictly decreasing float64 grid t_0 = t_max > ... > t_N = t_min (random gaps)."""
    g = torch.Generator().manual_seed(seed)
    gaps = 0.3 + torch.rand(n, generator=g, dtype=torch.float64)
    u = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(gaps, 0)]) / gaps.sum()
    if log:
        lt = math.log(t_max) + u * (math.log(t_min) - math.log(t_max))
        t = torch.exp(lt)
    else:
        t = t_max + u * (t_min - t_max)
    t[0], t[-1] = t_max, t_min
    return t


class CallCounter:
    """Wrap a network function and count its calls."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.__name__ = "counted"

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.fn(*a, **kw)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny tensors: on a loaded 2-core box thread hand-off makes
    them ~40x slower.  Opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def edm():
    return ld3_ext.EDM(0.002, 80.0)


@pytest.fixture
def mixture():
    return smooth_mixture()


@pytest.fixture(scope="module")
def ring():
    """(mixture, EDM schedule, its exact model): the 2-d ring test bed the training tests share."""
    g = ld3_ext.testbeds.ring2d()
    s = ld3_ext.EDM()
    return g, s, g.model(s)


class OpRecorder(TorchDispatchMode):
    """Records the name of every ATen op dispatched inside ``with OpRecorder() as rec`` (``rec.ops``):
    tests use it to show that a path makes no host round trip (no item(), nonzero, tensors from lists)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def heun_textbook_float64(model, x_T, t):
    """EDM's Algorithm 2 (no churn) in y = x/alpha, all in float64: the oracle for Heun's backends."""
    s = model.schedule
    sig, alp = s.edm_sigma(t), s.alpha(t)
    y = x_T.double() / alp[0]
    for i in range(1, t.numel()):
        d0 = (y - model.predict(alp[i - 1] * y, t[i - 1], returns="x0")[0]) / sig[i - 1]
        y1 = y + (sig[i] - sig[i - 1]) * d0
        d1 = (y1 - model.predict(alp[i] * y1, t[i], returns="x0")[0]) / sig[i]
        y = y + (sig[i] - sig[i - 1]) * 0.5 * (d0 + d1)
    return alp[-1] * y


@pytest.fixture
def unwritable_out(tmp_path, monkeypatch):
    """A folder whose write probe fails (root ignores permissions, so the CLI's probe, a TemporaryFile in the
    folder, is made to fail)."""
    import tempfile
    out = tmp_path / "readonly"
    out.mkdir()
    real = tempfile.TemporaryFile

    def refuse(*a, dir=None, **k):
        if dir is not None and os.path.realpath(dir).startswith(os.path.realpath(out)):
            raise PermissionError(13, "Permission denied", dir)
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    return out


def join_gloo(rank: int, world: int, port: int):
    """In a worker of torch.multiprocessing.spawn: set torchrun's environment for ``rank`` of ``world`` on this host
    and join the CPU (gloo) process group through ld3_ext.distributed.init_from_env (one thread a process)."""
    import os

    from ld3_ext import distributed as D
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return D.init_from_env(device="cpu", timeout_s=60)
