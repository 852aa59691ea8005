"""Analytic test beds: Gaussian mixtures with diagonal components, their exact denoiser under any
schedule, and an accurate reference solution of the probability-flow ODE (the exact teacher).

If x_0 ~ sum_k pi_k N(mu_k, diag(s_k^2)) and x_t = alpha x_0 + sigma eps, then x_t | k ~
N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)) and E[x_0 | x_t] = sum_k w_k(x_t) (mu_k + alpha s_k^2 /
(alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k)), w_k the posterior component weights.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from ._checks import count, holds_values, real, seed as check_seed
from ._finite import all_finite
from .device_constants import cached_constants
from .schedules import NoiseSchedule, _num
from .wrappers import DiffusionModel, wrap_model


class _ExactX0:
    """``GaussianMixture.model``'s network: the exact denoiser at time t.  A class, not a closure, so the model
    pickles (spawn workers, torch.save; serialization audit)."""

    def __init__(self, mixture: "GaussianMixture", schedule: NoiseSchedule, float64: bool):
        self.mixture, self.schedule, self.float64 = mixture, schedule, float64
        self.__name__ = f"exact_{mixture.name}"

    def __call__(self, x, t):
        t0, s = t.reshape(-1)[0], self.schedule
        if self.float64:
            t0 = t0.double()
            return self.mixture.denoise(x.double(), s.alpha(t0), s.sigma(t0)).to(x.dtype)
        return self.mixture.denoise(x, s.alpha(t0).to(x.dtype), s.sigma(t0).to(x.dtype))


class GaussianMixture:
    """sum_k weights_k N(means_k, diag(stds_k^2)) over R^d; samples may carry any event shape."""

    def __init__(self, means, stds, weights=None, event_shape: Optional[Sequence[int]] = None, name: str = "gmm"):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        if self.means.dim() != 2 or self.stds.shape != self.means.shape:
            raise ValueError("means and stds must both have shape [K, d]")
        if self.means.numel() == 0:
            raise ValueError(f"means must hold at least one component of dimension >= 1, got shape {tuple(self.means.shape)}")
        # NaN/Inf parameters give NaN denoisers and samples, not an error
        if not torch.isfinite(self.means).all():
            raise ValueError("means must be finite")
        if not torch.all(self.stds > 0):
            raise ValueError("stds must be > 0")
        if not torch.isfinite(self.stds).all():
            raise ValueError("stds must be finite")
        k, d = self.means.shape
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or not torch.all(w > 0):
            raise ValueError("weights must be K positive numbers")
        if not torch.isfinite(w).all() or not math.isfinite(float(w.sum())):  # Inf turns log_weights into NaN
            raise ValueError("weights must be finite (and so must their sum)")
        self.log_weights = torch.log(w / w.sum())
        self.dim = d
        self.event_shape = tuple(event_shape) if event_shape is not None else (d,)
        if math.prod(self.event_shape) != d:
            raise ValueError(f"event_shape {self.event_shape} does not hold {d} values")
        self.name = name

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_on_device", None)  # device copies: remade on first use (a pickle must not hold CUDA tensors)
        return state

    def parameters_sha256(self) -> str:
        """sha256 of the mixture's parameters and event shape: the identity of its model in teacher caches and
        schedule files (it has no weights to hash)."""
        from .atomic_io import tensors_sha256
        shape = torch.tensor(self.event_shape, dtype=torch.int64)
        return tensors_sha256({"means": self.means, "stds": self.stds, "log_weights": self.log_weights,
                               "event_shape": shape})

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        n = count("n", n)
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k] * z).reshape(n, *self.event_shape)

    def denoise(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t = x] for scalar alpha, sigma (differentiable in x, alpha and sigma).  A float16/bfloat16 x is
        computed in float32 and the result rounded back: |x - alpha mu| > 256 overflowed the squared distance to
        inf in float16, every component's log-density to -inf and the softmax to NaN (at EDM's sigma = 80)."""
        if x.dtype in (torch.float16, torch.bfloat16):
            f32 = torch.float32
            return self.denoise(x.to(f32), torch.as_tensor(alpha).to(f32), torch.as_tensor(sigma).to(f32)).to(x.dtype)
        shape = x.shape
        if x.dim() < 1 or math.prod(shape[1:]) != self.dim:  # reshape's own error names no argument
            raise ValueError(f"x must be a batch of samples of {self.dim} values each (event shape "
                             f"{self.event_shape} of the mixture {self.name!r}), got shape {tuple(shape)}")
        xf = x.reshape(shape[0], 1, self.dim)
        mu, s2, log_w = self._parameters_on(x.device, x.dtype)
        var = alpha ** 2 * s2 + sigma ** 2                    # [K, d]
        diff = xf - alpha * mu                                 # [B, K, d]
        logp = -0.5 * ((diff ** 2) / var + torch.log(var)).sum(-1) + log_w
        w = torch.softmax(logp, dim=-1)                        # [B, K]
        post = mu + (alpha * s2 / var) * diff                  # [B, K, d]
        return (w.unsqueeze(-1) * post).sum(1).reshape(shape)

    def _parameters_on(self, device: torch.device, dtype: torch.dtype):
        """(means, stds^2, log_weights) on ``device`` in ``dtype``, made once: on a GPU a copy from the host at
        every denoise would wait for the stream (and fail under CUDA-graph capture).  Keyed by the tensors'
        identity and version, so reassigning or editing them in place is seen."""
        def made(dev, dt):
            return self.means.to(dev, dt), (self.stds ** 2).to(dev, dt), self.log_weights.to(dev, dt)
        params = (self.means, self.stds, self.log_weights)
        if (device == self.means.device and dtype == self.means.dtype) or any(t.is_inference() for t in params):
            return made(device, dtype)  # nothing to copy; or made under inference_mode: no version counter to key on
        key = tuple((id(t), t._version) for t in params)
        return cached_constants(self.__dict__.setdefault("_on_device", {}), key, device, dtype, made)

    def model(self, schedule: NoiseSchedule, float64: bool = False) -> DiffusionModel:
        """The exact denoiser as a data-prediction model on ``schedule`` (network time input = t).

        It computes in x's dtype (float32 for float16/bfloat16); ``float64=True`` computes in float64 and rounds the
        result to x's dtype
        (a perfect network with low-precision output: what is left of an error is the solver's)."""
        model = wrap_model(_ExactX0(self, schedule, float64), schedule, prediction="x0", time_input="t",
                           name=f"gmm:{self.name}")
        model.testbed = self  # exact teacher (reference_solution) and float64 default for trainers
        return model

    def prior_noise(self, schedule: NoiseSchedule, n: int, generator: Optional[torch.Generator] = None,
                    dtype=torch.float64) -> torch.Tensor:
        """x_T ~ N(0, sigma(t_max)^2 I) (the sampling prior)."""
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        n = count("n", n)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:  # integer noise is all zeros
            raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
        z = torch.randn(n, *self.event_shape, generator=generator, dtype=torch.float64)
        return (schedule.prior_std() * z).to(dtype)

    def reference_solution(self, schedule: NoiseSchedule, x_T: torch.Tensor, t_start: Optional[float] = None,
                           t_end: Optional[float] = None, rtol: float = 1e-10, atol: float = 1e-10) -> torch.Tensor:
        """Solve the probability-flow ODE accurately with scipy's DOP853, in lambda.

        With y = x/sigma the ODE reads dy/dlambda = e^lambda D(sigma(lambda) y, t(lambda)).
        """
        from scipy.integrate import solve_ivp

        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():  # the result is cast to x_T's dtype
            raise TypeError(f"x_T must be a floating torch.Tensor, got "
                            f"{x_T.dtype if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
        if x_T.dim() < 1 or x_T.numel() == 0 or x_T.numel() != x_T.shape[0] * self.dim:
            raise ValueError(f"x_T must be a non-empty batch of samples of {self.dim} values each, got shape {tuple(x_T.shape)}")
        holds_values("x_T", x_T)
        if not all_finite(x_T):
            raise ValueError("x_T contains NaN or Inf")
        t_start = schedule.t_max if t_start is None else _num("t_start", t_start)
        t_end = schedule.t_min if t_end is None else _num("t_end", t_end)
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not _num(name, v) > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        # outside the schedule's domain lambda is NaN or infinite and solve_ivp never returns
        for name, v in (("t_start", t_start), ("t_end", t_end)):
            tv = torch.tensor(v, dtype=torch.float64)
            la, ls = schedule.log_alpha(tv), schedule.log_sigma(tv)
            if not (torch.isfinite(la) and torch.isfinite(ls) and torch.exp(la) > 0 and torch.exp(ls) > 0
                    and torch.isfinite(torch.exp(la - ls))):  # e^lambda drives the ODE
                raise ValueError(f"{name}={v} is outside where the schedule is defined: alpha={float(torch.exp(la))}, "
                                 f"sigma={float(torch.exp(ls))} (need both and alpha/sigma finite and > 0)")
            # the solve runs in lambda and maps back with inverse_lambda: t must be recoverable (VPLinear at
            # t < 0 has a finite lambda that inverse_lambda maps to another, positive t)
            back = float(schedule.inverse_lambda(la - ls))
            if not abs(back - v) <= 1e-6 * max(abs(v), schedule.t_max - schedule.t_min):
                raise ValueError(f"{name}={v} is outside where the schedule is invertible: lambda({name}) maps back "
                                 f"to t={back}")
        lam0 = float(schedule.lambda_(torch.tensor(t_start, dtype=torch.float64)))
        lam1 = float(schedule.lambda_(torch.tensor(t_end, dtype=torch.float64)))
        shape = x_T.shape
        x0 = x_T.detach().to(device="cpu", dtype=torch.float64).reshape(-1)  # scipy solves on the host
        sig0 = float(schedule.sigma(torch.tensor(t_start, dtype=torch.float64)))

        def rhs(lam, y):
            lt = torch.tensor(lam, dtype=torch.float64)
            t = schedule.inverse_lambda(lt)
            a, s = schedule.alpha(t), schedule.sigma(t)
            yt = torch.from_numpy(y)
            d = self.denoise((s * yt).reshape(shape), a, s).reshape(-1)
            return (math.exp(lam) * d).numpy()

        sol = solve_ivp(rhs, (lam0, lam1), (x0 / sig0).numpy(), method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        sig1 = float(schedule.sigma(torch.tensor(t_end, dtype=torch.float64)))
        return (torch.from_numpy(sol.y[:, -1]) * sig1).reshape(shape).to(device=x_T.device, dtype=x_T.dtype)


def ring2d(n_modes: int = 8, radius: float = 1.0, std: float = 0.05) -> GaussianMixture:
    n_modes = count("n_modes", n_modes)
    radius, std = _num("radius", radius), real("std", std, above=0)
    ang = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    return GaussianMixture(means, torch.full_like(means, std), name="ring2d")


def digits64(min_std: float = 0.05) -> GaussianMixture:
    """10 components from the class means/stds of sklearn's 8x8 digits, scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    min_std = real("min_std", min_std, above=0)
    data = load_digits()
    x = torch.from_numpy(data.data.astype(np.float64)) / 8.0 - 1.0
    y = torch.from_numpy(data.target)
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    stds = torch.stack([x[y == c].std(0) for c in range(10)]).clamp_min(min_std)
    counts = torch.bincount(y, minlength=10).to(torch.float64)
    return GaussianMixture(means, stds, counts, event_shape=(1, 8, 8), name="digits64")


def random3072(n_modes: int = 10, seed: int = 0) -> GaussianMixture:
    """A random 3x32x32 mixture (CIFAR-sized)."""
    n_modes = count("n_modes", n_modes)
    seed = check_seed("seed", seed)  # torch's manual_seed raised a bare RuntimeError for 1.5
    g = torch.Generator().manual_seed(seed)
    d = 3 * 32 * 32
    means = 0.5 * torch.randn(n_modes, d, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.5 * torch.rand(n_modes, d, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, event_shape=(3, 32, 32), name="random3072")


MIXTURES = {"ring2d": ring2d, "digits64": digits64, "random3072": random3072}


def get_mixture(name: str) -> GaussianMixture:
    if not isinstance(name, str) or name not in MIXTURES:  # a list failed as "unhashable type"
        raise ValueError(f"unknown mixture {name!r}; expected one of {sorted(MIXTURES)}")
    return MIXTURES[name]()


__all__ = ["GaussianMixture", "ring2d", "digits64", "random3072", "get_mixture", "MIXTURES"]
