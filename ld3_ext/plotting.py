"""PNG figures for the CLI (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional

import torch


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def sample_grid(samples: Dict[str, torch.Tensor], path: str, max_items: int = 16, title: str = "") -> str:
    """One row per schedule: a scatter plot for 2-D data, an image strip for [B, C, H, W] data."""
    plt = _plt()
    names = list(samples)
    first = next(iter(samples.values()))
    if first.dim() == 2 and first.shape[1] == 2:
        fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), squeeze=False)
        for ax, name in zip(axes[0], names):
            pts = samples[name].detach().cpu().float()
            ax.scatter(pts[:, 0], pts[:, 1], s=2)
            ax.set_title(name, fontsize=8)
            ax.set_aspect("equal")
            ax.set_xlim(-1.6, 1.6)
            ax.set_ylim(-1.6, 1.6)
    else:
        k = min(max_items, first.shape[0])
        fig, axes = plt.subplots(len(names), k, figsize=(0.8 * k, 0.9 * len(names)), squeeze=False)
        for r, name in enumerate(names):
            imgs = samples[name][:k].detach().cpu().float()
            if imgs.dim() == 2:  # flat vectors: show as square-ish images when possible
                side = int(round(imgs.shape[1] ** 0.5))
                imgs = imgs.reshape(k, 1, side, -1)
            for c in range(k):
                ax = axes[r, c]
                img = imgs[c]
                img = img[0] if img.shape[0] == 1 else img[:3].permute(1, 2, 0)
                ax.imshow(((img + 1) / 2).clamp(0, 1).numpy(), cmap="gray" if img.dim() == 2 else None)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[r, 0].set_ylabel(name, fontsize=6, rotation=0, ha="right")
    if title:
        fig.suptitle(title, fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out


def schedule_plot(schedules: Dict[str, torch.Tensor], schedule, path: str,
                  errors: Optional[Dict[str, List[tuple]]] = None) -> str:
    """Left: each grid in lambda (one row per method). Right (optional): error vs NFE per method."""
    plt = _plt()
    ncol = 2 if errors else 1
    fig, axes = plt.subplots(1, ncol, figsize=(6 * ncol, 0.4 * len(schedules) + 2), squeeze=False)
    ax = axes[0, 0]
    for r, (name, t) in enumerate(schedules.items()):
        lam = schedule.lambda_(t.detach().to(torch.float64).cpu())
        ax.plot(lam.numpy(), [r] * lam.numel(), "o-", ms=3)
    ax.set_yticks(range(len(schedules)))
    ax.set_yticklabels(list(schedules), fontsize=7)
    ax.set_xlabel("lambda = log(alpha/sigma)")
    if errors:
        ax2 = axes[0, 1]
        for name, pts in errors.items():
            xs, ys = zip(*sorted(pts))
            ax2.plot(xs, ys, "o-", label=name, ms=3)
        ax2.set_yscale("log")
        ax2.set_xlabel("NFE")
        ax2.set_ylabel("median teacher RMSE")
        ax2.legend(fontsize=6)
    out = _save(fig, path)
    plt.close(fig)
    return out
