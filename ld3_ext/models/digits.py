"""The built-in pretrained model: an EDM-preconditioned MLP denoiser for sklearn's 8x8 digits.

It exists so that schedules and solvers can be compared on a *real trained network* (with its own
approximation error) without downloads: samples are [B, 1, 8, 8] in [-1, 1], the schedule is
``EDM(0.002, 80)``, and the network is the denoiser D(x; sigma) of Karras et al. (2022):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = log(sigma) / 4,

with sd = sigma_data, the data's standard deviation.  F is a residual MLP whose hidden layers are
shifted by an embedding of c_noise.  Trained by ``scripts/train_digits_model.py``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from ..schedules import EDM
from ..wrappers import DiffusionModel, wrap_model
from ._io import ShippedWeights

# sha256 of the shipped file, checked on load (update it when the training script rewrites the file)
WEIGHTS_SHA256 = "c35ee54d66eb19554b7900e2251ce2e190fc0a0f85064133d9d41a160580cc4a"
WEIGHTS_FILE = "digits_denoiser.safetensors"

DEFAULT_CONFIG = {
    "arch": "digits_mlp",
    "dim": 64,           # 1 x 8 x 8
    "hidden": 512,
    "depth": 4,          # hidden layers
    "n_freq": 16,        # Fourier features of c_noise
    "emb": 128,          # width of the noise-level embedding
    "sigma_data": 0.6,   # overwritten by the training script with the measured value
    "sigma_min": 0.002,
    "sigma_max": 80.0,
}


class DigitsDenoiser(nn.Module):
    """D(x; sigma) for x of shape [B, 1, 8, 8] (or [B, 64]) and sigma of shape [B] or scalar.

    Computes in its own parameter dtype and returns the input's dtype, so float64 solvers work.
    """

    def __init__(self, config: dict = None):
        super().__init__()
        cfg = dict(DEFAULT_CONFIG)
        cfg.update(config or {})
        self.config = cfg
        d, h, n_freq = int(cfg["dim"]), int(cfg["hidden"]), int(cfg["n_freq"])
        self.sigma_data = float(cfg["sigma_data"])
        # fixed log-spaced frequencies: c_noise spans about [-1.6, 1.1], so 1..64 rad covers coarse to fine
        self.register_buffer("freqs", torch.logspace(0.0, math.log10(64.0), n_freq), persistent=False)
        e = int(cfg["emb"])
        self.emb = nn.Sequential(nn.Linear(2 * n_freq + 1, e), nn.SiLU(), nn.Linear(e, e))
        self.inp = nn.Linear(d, h)
        self.inp_shift = nn.Linear(e, h)
        self.blocks = nn.ModuleList([nn.Linear(h, h) for _ in range(int(cfg["depth"]) - 1)])
        # a narrow embedding -> per-layer shift keeps the file small (most weights are the 512x512 layers)
        self.shifts = nn.ModuleList([nn.Linear(e, h) for _ in range(int(cfg["depth"]) - 1)])
        self.out = nn.Linear(h, d)
        self.act = nn.SiLU()

    def embed(self, c_noise: torch.Tensor) -> torch.Tensor:
        a = c_noise[:, None] * self.freqs[None]
        return self.emb(torch.cat([c_noise[:, None], a.sin(), a.cos()], 1))

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """F(c_in x, c_noise) on flattened inputs [B, 64]."""
        e = self.act(self.embed(c_noise))
        h = self.act(self.inp(x_in) + self.inp_shift(e))
        for blk, sh in zip(self.blocks, self.shifts):
            # residual keeps the 4-layer MLP easy to train within a 2-minute CPU budget
            h = h + self.act(blk(h) + sh(e))
        return self.out(h)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        shape, out_dtype = x.shape, x.dtype
        p = self.out.weight
        if x.dim() < 2 or math.prod(shape[1:]) != self.inp.in_features:
            # else a bare matmul shape error from deep inside the MLP
            raise ValueError(f"x must be [B, 1, 8, 8] or [B, {self.inp.in_features}] (one digit per row), "
                             f"got shape {tuple(shape)}")
        if not x.is_floating_point():  # an integer x came back as a truncated integer output
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        xf = x.reshape(shape[0], self.inp.in_features).to(p.dtype)  # not -1: an empty batch has no size to infer
        s = torch.as_tensor(sigma, device=x.device).to(p.dtype).reshape(-1)
        if s.numel() == 1:
            s = s.expand(shape[0])
        if s.numel() != shape[0]:
            raise ValueError(f"sigma must be a scalar or have one value per sample ({shape[0]}), got {s.numel()}")
        sd2 = self.sigma_data ** 2
        s2 = s[:, None] ** 2
        c_skip = sd2 / (s2 + sd2)
        c_out = s[:, None] * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1.0 / (s2 + sd2).sqrt()
        # sigma = 0 is D(x) = x (c_skip = 1, c_out = 0): log 0 = -inf made the embedding, and 0 * NaN, NaN
        f = self.raw(c_in * xf, 0.25 * s.clamp_min(torch.finfo(s.dtype).tiny).log())
        return (c_skip * xf + c_out * f).to(out_dtype).reshape(shape)


_WEIGHTS = ShippedWeights(WEIGHTS_FILE, DigitsDenoiser, WEIGHTS_SHA256)


def weights_sha256() -> str:
    """SHA-256 of the shipped weight file: the model's identity (put it next to any reported number)."""
    return _WEIGHTS.sha256()


def weights_metadata() -> dict:
    """The safetensors metadata of the shipped weights (config, seed, training steps, ...)."""
    return _WEIGHTS.metadata()


def load_digits_net(device="cpu", dtype=torch.float32) -> DigitsDenoiser:
    """The shipped denoiser network, frozen and in eval mode."""
    return _WEIGHTS.load(device, dtype)


def load_digits_model(device="cpu", dtype=torch.float32) -> Tuple[DiffusionModel, EDM]:
    """(frozen DiffusionModel, its EDM schedule) for the shipped digits denoiser.

    The network computes in ``dtype``; solvers may run in float64 (the output is cast back).
    """
    net = load_digits_net(device, dtype)
    schedule = EDM(net.config["sigma_min"], net.config["sigma_max"])
    model = wrap_model(net, schedule, prediction="edm", time_input="sigma", name="digits_mlp")
    return model.eval(), schedule


def real_digits(dtype=torch.float32) -> torch.Tensor:
    """All 1797 sklearn digits as [N, 1, 8, 8] in [-1, 1] (pixel values 0..16 mapped linearly)."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().data).to(dtype) / 8.0 - 1.0
    return x.reshape(-1, 1, 8, 8)


__all__ = ["DigitsDenoiser", "load_digits_model", "load_digits_net", "weights_sha256", "weights_metadata",
           "real_digits", "WEIGHTS_FILE", "WEIGHTS_SHA256", "DEFAULT_CONFIG"]
