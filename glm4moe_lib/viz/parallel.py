"""Figures for lesson 09: expert parallelism (which token goes where, traffic, load, bytes).

Every ``plot_*`` returns a closed figure (shown once by the notebook). Ranks are coloured with the
Okabe–Ito palette (rank r: ``PALETTE[r]``), so a rank keeps its colour in every figure.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from ..config import MoEConfig
from ..dispatch import check_expert_ids
from ..parallel import check_world_size, comm_bytes_per_token
from .core import PALETTE, close, heatmap, ink, to_numpy


def rank_color(rank: int) -> str:
    """The colour of a rank in every lesson-09 figure."""
    return PALETTE[rank % len(PALETTE)]


def _rank_legend(world_size: int) -> list[Patch]:
    return [Patch(color=rank_color(r), label=f"rank {r}") for r in range(world_size)]


def plot_token_routes(
    topk_indices_per_rank: Sequence[Tensor],
    num_experts: int,
    world_size: int,
    keep_per_rank: Sequence[Tensor] | None = None,
) -> Figure:
    """One panel per source rank: each token's K choices, coloured by the rank that owns the expert.

    The number in a cell is the expert id; a grey cell with a cross is a dropped pair.
    """
    e_local = check_world_size(num_experts, world_size)
    if isinstance(topk_indices_per_rank, Tensor) or len(topk_indices_per_rank) != world_size:
        raise ValueError(
            f"topk_indices_per_rank must hold one [T, K] tensor per rank: world_size={world_size}, got "
            f"{'a tensor' if isinstance(topk_indices_per_rank, Tensor) else len(topk_indices_per_rank)}"
        )
    for src, idx in enumerate(topk_indices_per_rank):
        check_expert_ids(idx, num_experts, f"topk_indices_per_rank[{src}]")
        if idx.dim() != 2:
            raise ValueError(f"topk_indices_per_rank[{src}] has shape {tuple(idx.shape)}: expected [T, K]")
        if keep_per_rank is not None and (
            len(keep_per_rank) != world_size or tuple(keep_per_rank[src].shape) != tuple(idx.shape)
        ):
            raise ValueError(
                f"keep_per_rank must hold one mask per rank, each of its topk_indices' shape {tuple(idx.shape)}"
            )
    fig, axes = plt.subplots(1, world_size, figsize=(1.0 + 2.6 * world_size, 4.2), squeeze=False)
    for src, ax in enumerate(axes[0]):
        idx = to_numpy(topk_indices_per_rank[src]).astype(int)  # [T, K]
        keep = np.ones_like(idx, dtype=bool) if keep_per_rank is None else to_numpy(keep_per_rank[src]) > 0
        tokens, top_k = idx.shape if idx.ndim == 2 else (0, 1)
        for t in range(tokens):
            for k in range(top_k):
                owner = idx[t, k] // e_local
                color = rank_color(owner) if keep[t, k] else "#BBBBBB"
                ax.add_patch(plt.Rectangle((k, t), 0.94, 0.9, color=color))
                label = str(idx[t, k]) if keep[t, k] else f"×{idx[t, k]}"
                ax.text(k + 0.47, t + 0.45, label, ha="center", va="center", fontsize=9, color=ink(color))
        ax.set_xlim(0, top_k)
        ax.set_ylim(max(tokens, 1), 0)
        ax.set_xticks([k + 0.47 for k in range(top_k)], labels=[f"choice {k + 1}" for k in range(top_k)])
        ax.set_yticks(
            [t + 0.45 for t in range(tokens)] if tokens <= 16 else [],
            labels=[str(t) for t in range(tokens)] if tokens <= 16 else [],
        )
        ax.set_ylabel("token" if src == 0 else "")
        ax.set_title(f"tokens on rank {src}", color=rank_color(src))
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
        ax.tick_params(length=0)
    fig.legend(handles=_rank_legend(world_size), loc="lower center", ncol=world_size, frameon=False)
    fig.suptitle("Where each (token, choice) goes\ncolour = rank that owns the expert (the number)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return close(fig)


def plot_traffic_matrix(matrix, title: str = "All-to-all traffic (rows)", unit: str = "rows") -> Figure:
    """Heatmap of the [W, W] send matrix: row = sender, column = receiver; the diagonal stays local."""
    arr = to_numpy(matrix)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.size == 0:
        raise ValueError(f"matrix has shape {arr.shape}: expected a square [W, W] send matrix")
    world = arr.shape[0]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * world, 1.2 + 0.9 * world))
    labels = [str(r) for r in range(world)]
    heatmap(
        ax, arr, xlabel="to rank", ylabel="from rank", title=title, xticklabels=labels, yticklabels=labels
    )
    top = arr.max() if arr.size else 0
    for s in range(world):
        for d in range(world):
            value = arr[s, d]
            text = f"{value:.0f}" + ("\n(local)" if s == d else "")
            color = "black" if top and value > 0.6 * top else "white"
            ax.text(d, s, text, ha="center", va="center", fontsize=9, color=color)
    ax.figure.axes[-1].set_ylabel(unit)
    fig.tight_layout()
    return close(fig)


def plot_rank_load(stats: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Left: rows per expert, coloured by owning rank; right: rows sent / received / computed per rank.

    ``stats`` is one :meth:`EPStats.to_dict` per rank, in rank order.
    """
    if not isinstance(stats, Sequence) or not stats:
        raise ValueError(
            f"stats={stats!r:.60} is not allowed: pass one EPStats.to_dict() per rank, in rank order"
        )
    keys = ("expert_load", "tokens_sent", "tokens_received", "remote_sent")
    for r, s in enumerate(stats):
        if not isinstance(s, dict) or any(k not in s for k in keys):
            raise ValueError(f"stats[{r}] is not allowed: every rank's dict needs the keys {keys}")
        if len(s["expert_load"]) != len(stats[0]["expert_load"]) or not len(s["expert_load"]):
            raise ValueError(
                f"stats[{r}]['expert_load'] has {len(s['expert_load'])} experts: every rank must hold the "
                f"same number (> 0), rank 0 holds {len(stats[0]['expert_load'])}"
            )
    world = len(stats)
    load = [v for s in stats for v in s["expert_load"]]
    e_local = len(stats[0]["expert_load"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    colors = [rank_color(e // e_local) for e in range(len(load))]
    ax1.bar(np.arange(len(load)), load, color=colors)
    ax1.axhline(np.mean(load) if load else 0, color="black", linestyle="--", linewidth=1.5, label="balanced")
    ax1.set_xlabel("expert")
    ax1.set_ylabel("rows computed")
    ax1.set_title("Load per expert (colour = owning rank)")
    ax1.legend(handles=[*_rank_legend(world), ax1.get_lines()[0]], loc="upper right", fontsize=9)
    x = np.arange(world)
    width = 0.27
    sent = [s["tokens_sent"] for s in stats]
    received = [s["tokens_received"] for s in stats]
    ax2.bar(x - width, sent, width, color=PALETTE[5], label="sent")
    ax2.bar(x, received, width, color=PALETTE[1], label="received (= computed)")
    ax2.bar(x + width, [s["remote_sent"] for s in stats], width, color=PALETTE[2], label="sent off-rank")
    ax2.set_xticks(x, labels=[f"rank {r}" for r in range(world)])
    ax2.set_ylabel("rows")
    ax2.set_title("Per rank")
    ax2.legend(loc="upper right", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return close(fig)


def plot_comm_volume(
    world_sizes: Sequence[int], measured: Sequence[float], formula: Sequence[float]
) -> Figure:
    """Measured off-rank bytes per rank (one dispatch) next to the uniform-routing formula."""
    if not (len(world_sizes) == len(measured) == len(formula)) or not len(world_sizes):
        raise ValueError(
            f"world_sizes, measured and formula must be non-empty and of one length, got {len(world_sizes)}, "
            f"{len(measured)} and {len(formula)}"
        )
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(len(world_sizes))
    ax.bar(x - 0.18, measured, 0.36, color=PALETTE[0], label="measured (mean over ranks)")
    ax.bar(x + 0.18, formula, 0.36, color=PALETTE[1], label="formula T·K·H·bytes·(W−1)/W")
    ax.set_xticks(x, labels=[f"W = {w}" for w in world_sizes])
    ax.set_ylabel("bytes leaving one rank")
    ax.set_title("Dispatch volume: measured vs formula")
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    return close(fig)


#: The usual element type of each element size, for figure titles.
_DTYPE_NAMES = {1: "fp8", 2: "bf16", 4: "fp32"}


def plot_scale(
    config: MoEConfig, world_sizes: Sequence[int], elem_size: int = 2, name: str = "GLM-4.5"
) -> Figure:
    """All-to-all bytes per token per MoE layer (forward: dispatch + combine) against the EP degree,
    one row sent per remote (token, expert) pair, as :class:`~glm4moe_lib.parallel.EPMoE` does;
    ``elem_size`` bytes per element (2: bf16, 4: fp32, 1: fp8), named in the title."""
    if not len(world_sizes):
        raise ValueError("world_sizes is empty: pass the EP degrees to plot, e.g. [1, 2, 4, 8]")
    if isinstance(elem_size, bool) or not isinstance(elem_size, numbers.Real) or not 0 < elem_size < math.inf:
        raise ValueError(
            f"elem_size={elem_size!r} is not allowed: it must be the bytes per element, a number > 0"
        )
    dtype = _DTYPE_NAMES.get(elem_size, f"{elem_size:g}-byte elements")
    rows = [comm_bytes_per_token(config, w, elem_size) for w in world_sizes]
    fwd = [r["forward"] / 1024 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(world_sizes, fwd, "o-", color=PALETTE[0], label="forward (dispatch + combine), per pair")
    ax.plot(world_sizes, [2 * f for f in fwd], "s--", color=PALETTE[3], label="training step (+ backward)")
    limit = 2 * config.num_experts_per_tok * config.hidden_size * elem_size / 1024
    ax.axhline(limit, color="grey", linestyle=":", label=f"forward limit 2·K·H·bytes = {limit:.0f} KiB")
    ax.set_xscale("log", base=2)
    labels = [f"{w}\n{r['experts_per_rank']} exp." for w, r in zip(world_sizes, rows)]
    ax.set_xticks(list(world_sizes), labels=labels)
    ax.minorticks_off()
    ax.set_xlabel("GPUs sharing the experts (EP degree) and experts per GPU")
    ax.set_ylabel("KiB per token per layer")
    ax.set_ylim(0, limit * 2.3)
    ax.set_title(f"{name}: all-to-all bytes per token per MoE layer ({dtype})")
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    return close(fig)


def traffic_from_stats(stats: Sequence[dict[str, Any]]) -> Tensor:
    """The [W, W] rows matrix (sender, receiver) from the ranks' stats dicts."""
    return torch.tensor([s["sent"] for s in stats])
