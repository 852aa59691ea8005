"""A small classifier for sklearn's 8x8 digits whose penultimate features define "digits-FD".

Not Inception and not FID: a Fréchet distance in this 64-d feature space only ranks samplers of the
built-in digits model against each other.  Trained by ``scripts/train_digits_classifier.py``.
"""
from __future__ import annotations


import torch
from torch import nn

from .._checks import real, seed as check_seed
from ._io import ShippedWeights

# sha256 of the shipped file, checked on load (update it when the training script rewrites the file)
WEIGHTS_SHA256 = "0652bab1feb24049957209e424f3ca6862a0473ee2a47a86bc0ec5574c7eb849"
WEIGHTS_FILE = "digits_classifier.safetensors"

DEFAULT_CONFIG = {"arch": "digits_cnn", "c1": 32, "c2": 64, "feat": 64, "n_classes": 10}


class DigitsClassifier(nn.Module):
    """conv(1->c1) - conv(c1->c2) - pool - conv - global pool - Linear(feat) - Linear(10).

    ``features(x)`` is the penultimate (post-activation) layer used by the Fréchet distance.
    """

    def __init__(self, config: dict = None):
        super().__init__()
        cfg = dict(DEFAULT_CONFIG)
        cfg.update(config or {})
        self.config = cfg
        c1, c2, f = int(cfg["c1"]), int(cfg["c2"]), int(cfg["feat"])
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),                                   # 8x8 -> 4x4
            nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(c2 * 16, f), nn.SiLU(),
        )
        self.head = nn.Linear(f, int(cfg["n_classes"]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        p = self.head.weight
        if tuple(x.shape[1:]) not in ((64,), (1, 8, 8)):  # else a bare conv/matmul shape error
            raise ValueError(f"x must be [B, 1, 8, 8] or [B, 64] (one digit per row), got shape {tuple(x.shape)}")
        if x.dim() == 2:
            x = x.reshape(-1, 1, 8, 8)
        return self.body(x.to(p.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_WEIGHTS = ShippedWeights(WEIGHTS_FILE, DigitsClassifier, WEIGHTS_SHA256)


def classifier_sha256() -> str:
    """SHA-256 of the shipped classifier weights."""
    return _WEIGHTS.sha256()


def classifier_metadata() -> dict:
    return _WEIGHTS.metadata()


def load_digits_classifier(device="cpu", dtype=torch.float32) -> DigitsClassifier:
    """The shipped classifier, frozen and in eval mode."""
    return _WEIGHTS.load(device, dtype)


def digits_split(seed: int = 0, test_fraction: float = 0.25):
    """The fixed train/test split used for training and for the accuracy test: (xtr, ytr, xte, yte)."""
    from sklearn.datasets import load_digits

    seed = check_seed("seed", seed)
    # 0 or 1 leaves one side empty; 1.5 used to give an empty training set without a word
    test_fraction = real("test_fraction", test_fraction, above=0, below=1)
    d = load_digits()
    x = torch.from_numpy(d.data).float().reshape(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * x.shape[0]))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


__all__ = ["DigitsClassifier", "load_digits_classifier", "classifier_sha256", "classifier_metadata",
           "digits_split", "WEIGHTS_FILE", "WEIGHTS_SHA256", "DEFAULT_CONFIG"]
