"""Sample-quality metrics for the built-in digits model and for teacher comparisons.

* ``digits_fd(samples)``: the Fréchet distance between Gaussians fitted to the penultimate features of
  the shipped digits classifier (``ld3_ext/models/digits_classifier.py``) on the samples and on all
  1797 real sklearn digits.  It is **digits-FD**, not FID: a 64-d feature space of a small CNN trained
  on 8x8 digits; numbers are only comparable with other digits-FD numbers (same classifier hash).
* ``teacher_rmse(pred, target)``: per-sample root-mean-square difference to a teacher's output, the
  quantity LD3-style schedule comparisons report on synthetic test beds.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import numpy as np
import torch

from ._finite import all_finite


def _check_images(samples, name="samples", least: int = 2) -> torch.Tensor:
    """``least``: 2 where a covariance follows (digits-FD), 1 for features alone."""
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(samples).__name__}")
    if not samples.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {samples.dtype}")
    if samples.dim() == 2 and samples.shape[1] == 64:
        samples = samples.reshape(-1, 1, 8, 8)
    if samples.dim() != 4 or tuple(samples.shape[1:]) != (1, 8, 8):
        raise ValueError(f"{name} must have shape [B, 1, 8, 8] (or [B, 64]), got {tuple(samples.shape)}")
    if samples.shape[0] < least:
        raise ValueError(f"{name}: need at least 2 samples for a covariance, got {samples.shape[0]}" if least == 2
                         else f"{name}: need at least {least} sample(s), got {samples.shape[0]}")
    if not all_finite(samples):
        raise ValueError(f"{name} contains NaN or Inf")
    return samples


def gaussian_stats(feats: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features [B, D], in float64."""
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"feats must be a [B, D] tensor with B >= 2 (a covariance needs two rows), got "
                         f"{tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__}")
    f = feats.detach().to(torch.float64).cpu().numpy()
    # np.cov gives a 0-d array for D = 1; frechet_distance needs (D, D)
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _checked_eigh(name: str, c: np.ndarray, vectors: bool = False):
    """(eigenvalues, eigenvectors or None) of the covariance ``c``, refused when it is not symmetric or not
    positive semi-definite: the eigenvalue clipping in frechet_distance would turn a non-covariance (e.g. -I)
    into a silently wrong distance."""
    if np.abs(c - c.T).max() > 1e-6 * np.abs(c).max():
        raise ValueError(f"frechet_distance: {name} is not symmetric (max |C - C^T| = {np.abs(c - c.T).max():.3g})")
    sym = (c + c.T) / 2
    w, v = np.linalg.eigh(sym) if vectors else (np.linalg.eigvalsh(sym), None)
    if w.min() < -1e-6 * np.abs(w).max():
        raise ValueError(f"frechet_distance: {name} is not positive semi-definite (smallest eigenvalue "
                         f"{w.min():.3g}, largest {w.max():.3g})")
    return w, v


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2).

    The trace of the matrix square root is computed from the eigenvalues of the symmetric matrix
    C1^1/2 C2 C1^1/2 (clipped at 0), which is stable for the rank-deficient covariances that small
    sample sets give, unlike a general sqrtm of C1 C2.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    c1, c2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, a, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("cov1", c1, (d, d)), ("cov2", c2, (d, d))):
        if d < 1 or a.shape != shape:
            raise ValueError(f"frechet_distance: {name} has shape {a.shape}; need mu1, mu2 of shape (D,) and "
                             f"cov1, cov2 of shape (D, D) with D = len(mu1) = {mu1.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"frechet_distance: {name} contains NaN or Inf")
    # cov1 is decomposed once: its eigenvalues serve the check, its eigenvectors C1^1/2
    w, v = _checked_eigh("cov1", c1, vectors=True)
    _checked_eigh("cov2", c2)
    s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1 @ c2 @ s1
    ev = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2.0 * np.sqrt(ev).sum())
    return max(d, 0.0)


@torch.no_grad()
def digits_features(samples: torch.Tensor, clip: bool = True, batch_size: int = 1024,
                    name: str = "samples") -> torch.Tensor:
    """Penultimate classifier features [B, 64] of digit images in [-1, 1] (``name``: for error messages)."""
    samples = _check_images(samples, name, least=1)  # one image has features too (digits_fd asks for 2)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:  # 0: range() step error
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    net = _classifier()
    x = samples.detach().to("cpu", torch.float32)
    if clip:  # as when samples are saved as images; the classifier never saw values outside [-1, 1]
        x = x.clamp(-1.0, 1.0)
    return torch.cat([net.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@lru_cache(maxsize=1)
def _classifier():
    from .models.digits_classifier import load_digits_classifier
    return load_digits_classifier()


def digits_reference_stats() -> Tuple[np.ndarray, np.ndarray]:
    """Feature statistics (mean, covariance) of all 1797 real digits, computed on first use and cached in
    memory; each call returns fresh copies (an edit to them cannot change a later ``digits_fd``)."""
    mu, cov = _digits_reference_stats()
    return mu.copy(), cov.copy()


@lru_cache(maxsize=1)
def _digits_reference_stats() -> Tuple[np.ndarray, np.ndarray]:
    from .models.digits import real_digits
    mu, cov = gaussian_stats(digits_features(real_digits()))
    mu.setflags(write=False)  # the cache itself is read-only: a stray in-place op raises
    cov.setflags(write=False)
    return mu, cov


def digits_fd(samples: torch.Tensor, reference: torch.Tensor = None, clip: bool = True) -> float:
    """digits-FD of ``samples`` [B, 1, 8, 8] in [-1, 1] against the real digits (or ``reference``).

    Small sample sets bias the value upwards (a covariance estimate from B samples); compare methods
    at the same B and noises.  Measured: 256 real digits score 11-20 against the full set, the shipped
    denoiser's 256-sample sets 33-58 (DPM-Solver++(3M), 20 steps), Gaussian/uniform noise 540-690.
    """
    samples = _check_images(samples)  # two at least, named as samples (features alone need one)
    if reference is not None:
        reference = _check_images(reference, "reference")
    mu, cov = gaussian_stats(digits_features(samples, clip=clip))
    if reference is None:
        mu_r, cov_r = _digits_reference_stats()
    else:
        mu_r, cov_r = gaussian_stats(digits_features(reference, clip=clip, name="reference"))
    return frechet_distance(mu, cov, mu_r, cov_r)


def teacher_rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample RMSE sqrt(mean over non-batch dims of (pred - target)^2), shape [B], float64.  A NaN sample
    (a diverged solve) gives NaN for that sample: visible in a table, not an exception."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("pred and target must be torch.Tensors")
    for name, t in (("pred", pred), ("target", target)):
        if not t.is_floating_point():  # integers would compare rounded values; complex would drop a part
            raise TypeError(f"{name} must be a real floating tensor, got {t.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"need a non-empty batch dimension, got shape {tuple(pred.shape)}")
    if pred.numel() == 0:  # the mean over zero values is NaN, which reads as a diverged solve
        raise ValueError(f"pred and target hold no values per sample, got shape {tuple(pred.shape)}")
    d = (pred.to(torch.float64) - target.to(torch.float64)).reshape(pred.shape[0], -1)
    return d.pow(2).mean(1).sqrt()


__all__ = ["digits_fd", "digits_features", "digits_reference_stats", "teacher_rmse", "frechet_distance",
           "gaussian_stats"]
