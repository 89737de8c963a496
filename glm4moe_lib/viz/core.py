"""Shared figure style: readable on a projector, colour-blind-safe colours, one look everywhere."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

#: Sequential colormap for heatmaps (perceptually uniform, colour-blind-safe).
CMAP = "viridis"
#: Diverging colormap for signed values (colour-blind-safe).
CMAP_DIVERGING = "PuOr"
#: Okabe–Ito palette: distinguishable under the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def check_scale(scale) -> None:
    """Reject a font ``scale`` that is not a finite number > 0 (TypeError / ValueError naming it)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale={scale!r} is not allowed: it must be a number > 0 (1.5 for a projector)")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"scale={scale!r} is not allowed: it must be a finite number > 0 (1.5 for a projector)"
        )


def ink(color, alpha: float = 1.0) -> str:
    """Text colour for a box filled with ``color``: "black" or "white", whichever has the higher WCAG
    contrast ratio with the fill as drawn (``color`` at ``alpha`` over the white page)."""
    rgb = [alpha * c + (1 - alpha) for c in to_rgb(color)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    luminance = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "white" if 1.05 / (luminance + 0.05) > (luminance + 0.05) / 0.05 else "black"


def use_course_style(scale: float = 1.0) -> None:
    """Font sizes and colours for every figure; ``scale=1.5`` for a projector."""
    check_scale(scale)
    mpl.rcParams.update(
        {
            "figure.dpi": 80,
            "savefig.dpi": 80,
            "font.size": 11 * scale,
            "axes.titlesize": 13 * scale,
            "axes.labelsize": 12 * scale,
            "xtick.labelsize": 10 * scale,
            "ytick.labelsize": 10 * scale,
            "legend.fontsize": 10 * scale,
            "axes.prop_cycle": mpl.cycler(color=PALETTE),
            "image.cmap": CMAP,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "figure.autolayout": False,
        }
    )


def to_numpy(x) -> np.ndarray:
    """Tensor (any device/dtype, with grad or not) or array-like -> float numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def heatmap(
    ax: Axes,
    data,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    cmap: str = CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    yticklabels: Sequence[str] | None = None,
    xticklabels: Sequence[str] | None = None,
):
    """Draw a 2-D array as a heatmap with labels and a colour bar; returns the image."""
    arr = to_numpy(data)
    im = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if yticklabels is not None:
        ax.set_yticks(range(len(yticklabels)), labels=list(yticklabels))
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), labels=list(xticklabels))
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return im


def load_bars(ax: Axes, load, *, title: str = "Tokens per expert", ideal: float | None = None):
    """Bar chart of per-expert load with the balanced level as a dashed line."""
    arr = to_numpy(load)
    bars = ax.bar(np.arange(len(arr)), arr, color=PALETTE[0])
    if ideal is None:
        ideal = float(arr.mean()) if len(arr) else 0.0
    ax.axhline(ideal, color=PALETTE[3], linestyle="--", linewidth=2, label="balanced")
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return bars


def close(fig: Figure) -> Figure:
    """Detach a figure from pyplot so it is shown once (by the notebook) and not leaked."""
    plt.close(fig)
    return fig
