"""Figures for lesson 05: the sort-based dispatch, the weighted combine, capacity and memory.

The small helpers at the top compute the numbers the figures draw (expert capacity, which
(token, slot) pairs a capacity-limited layer drops, the memory of each dispatch layout); the lesson
and its exercises use them too. Every ``plot_*`` returns a closed figure (shown once by the notebook).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..config import check_int
from ..dispatch import _check_index, capacity_keep_mask, check_expert_ids, expert_capacity, plan_dispatch
from .core import PALETTE, close, ink, to_numpy

__all__ = [
    "capacity_drops",
    "capacity_keep_mask",
    "dispatch_memory",
    "dropped_fraction",
    "expert_capacity",
    "plot_capacity_drops",
    "plot_dispatch_memory",
    "plot_dropped_vs_capacity",
    "plot_permutation",
]

# ---- the numbers ---------------------------------------------------------------------------------


def capacity_drops(top_k_index: Tensor, num_experts: int, capacity_factor: float) -> tuple[int, int]:
    """(capacity per expert, number of (token, slot) pairs dropped) for a capacity-limited layer."""
    _check_index(top_k_index, num_experts)
    t, k = top_k_index.shape
    cap = expert_capacity(t, num_experts, k, capacity_factor)
    load = torch.bincount(top_k_index.reshape(-1), minlength=num_experts)  # [E]
    return cap, int((load - cap).clamp_min(0).sum())


def dropped_fraction(top_k_index: Tensor, num_experts: int, capacity_factors: Sequence[float]) -> list[float]:
    """Fraction of the T*K pairs dropped at each capacity factor."""
    _check_index(top_k_index, num_experts)
    total = top_k_index.numel()
    if total == 0:
        raise ValueError(f"top_k_index has shape {tuple(top_k_index.shape)}: it holds no (token, slot) pairs")
    return [capacity_drops(top_k_index, num_experts, f)[1] / total for f in capacity_factors]


def dispatch_memory(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float = 1.25, hidden_size: int = 0
) -> dict[str, int]:
    """Bytes of the routing bookkeeping of each layout (plus the dispatched activations if
    ``hidden_size`` > 0, float32).

    * capacity masks (GShard/Switch): a [T, E, C] bool dispatch mask and a [T, E, C] float32 combine
      tensor, C = capacity; the dispatched activations are [E, C, H].
    * sorted indices (dropless): order, token ids and expert ids [T*K] int64 and offsets [E+1];
      the dispatched activations are [T*K, H].
    """
    check_int("num_tokens", num_tokens, 0)
    check_int("num_experts", num_experts, 1)
    check_int("top_k", top_k, 1, num_experts, f" (at most num_experts={num_experts})")
    check_int("hidden_size", hidden_size, 0, what=" (0: the routing bookkeeping only)")
    _check_factor("capacity_factor", capacity_factor)
    cap = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
    masks = num_tokens * num_experts * cap * (1 + 4)
    sorted_idx = 3 * num_tokens * top_k * 8 + (num_experts + 1) * 8
    if hidden_size:
        masks += num_experts * cap * hidden_size * 4
        sorted_idx += num_tokens * top_k * hidden_size * 4
    return {"capacity masks": masks, "sorted indices": sorted_idx, "capacity": cap}


def _check_factor(name: str, value) -> None:
    """A capacity factor: a finite number > 0, else a TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} is not allowed: it must be a number > 0 (e.g. 1.25)")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number > 0 (e.g. 1.25)")


def check_routings(routings: Mapping[str, Tensor], num_experts: int) -> None:
    """``routings``: a non-empty dict {name: top_k_index [T, K]} of expert ids in [0, num_experts),
    else a clear error naming ``routings[name]``."""
    if not isinstance(routings, Mapping) or not routings:
        raise ValueError(
            f"routings={routings!r:.60} is not allowed: pass a non-empty dict {{name: top_k_index [T, K]}}"
        )
    for name, idx in routings.items():
        label = f"routings[{name!r}]"
        check_expert_ids(idx, num_experts, label, check_range=False)
        if idx.dim() != 2:
            raise ValueError(f"{label} has shape {tuple(idx.shape)}: expected [tokens, top_k]")
        check_expert_ids(idx, num_experts, label)


# ---- the pictures --------------------------------------------------------------------------------


def _expert_colors(num_experts: int) -> list[str]:
    return [PALETTE[e % len(PALETTE)] for e in range(num_experts)]


def plot_permutation(top_k_index: Tensor, num_experts: int, top_k_weights: Tensor | None = None) -> Figure:
    """Dispatch and combine as a picture: the T*K (token, slot) pairs in token order (left), sorted
    by expert into contiguous blocks (middle), and scatter-added back to their tokens (right, line
    width = combine weight)."""
    _check_index(top_k_index, num_experts)
    t, k = top_k_index.shape
    if t * k > 64:
        raise ValueError(f"top_k_index has {t * k} pairs: at most 64 fit in a readable picture")
    if top_k_weights is not None and (
        not isinstance(top_k_weights, Tensor) or top_k_weights.shape != top_k_index.shape
    ):
        got = (
            tuple(top_k_weights.shape) if isinstance(top_k_weights, Tensor) else type(top_k_weights).__name__
        )
        raise ValueError(f"top_k_weights has shape {got}: expected the shape of top_k_index, {(t, k)}")
    plan = plan_dispatch(top_k_index.cpu(), num_experts)
    flat = to_numpy(top_k_index).reshape(-1).astype(int)  # [T*K]
    order = to_numpy(plan.order).astype(int)
    weights = None if top_k_weights is None else to_numpy(top_k_weights).reshape(-1)
    colors = _expert_colors(num_experts)
    box_alpha = 0.85

    n = t * k
    fig, ax = plt.subplots(figsize=(11, max(4.0, 0.3 * n + 1.2)), layout="constrained")
    x_in, x_sorted, x_out = 0.0, 4.0, 8.0
    y_pair = lambda i: n - 1 - i  # noqa: E731
    y_tok = lambda tok: (n - 1) - (tok + 0.5) * k + 0.5  # noqa: E731
    for i in range(n):
        tok, slot = divmod(i, k)
        e = flat[i]
        ax.add_patch(plt.Rectangle((x_in - 0.9, y_pair(i) - 0.4), 1.8, 0.8, color=colors[e], alpha=box_alpha))
        label = f"t{tok}·k{slot} → e{e}"
        ax.text(x_in, y_pair(i), label, ha="center", va="center", fontsize=9, color=ink(colors[e], box_alpha))
    for j, i in enumerate(order):
        tok, slot = divmod(int(i), k)
        e = flat[i]
        ax.add_patch(
            plt.Rectangle((x_sorted - 0.9, y_pair(j) - 0.4), 1.8, 0.8, color=colors[e], alpha=box_alpha)
        )
        label = f"t{tok}" + ("" if weights is None else f" ×{weights[i]:.2f}")
        ax.text(
            x_sorted, y_pair(j), label, ha="center", va="center", fontsize=9, color=ink(colors[e], box_alpha)
        )
        ax.plot([x_in + 0.9, x_sorted - 0.9], [y_pair(i), y_pair(j)], color=colors[e], lw=1, alpha=0.6)
        lw = 1.0 if weights is None else 0.5 + 3.0 * float(weights[i]) / max(float(weights.max()), 1e-9)
        ax.plot([x_sorted + 0.9, x_out - 0.6], [y_pair(j), y_tok(tok)], color=colors[e], lw=lw, alpha=0.6)
    offsets = to_numpy(plan.offsets).astype(int)
    for e in range(num_experts):
        start, end = offsets[e], offsets[e + 1]
        if end > start:
            top, bottom = y_pair(start) + 0.45, y_pair(end - 1) - 0.45
            ax.plot([x_sorted + 1.0] * 2, [bottom, top], color="black", lw=1)
            ax.text(
                x_sorted - 1.05,
                (top + bottom) / 2,
                f"e{e}: {end - start}",
                ha="right",
                va="center",
                fontsize=9,
            )
    for tok in range(t):
        ax.add_patch(plt.Rectangle((x_out - 0.6, y_tok(tok) - 0.4), 1.2, 0.8, color="#dddddd"))
        ax.text(x_out, y_tok(tok), f"out[{tok}]", ha="center", va="center", fontsize=9, color="black")
    for x, title in (
        (x_in, "pairs in token order\n(token·slot → expert)"),
        (x_sorted, "sorted by expert:\none block per expert"),
        (x_out, "weighted\nscatter-add"),
    ):
        ax.text(x, n + 0.2, title, ha="center", va="bottom", fontsize=11)
    ax.set_xlim(-1.2, 9.0)
    ax.set_ylim(-0.8, n + 1.6)
    ax.axis("off")
    ax.set_title(f"Dispatch and combine: {t} tokens × top-{k} of {num_experts} experts")
    return close(fig)


def plot_capacity_drops(
    top_k_index: Tensor, num_experts: int, capacity_factor: float, title: str = ""
) -> Figure:
    """Per-expert load with the capacity line: what fits (blue) and what is dropped (vermillion)."""
    _check_index(top_k_index, num_experts)
    _check_factor("capacity_factor", capacity_factor)
    t, k = top_k_index.shape
    cap, dropped = capacity_drops(top_k_index, num_experts, capacity_factor)
    load = to_numpy(torch.bincount(top_k_index.reshape(-1).cpu(), minlength=num_experts))
    kept = np.minimum(load, cap)
    pairs = t * k
    what = f"{dropped} of {pairs} pairs dropped ({dropped / pairs:.0%})" if pairs else "no pairs to route"
    title = title or f"capacity factor {capacity_factor:g}: {what}"
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    xs = np.arange(num_experts)
    ax.bar(xs, kept, color=PALETTE[0], label="processed")
    ax.bar(xs, load - kept, bottom=kept, color=PALETTE[3], label="dropped")
    ax.axhline(cap, color="black", linestyle="--", lw=1.5, label=f"capacity C = {cap}")
    ax.axhline(pairs / num_experts, color=PALETTE[2], linestyle=":", lw=1.5, label="balanced T·K/E")
    ax.set_xlabel("expert")
    ax.set_ylabel("(token, slot) pairs")
    ax.set_xticks(xs)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=9)
    return close(fig)


#: (line style, marker) of the routings past each 8 (the palette's colours repeat).
_LINE_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]


def plot_dropped_vs_capacity(
    routings: dict[str, Tensor], num_experts: int, capacity_factors: Sequence[float] | None = None
) -> Figure:
    """Fraction of pairs dropped against the capacity factor, one line per routing (past 8 routings
    the colours repeat with another line style and marker)."""
    check_routings(routings, num_experts)
    most = len(PALETTE) * len(_LINE_STYLES)
    if len(routings) > most:
        raise ValueError(
            f"routings holds {len(routings)} routings: at most {most} lines can be told apart in one figure"
        )
    for name, idx in routings.items():
        if idx.numel() == 0:
            raise ValueError(
                f"routings[{name!r}] has shape {tuple(idx.shape)}: it holds no (token, slot) pairs, so no "
                "fraction of them can be dropped"
            )
    if capacity_factors is None:
        factors = [float(f) for f in np.linspace(0.5, 3.0, 26)]
    elif isinstance(capacity_factors, (str, bytes)) or not isinstance(capacity_factors, Sequence):
        raise TypeError(
            f"capacity_factors={capacity_factors!r:.60} is not allowed: pass a list of numbers > 0"
        )
    else:
        factors = list(capacity_factors)
    if not factors:
        raise ValueError(
            "capacity_factors is empty: pass at least one capacity factor, e.g. [1.0, 1.25, 2.0]"
        )
    for f in factors:
        _check_factor("capacity_factors", f)
    lines = {name: dropped_fraction(idx, num_experts, factors) for name, idx in routings.items()}
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    for i, (name, fractions) in enumerate(lines.items()):
        style, marker = _LINE_STYLES[i // len(PALETTE)]
        ax.plot(
            factors,
            fractions,
            linestyle=style,
            marker=marker,
            ms=3 if marker == "o" else 4,
            color=PALETTE[i % len(PALETTE)],
            label=name,
        )
    for f, style in ((1.0, ":"), (1.25, "--")):
        ax.axvline(f, color="gray", linestyle=style, lw=1)
        ax.text(f, 1.0, f" {f:g}", color="gray", va="top", fontsize=9)
    ax.set_xlabel("capacity factor (C = factor · T·K / E)")
    ax.set_ylabel("fraction of (token, slot) pairs dropped")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Token dropping: capacity-limited layers lose tokens when routing is uneven")
    ax.legend()
    return close(fig)


def plot_dispatch_memory(
    num_experts: int = 64,
    top_k: int = 8,
    capacity_factor: float = 1.25,
    token_counts: Sequence[int] | None = None,
) -> Figure:
    """Routing bookkeeping memory against batch size: [T, E, C] masks grow as T², sorted indices as T."""
    if token_counts is None:
        counts = [2**p for p in range(6, 17)]
    elif isinstance(token_counts, (str, bytes)) or not isinstance(token_counts, Sequence) or not token_counts:
        raise ValueError(
            f"token_counts={token_counts!r:.60} is not allowed: pass a non-empty list of batch sizes, e.g. [64, 1024]"
        )
    else:
        counts = [
            check_int(f"token_counts[{i}]", t, 1, what=" (a batch size, drawn on a log axis)")
            for i, t in enumerate(token_counts)
        ]
    masks = [dispatch_memory(t, num_experts, top_k, capacity_factor)["capacity masks"] for t in counts]
    sorted_idx = [dispatch_memory(t, num_experts, top_k, capacity_factor)["sorted indices"] for t in counts]
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    ax.loglog(counts, masks, marker="o", color=PALETTE[3], label="[T, E, C] dispatch + combine masks")
    ax.loglog(counts, sorted_idx, marker="s", color=PALETTE[0], label="sorted indices (order, token, expert)")
    for gb, name in ((2**20, "1 MiB"), (2**30, "1 GiB")):
        ax.axhline(gb, color="gray", lw=0.8, linestyle=":")
        ax.text(counts[0], gb, name, color="gray", va="bottom", fontsize=9)
    ax.set_xlabel("tokens in the batch T")
    ax.set_ylabel("bytes")
    ax.set_title(f"Routing bookkeeping, E={num_experts}, K={top_k}, capacity factor {capacity_factor:g}")
    ax.legend()
    return close(fig)
