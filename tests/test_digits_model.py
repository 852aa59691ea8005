"""The shipped digits denoiser: loading, identity, and sample quality in digits-FD.

Measured (weights sha256 c35ee54d..., DPM-Solver++(3M), 20 logSNR steps, 256 samples, seeds 0-7):
digits-FD 32.9, 58.0, 41.9, 38.5, 48.3, 34.4, 40.8, 34.7; 256 real digits against the full set score
11-20; uniform or Gaussian noise ~540-690.  The threshold 90 is 1.5x the worst seed: loose enough
for BLAS/thread differences, tight enough that a broken model (FD in the hundreds) fails.
"""
import os

import pytest
import torch

import ld3_ext
from ld3_ext import DPMSolverPP, discretizations
from ld3_ext.metrics import digits_fd
from ld3_ext.models._io import data_path
from ld3_ext.models.digits import (DigitsDenoiser, load_digits_model, load_digits_net, weights_metadata,
                                   weights_sha256)

FD_THRESHOLD = 90.0


def test_weights_load_frozen_and_identified():
    model, schedule = load_digits_model()
    assert isinstance(model, ld3_ext.DiffusionModel) and model.prediction == "edm"
    assert isinstance(schedule, ld3_ext.EDM) and schedule.t_min == 0.002 and schedule.t_max == 80.0
    params = list(model.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not model.training and not model.net.training
    sha = weights_sha256()
    import hashlib
    from ld3_ext.models.digits import WEIGHTS_SHA256
    with open(str(data_path("digits_denoiser.safetensors")), "rb") as f:
        assert sha == hashlib.sha256(f.read()).hexdigest() == WEIGHTS_SHA256  # the file's own hash, as pinned
    meta = weights_metadata()
    assert meta["config"]["arch"] == "digits_mlp" and "seed" in meta and "steps" in meta
    size = os.path.getsize(str(data_path("digits_denoiser.safetensors")))
    assert size < 5_000_000


def test_denoiser_preconditioning_limits():
    net = load_digits_net()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    # tiny sigma: c_skip -> 1, c_out -> 0, so D(x; sigma) ~ x (measured max error ~3e-4 over seeds; 0.3 at sigma 1e-2)
    assert torch.allclose(net(x, torch.tensor(1e-5)), x, rtol=0, atol=2e-3)
    # float64 in -> float64 out (the solver may run in float64); per-sample sigmas accepted
    out = net(x.double(), torch.full((4,), 1.0, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == x.shape
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have one value per sample \(4\), got 3"):
        net(x, torch.ones(3))


def test_fresh_network_differs_from_shipped():
    # guards against the loader silently returning an untrained network
    torch.manual_seed(0)
    fresh = DigitsDenoiser(load_digits_net().config).eval()
    x, s = torch.randn(8, 1, 8, 8), torch.full((8,), 0.5)
    with torch.no_grad():
        assert not torch.allclose(fresh(x, s), load_digits_net()(x, s), atol=1e-2)


def test_samples_have_low_digits_fd():
    model, schedule = load_digits_model()
    g = torch.Generator().manual_seed(0)
    x_T = schedule.prior_std() * torch.randn(256, 1, 8, 8, generator=g)
    t = discretizations.logsnr_uniform(schedule, 20)
    with torch.no_grad():
        x = DPMSolverPP(order=3).sample(model, x_T, t)
    assert x.shape == (256, 1, 8, 8) and torch.isfinite(x).all()
    fd = digits_fd(x)
    noise_fd = digits_fd(torch.randn(256, 1, 8, 8, generator=g).clamp(-1, 1))
    assert fd < FD_THRESHOLD, fd
    assert fd < noise_fd / 5, (fd, noise_fd)


def test_save_state_is_atomic_and_keeps_the_earlier_file_on_failure(tmp_path, monkeypatch):
    """The training scripts' weight writer: a write that fails midway leaves the earlier file whole, no temp."""
    import safetensors.torch as st
    from ld3_ext.models._io import save_state
    path = tmp_path / "w.safetensors"
    save_state(path, {"a": torch.ones(3)}, {"width": 3}, seed=1)
    before = path.read_bytes()
    loaded = st.load_file(str(path))
    assert torch.equal(loaded["a"], torch.ones(3))

    def broken(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, {"a": torch.zeros(3)}, {"width": 3})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]
