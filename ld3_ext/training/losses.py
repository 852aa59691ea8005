"""Per-sample distances d(pred, target) -> tensor [B] for teacher matching.

Built in: "l2" (mean squared error per sample, LD3's L2 up to a constant), "l1", "pseudo_huber"
(sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(d), as in improved consistency training) and
"lpips" (optional: the ``lpips`` package with its VGG backbone).  Any callable ``(pred, target) ->
per-sample loss [B]`` (e.g. an ``nn.Module``) can be used instead.

"l2" is LD3's L2 (a *squared* distance), so a few samples with large errors (e.g. ones that land
near another mode) dominate the batch mean.  "pseudo_huber" is quadratic only within c of the target
and grows like the per-sample norm ||x - y|| beyond, so it is much less driven by such outliers; on the
digits64 test bed it gave clearly better held-out median errors than "l2" (benchmarks/bench_ld3.py).
(LPIPS, the paper's loss, is itself a weighted *squared* distance between normalised network features;
the choice of pseudo-Huber rests on the measurement, not on a likeness to LPIPS.)
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Optional, Union

import torch

from .._checks import real
from ..ops import _opmath
from .callable_identity import describe_callable, unidentified_note

LOSSES = ("l2", "l1", "pseudo_huber", "lpips")


class LossUnavailableError(RuntimeError):
    """An optional loss (LPIPS) cannot be built in this environment."""


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _diff(pred, target) -> torch.Tensor:
    """pred - target as [B, D], for same-shaped batches (broadcasting would compare the wrong samples)."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"pred and target must be tensors, got {type(pred).__name__} and {type(target).__name__}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dim() < 1:
        raise ValueError("pred and target need a batch dimension (shape [B, ...]), got 0-d tensors")
    # half precision in float32: a sum of squares over a decoded 3x512x512 image passes float16's 65504 at an
    # RMS error of 0.3, and bfloat16 rounds the per-sample losses the trainer compares to 3 digits
    pred, target = (v.to(_opmath(v.dtype)) for v in (pred, target))
    return _flat(pred) - _flat(target)


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _diff(pred, target).pow(2).mean(1)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _diff(pred, target).abs().mean(1)


class PseudoHuberLoss:
    """sqrt(||pred - target||^2 + c^2) - c per sample; ``c=None`` uses 0.00054 * sqrt(d)."""

    def __init__(self, c: Optional[float] = None):
        if c is not None:
            # c < 0 or NaN gives negative or NaN distances; a str fails only at the first call
            x = real("c", c, above=0)
            c = c if isinstance(c, numbers.Real) else x  # as given (loss_name, hence settings hashes, shows it)
        self.c = c

    def __call__(self, pred, target):
        diff = _diff(pred, target)
        c = self.c if self.c is not None else 0.00054 * math.sqrt(diff.shape[1])
        return torch.sqrt(diff.pow(2).sum(1) + c * c) - c


_LPIPS_HELP = (
    "LPIPS needs the `lpips` package (pip install lpips, or the ld3_ext[lpips] extra) AND its backbone "
    "weights: torchvision's pretrained VGG16 (vgg16-397923af.pth), normally downloaded on first use. "
    "Without internet, copy that file into $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/"
    "checkpoints/), or build the network yourself and pass it as the loss: "
    "loss=ld3_ext.training.losses.LPIPSLoss(net=lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=False)). "
    "Alternatively use loss='l2', 'l1' or 'pseudo_huber'.")


class LPIPSLoss(torch.nn.Module):
    """LPIPS(pred, target) per sample, on images in [-1, 1] with 3 channels (not resized, as in LD3).

    ``net`` may be a ready ``lpips.LPIPS`` module (e.g. built from local weights); otherwise one is
    built with ``lpips.LPIPS(net=backbone)``, which fails offline unless the backbone weights are
    cached -- the error says how to provide them.  The network is frozen.
    """

    def __init__(self, backbone: str = "vgg", net: Optional[torch.nn.Module] = None):
        super().__init__()
        if net is None:
            try:
                import lpips  # noqa: F401
            except ImportError as e:
                raise LossUnavailableError(f"loss='lpips' is unavailable: cannot import lpips ({e}). "
                                           + _LPIPS_HELP) from None
            try:
                net = lpips.LPIPS(net=backbone, verbose=False)
            except Exception as e:  # URLError, HTTPError, FileNotFoundError, RuntimeError ...
                raise LossUnavailableError(f"loss='lpips' is unavailable: building lpips.LPIPS(net={backbone!r}) "
                                           f"failed ({type(e).__name__}: {e}). " + _LPIPS_HELP) from None
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net

    def forward(self, pred, target):
        if pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(f"LPIPS compares RGB images [B, 3, H, W] in [-1, 1]; got shape {tuple(pred.shape)}. "
                             "For latent models pass a decoder= to the trainer.")
        p = next(self.net.parameters(), None)
        if p is not None and p.device != pred.device:  # built on the CPU; the trainer's states may be on a GPU
            self.net.to(pred.device)
        dt = p.dtype if p is not None else torch.float32
        out = self.net(pred.to(dt), target.to(dt))
        # never below float32, as the other losses: the trainer compares per-sample losses (bfloat16 has 3 digits)
        return out.reshape(out.shape[0], -1).mean(1).to(torch.promote_types(pred.dtype, torch.float32))


LossSpec = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def get_loss(loss: LossSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Resolve a loss name or callable into a per-sample loss function."""
    if callable(loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be one of {LOSSES} or a callable (pred, target) -> [B], got {type(loss).__name__}")
    name = loss.lower().replace("-", "_")
    if name in ("l2", "mse"):
        return l2_loss
    if name in ("l1", "mae"):
        return l1_loss
    if name in ("pseudo_huber", "huber"):
        return PseudoHuberLoss()
    if name == "lpips":
        return LPIPSLoss()
    raise ValueError(f"loss must be one of {LOSSES} or a callable (pred, target) -> per-sample loss, got {loss!r}")


def loss_name(loss: LossSpec) -> str:
    """A stable description (for metadata and settings hashes)."""
    if isinstance(loss, str):
        return loss.lower()
    # the exact classes only: a subclass may compute something else, and is fingerprinted below
    if type(loss) is PseudoHuberLoss:
        return f"pseudo_huber(c={loss.c})"
    if type(loss) is LPIPSLoss:
        # the network it wraps counts (another backbone, or weights of one's own: another loss)
        net, identified = describe_callable(loss.net)
        if not identified:
            warnings.warn(unidentified_note("LPIPS network", net), stacklevel=2)
        return f"lpips({net})"
    # a fingerprint of what it computes: a checkpoint trained with another loss of the same name (two lambdas,
    # two partials) must not be resumed
    name, identified = describe_callable(loss)
    if not identified:
        warnings.warn(unidentified_note("loss", name), stacklevel=2)
    return name


def per_sample(loss_fn, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Call ``loss_fn`` and check that it returned one finite-typed value per sample."""
    out = loss_fn(pred, target)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"loss returned {type(out).__name__}, expected a tensor of shape [B]")
    b = pred.shape[0]
    if out.dim() != 1 or out.shape[0] != b:
        if out.numel() == b:
            out = out.reshape(b)
        else:
            raise ValueError(f"loss must return one value per sample (shape [{b}]), got shape {tuple(out.shape)}; "
                             "do not reduce over the batch")
    return out


__all__ = ["get_loss", "loss_name", "per_sample", "l2_loss", "l1_loss", "PseudoHuberLoss", "LPIPSLoss",
           "LossUnavailableError", "LOSSES"]
