"""PNG figures for the CLI (matplotlib Figures on the Agg canvas, no pyplot state; written atomically)."""
from __future__ import annotations

import io
from typing import Dict, List, Mapping, Optional

import torch

from ._checks import count
from .atomic_io import atomic_write_bytes


class PlottingUnavailableError(ImportError):
    """matplotlib cannot be imported: the figures cannot be drawn (the message says how to install it)."""


def _subplots(nrows: int, ncols: int, figsize):
    # a bare Figure (Agg canvas), not pyplot: no global backend to switch (matplotlib.use("Agg") changed the
    # backend of a notebook or script that calls the CLI in-process), and nothing to close afterwards
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # a bare ModuleNotFoundError said nothing of how to get the figures
        raise PlottingUnavailableError(f"the figures need matplotlib, which cannot be imported ({exc}); install it "
                                       "with `pip install matplotlib` (a dependency of ld3_ext)") from exc
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _save(png: bytes, path: str) -> str:
    # rendered in memory, then written by atomic_io: the PNG gets a plain file's mode (not mkstemp's 0600,
    # which made figures in a shared run folder private) and a killed run leaves no stray temp file
    atomic_write_bytes(path, png)
    return path


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """One sample as [H, W] (gray) or [H, W, 3] (colour), whatever its shape: [C, H, W] with 3 channels is colour,
    any other channel count shows its first channel; a flat or higher-rank sample is laid out as a near-square
    H x W with H the largest divisor of its size not above the square root."""
    if x.dim() == 3 and x.shape[0] == 3:
        return x.permute(1, 2, 0)
    if x.dim() == 3:
        return x[0]
    if x.dim() == 2:
        return x
    flat = x.reshape(-1)
    d = flat.numel()
    h = max(k for k in range(1, int(d ** 0.5) + 1) if d % k == 0)
    return flat.reshape(h, d // h)


def _check_samples(samples):
    """``samples``: a non-empty mapping name -> [batch >= 1, ...] tensor, all 2-D points or none.  An empty one
    failed as a bare StopIteration, an empty batch inside matplotlib, a mix of points and images in a mask."""
    if not isinstance(samples, Mapping):
        raise TypeError(f"samples must be a dict of name -> tensor, got {type(samples).__name__}")
    if not samples:
        raise ValueError("samples is empty: nothing to plot (give at least one name -> tensor)")
    points = []
    for name, x in samples.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"samples[{name!r}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[0] == 0 or x.numel() == 0:
            raise ValueError(f"samples[{name!r}] must hold at least one sample with values, got shape {tuple(x.shape)}")
        points.append(x.dim() == 2 and x.shape[1] == 2)
    if any(points) and not all(points):
        raise ValueError(f"samples mixes 2-D points ([n, 2]) with other shapes "
                         f"({ {k: tuple(v.shape) for k, v in samples.items()} }); plot them separately")
    return samples


def sample_grid(samples: Dict[str, torch.Tensor], path: str, max_items: int = 16, title: str = "") -> str:
    """One row per schedule: a scatter plot for 2-D data, an image strip for any other sample shape."""
    return _save(sample_grid_png(samples, max_items, title), path)


def sample_grid_png(samples: Dict[str, torch.Tensor], max_items: int = 16, title: str = "") -> bytes:
    """:func:`sample_grid`'s figure as PNG bytes (a caller writing several files renders them all first)."""
    names = list(_check_samples(samples))
    max_items = count("max_items", max_items, 1)
    first = samples[names[0]]
    if first.dim() == 2 and first.shape[1] == 2:
        pts_all = {name: samples[name].detach().cpu().float() for name in names}
        finite = torch.cat([p[torch.isfinite(p).all(1)] for p in pts_all.values()])
        lim = 1.05 * float(finite.abs().max()) if finite.numel() else 1.6  # every point in view, one scale for all
        fig, axes = _subplots(1, len(names), (3 * len(names), 3))
        for ax, name in zip(axes[0], names):
            pts = pts_all[name]
            ax.scatter(pts[:, 0], pts[:, 1], s=2)
            ax.set_title(name, fontsize=8)
            ax.set_aspect("equal")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
    else:
        k = min(max_items, min(samples[name].shape[0] for name in names))  # every row has k images
        fig, axes = _subplots(len(names), 1, (0.8 * k, 0.9 * len(names)))
        for r, name in enumerate(names):
            # one strip per row, the k images side by side with a white pixel between: one Axes a row, not one an
            # image (the digits eval's 8 x 16 Axes took 3 s of matplotlib); [-1, 1] is black..white in every image
            imgs = [((_as_image(x) + 1) / 2).clamp(0, 1) for x in samples[name][:k].detach().cpu().float()]
            gap = torch.ones(imgs[0].shape[0], 1, *imgs[0].shape[2:])
            strip = torch.cat([part for img in imgs for part in (img, gap)][:-1], dim=1)
            ax = axes[r, 0]
            ax.imshow(strip.numpy(), cmap="gray" if strip.dim() == 2 else None, vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(name, fontsize=6, rotation=0, ha="right")
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)


def _check_schedule_inputs(schedules, errors) -> None:
    """An empty ``schedules`` drew a blank figure; an empty or malformed error curve failed in zip(*...), naming
    nothing.  ``errors`` None or {} draws no error panel."""
    if not isinstance(schedules, Mapping):
        raise TypeError(f"schedules must be a dict of name -> timesteps tensor, got {type(schedules).__name__}")
    if not schedules:
        raise ValueError("schedules is empty: nothing to plot (give at least one name -> timesteps)")
    for name, t in schedules.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"schedules[{name!r}] must be a 1-D torch.Tensor of times, got {type(t).__name__}")
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"schedules[{name!r}] must be a non-empty 1-D tensor of times, got shape {tuple(t.shape)}")
    if errors is None:
        return
    if not isinstance(errors, Mapping):
        raise TypeError(f"errors must be None or a dict of name -> [(nfe, error), ...], got {type(errors).__name__}")
    for name, pts in errors.items():
        try:
            ok = len(pts) > 0 and all(len(p) == 2 for p in pts)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"errors[{name!r}] must be a non-empty list of (nfe, error) pairs, got {pts!r}")


def schedule_plot(schedules: Dict[str, torch.Tensor], schedule, path: str,
                  errors: Optional[Dict[str, List[tuple]]] = None) -> str:
    """Left: each grid in lambda (one row per method). Right (optional): error vs NFE per method."""
    return _save(schedule_plot_png(schedules, schedule, errors), path)


def schedule_plot_png(schedules: Dict[str, torch.Tensor], schedule,
                      errors: Optional[Dict[str, List[tuple]]] = None) -> bytes:
    """:func:`schedule_plot`'s figure as PNG bytes."""
    _check_schedule_inputs(schedules, errors)
    from .schedules import NoiseSchedule
    if not isinstance(schedule, NoiseSchedule):  # a name or config failed at .lambda_, naming nothing
        raise TypeError(f"schedule must be an ld3_ext NoiseSchedule (the grids' times are its times), got "
                        f"{type(schedule).__name__}")
    ncol = 2 if errors else 1
    fig, axes = _subplots(1, ncol, (6 * ncol, 0.4 * len(schedules) + 2))
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
    return _png(fig)
