"""Figures for lessons 01–04: routing heatmaps with load bars, the capacity calculator, diagrams.

Every function returns a closed matplotlib ``Figure`` (see :func:`glm4moe_lib.viz.core.close`), so a
notebook shows it once by ending a cell with it; the widgets in :mod:`glm4moe_lib.widgets.routing`
redraw the same figures.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from ..config import check_int
from ..dispatch import check_expert_ids
from ..router import RouterOutput
from .core import CMAP, PALETTE, close, heatmap, load_bars, to_numpy

SHOW_CHOICES = ("weights", "scores")


def dense_weights(topk_weights: torch.Tensor, topk_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter the [T, K] routing weights into a [T, E] matrix (zero for experts not chosen)."""
    check_expert_ids(topk_indices, num_experts, "topk_indices")
    if topk_indices.dim() != 2:
        raise ValueError(f"topk_indices has shape {tuple(topk_indices.shape)}: expected [tokens, K]")
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != topk_indices.shape:
        shape = (
            tuple(topk_weights.shape)
            if isinstance(topk_weights, torch.Tensor)
            else type(topk_weights).__name__
        )
        raise ValueError(
            f"topk_weights has shape {shape}: it must match topk_indices {tuple(topk_indices.shape)}"
        )
    t = topk_indices.shape[0]
    out = torch.zeros(t, num_experts, dtype=torch.float32, device=topk_indices.device)  # [T, E]
    return out.scatter_add_(1, topk_indices.long(), topk_weights.float())


def _check_routing(routing: RouterOutput) -> tuple[int, int, int]:
    if not isinstance(routing, RouterOutput):
        raise ValueError(
            f"routing={type(routing).__name__} is not allowed: pass the RouterOutput that route() "
            "or TopkRouter returns"
        )
    if routing.scores.dim() != 2 or routing.topk_indices.dim() != 2:
        raise ValueError(
            f"routing has scores of shape {tuple(routing.scores.shape)} and topk_indices of shape "
            f"{tuple(routing.topk_indices.shape)}: expected [tokens, experts] and [tokens, K]"
        )
    t, e = routing.scores.shape
    return t, e, routing.topk_indices.shape[1]


def plot_routing(
    routing: RouterOutput,
    tokens: Sequence[str] | None = None,
    *,
    show: str = "weights",
    title: str | None = None,
    max_tokens: int = 64,
) -> Figure:
    """Heatmap of the routing (tokens × experts) with the per-expert load bar chart beside it.

    ``show="weights"`` draws the combine weights (zero where an expert was not chosen);
    ``show="scores"`` draws every score and marks the chosen experts with a white dot. The bars
    count how many tokens each expert received, with the balanced level ``T·K/E`` dashed.
    """
    t, e, k = _check_routing(routing)
    if show not in SHOW_CHOICES:
        raise ValueError(f"show={show!r} is not allowed: use one of {SHOW_CHOICES}")
    if tokens is not None and len(tokens) != t:
        raise ValueError(f"tokens has {len(tokens)} labels but the routing has {t} tokens: they must match")
    if t > max_tokens:
        raise ValueError(
            f"routing has {t} tokens: at most max_tokens={max_tokens} fit in a readable heatmap "
            "(slice the tokens or raise max_tokens)"
        )
    weights = dense_weights(routing.topk_weights, routing.topk_indices, e)  # [T, E]
    data = weights if show == "weights" else routing.scores
    load = torch.bincount(routing.topk_indices.reshape(-1).cpu(), minlength=e)  # [E]

    height = max(3.5, 0.28 * t + 1.6)
    fig, (ax_map, ax_load) = plt.subplots(
        1, 2, figsize=(11, height), gridspec_kw={"width_ratios": [1.5, 1]}, layout="constrained"
    )
    label = "combine weight" if show == "weights" else "score"
    im = heatmap(
        ax_map,
        data,
        xlabel="expert",
        ylabel="token",
        title=title or f"Routing: top-{k} of {e} experts ({label})",
        vmin=0.0,
        yticklabels=list(tokens) if tokens is not None else None,
    )
    im.colorbar.set_label(label)
    if show == "scores":
        rows = np.repeat(np.arange(t), k)
        cols = to_numpy(routing.topk_indices).reshape(-1)
        ax_map.scatter(cols, rows, s=18, c="white", edgecolors="black", linewidths=0.5, label="chosen")
    if e <= 32:
        ax_map.set_xticks(range(e))
    load_bars(ax_load, load, title="Tokens per expert", ideal=t * k / e)
    if e <= 32:
        ax_load.set_xticks(range(e))
    return close(fig)


# ---- capacity vs compute (lesson 01) ---------------------------------------------------------------


def capacity_numbers(
    num_experts: int, top_k: int, hidden_size: int, expert_size: int, dense_size: int | None = None
) -> dict[str, float]:
    """Parameters and per-token FLOPs of one SwiGLU MoE layer (router + E experts, K active).

    ``dense_size`` is the width of the dense FFN it is compared with (default: one expert's width).
    A SwiGLU FFN of width I has 3·H·I weights and costs 2·3·H·I FLOPs per token (one multiply-add
    per weight); the router adds E·H weights and 2·E·H FLOPs.
    """
    num_experts = check_int("num_experts", num_experts, 1)  # (numpy integers too: a slider's value)
    top_k = check_int("top_k", top_k, 1, num_experts, what=" (at most num_experts)")
    hidden_size = check_int("hidden_size", hidden_size, 1)
    expert_size = check_int("expert_size", expert_size, 1)
    dense_size = expert_size if dense_size is None else check_int("dense_size", dense_size, 1)
    expert = 3 * hidden_size * expert_size
    router = num_experts * hidden_size
    dense = 3 * hidden_size * dense_size
    out = {
        "dense_params": dense,
        "moe_total_params": router + num_experts * expert,
        "moe_active_params": router + top_k * expert,
        "dense_flops": 2 * dense,
        "moe_active_flops": 2 * (router + top_k * expert),
        "moe_all_experts_flops": 2 * (router + num_experts * expert),
    }
    out["param_ratio"] = out["moe_total_params"] / dense
    out["flop_ratio"] = out["moe_active_flops"] / out["dense_flops"]
    return out


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def plot_capacity(
    num_experts: int = 8,
    top_k: int = 2,
    hidden_size: int = 1024,
    expert_size: int = 2816,
    dense_size: int | None = None,
) -> Figure:
    """Total vs active parameters and per-token FLOPs: one dense FFN against an MoE layer."""
    n = capacity_numbers(num_experts, top_k, hidden_size, expert_size, dense_size)
    fig, (ax_p, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    names = ["dense FFN", "MoE total", "MoE active"]
    params = [n["dense_params"], n["moe_total_params"], n["moe_active_params"]]
    colors = [PALETTE[7], PALETTE[0], PALETTE[1]]
    bars = ax_p.bar(names, params, color=colors)
    ax_p.bar_label(bars, labels=[_human(v) for v in params])
    ax_p.set_ylabel("parameters")
    ax_p.set_title(f"Capacity: {n['param_ratio']:.1f}x the dense FFN's parameters")
    names_f = ["dense FFN", f"MoE (top-{top_k})", "all experts"]
    flops = [n["dense_flops"], n["moe_active_flops"], n["moe_all_experts_flops"]]
    bars = ax_f.bar(names_f, flops, color=[PALETTE[7], PALETTE[1], PALETTE[5]])
    ax_f.bar_label(bars, labels=[_human(v) for v in flops])
    ax_f.set_ylabel("FLOPs per token")
    ax_f.set_title(f"Compute: {n['flop_ratio']:.2f}x the dense FFN's FLOPs")
    for ax in (ax_p, ax_f):
        ax.margins(y=0.15)
    fig.suptitle(
        f"E={num_experts} experts, top-K={top_k}, H={hidden_size}, expert width I={expert_size}, "
        f"dense width={n['dense_params'] // (3 * hidden_size)}"
    )
    return close(fig)


# ---- diagrams (lesson 02) --------------------------------------------------------------------------


def _box(ax, x, y, w, h, text, color, fontsize=11, text_color="black"):
    ax.add_patch(
        FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02", fc=color, ec="black", lw=1.2)
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=text_color)


def _arrow(ax, xy_from, xy_to, color="black", lw=1.5, style="-|>"):
    ax.add_patch(FancyArrowPatch(xy_from, xy_to, arrowstyle=style, mutation_scale=14, color=color, lw=lw))


def plot_moe_diagram(
    num_experts: int = 8,
    chosen: Sequence[int] = (1, 5),
    weights: Sequence[float] | None = None,
    *,
    scoring: str = "sigmoid",
    shared: bool = True,
) -> Figure:
    """The MoE layer as a figure: router -> top-K experts -> weighted sum (+ shared expert).

    The chosen experts are coloured and get an arrow labelled with their weight; the others are grey.
    """
    num_experts = check_int("num_experts", num_experts, 2, 16, what=" (the experts drawn)")
    if isinstance(chosen, torch.Tensor):
        chosen = chosen.tolist()  # (a [K] row of topk_indices)
    if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Iterable):
        raise TypeError(f"chosen={chosen!r:.60} is not allowed: pass a sequence of expert ids, e.g. (1, 5)")
    chosen = list(chosen)
    if any(isinstance(c, bool) or not isinstance(c, numbers.Integral) for c in chosen):
        raise TypeError(f"chosen={chosen!r:.60} is not allowed: expert ids must be integers")
    if not chosen or any(not 0 <= c < num_experts for c in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"chosen={chosen!r} is not allowed: give distinct experts in [0, {num_experts})")
    if weights is not None and len(weights) != len(chosen):
        raise ValueError(f"weights has {len(weights)} values but chosen has {len(chosen)}: they must match")
    score_name = {"softmax": "Softmax", "sigmoid": "Sigmoid (+ bias to pick)"}.get(scoring)
    if score_name is None:
        raise ValueError(f"scoring={scoring!r} is not allowed: use 'softmax' or 'sigmoid'")
    fig, ax = plt.subplots(figsize=(11, 6.2), layout="constrained")
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 10)
    ax.axis("off")
    _box(ax, 6, 9.3, 3.6, 0.7, "token hidden state x  [H]", "#e8e8e8")
    _box(ax, 6, 7.6, 4.6, 1.0, f"Router\nLinear(H→E) + {score_name} → top-{len(chosen)}", PALETTE[5])
    _arrow(ax, (6, 8.95), (6, 8.12))
    xs = np.linspace(1.0, 11.0 if not shared else 9.4, num_experts)
    y_exp = 5.0
    w_box = min(1.0, 0.8 * (xs[1] - xs[0]))
    for e, x in enumerate(xs):
        on = e in chosen
        _box(
            ax,
            x,
            y_exp,
            w_box,
            1.2,
            f"E{e}\nFFN" if w_box > 0.7 else f"E{e}",
            PALETTE[1] if on else "#d9d9d9",
            fontsize=10 if w_box > 0.7 else 8,
        )
        if on:
            i = chosen.index(e)
            _arrow(ax, (6, 7.08), (x, y_exp + 0.62), color=PALETTE[3], lw=2)
            _arrow(ax, (x, y_exp - 0.62), (6, 2.62), color=PALETTE[3], lw=2)
            if weights is not None:
                ax.text(x + 0.1, 3.55, f"w={weights[i]:.2f}", fontsize=10, color=PALETTE[3], ha="left")
    if shared:
        _box(ax, 11.0, y_exp, 1.5, 1.2, "shared\nexpert", PALETTE[2])
        _arrow(ax, (7.8, 9.3), (11.0, y_exp + 0.62), color=PALETTE[2], lw=2)
        _arrow(ax, (11.0, y_exp - 0.62), (8.25, 2.2), color=PALETTE[2], lw=2)
    ax.text(
        xs[0] - 0.5,
        y_exp + 1.0,
        f"{num_experts} routed experts (SwiGLU FFNs): only the chosen ones run",
        fontsize=10,
        ha="left",
    )
    total = "Σ_k w_k · expert_k(x)" + (" + shared(x)" if shared else "")
    _box(ax, 6, 2.1, 4.4, 0.95, f"weighted sum\n{total}", "#fff2cc")
    _arrow(ax, (6, 1.6), (6, 0.75))
    ax.text(6, 0.45, "output  [H]", ha="center", fontsize=11)
    return close(fig)


def plot_decoder_stack(
    num_hidden_layers: int, first_k_dense_replace: int, *, name: str = "", num_mtp_layers: int = 0
) -> Figure:
    """One coloured cell per decoder layer: dense-FFN layers first, then MoE layers (and MTP)."""
    num_hidden_layers = check_int("num_hidden_layers", num_hidden_layers, 1)
    first_k_dense_replace = check_int(
        "first_k_dense_replace",
        first_k_dense_replace,
        0,
        num_hidden_layers,
        what=" (at most num_hidden_layers)",
    )
    num_mtp_layers = check_int("num_mtp_layers", num_mtp_layers, 0)
    n = num_hidden_layers + num_mtp_layers
    kinds = np.array([0] * first_k_dense_replace + [1] * (num_hidden_layers - first_k_dense_replace))
    kinds = np.concatenate([kinds, np.full(num_mtp_layers, 2)])
    colors = [PALETTE[7], PALETTE[0], PALETTE[4]]
    fig, ax = plt.subplots(figsize=(11, 1.9), layout="constrained")
    for i, kind in enumerate(kinds):
        ax.add_patch(plt.Rectangle((i, 0), 0.9, 1, color=colors[kind]))
    ax.set_xlim(-0.5, n + 0.5)
    ax.set_ylim(-0.1, 1.1)
    ax.set_yticks([])
    ax.set_xlabel("layer index")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors[: 3 if num_mtp_layers else 2]]
    labels = [
        f"dense FFN ({first_k_dense_replace})",
        f"MoE ({num_hidden_layers - first_k_dense_replace})",
        f"MTP ({num_mtp_layers})",
    ][: len(handles)]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, frameon=False)
    ax.set_title(f"{name} decoder layers" if name else "decoder layers")
    return close(fig)


def plot_gate_effect(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> Figure:
    """What the gate does: act(gate) (left), up (middle) and their product (right), per unit.

    gate, up: [N, I] pre-activations of one expert on N tokens.
    """
    for name, value in (("gate", gate), ("up", up)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}={type(value).__name__} is not allowed: pass a [N, I] tensor")
    if gate.shape != up.shape or gate.dim() != 2 or gate.numel() == 0:
        raise ValueError(
            f"gate has shape {tuple(gate.shape)} and up {tuple(up.shape)}: both must be the same [N, I], non-empty"
        )
    acts = {"silu": torch.nn.functional.silu, "relu": torch.relu, "gelu": torch.nn.functional.gelu}
    if act not in acts:
        raise ValueError(f"act={act!r} is not allowed: use one of {sorted(acts)}")
    a = acts[act](gate.float())
    prod = a * up.float()
    lim = float(max(up.abs().max(), prod.abs().max()))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), layout="constrained")
    heatmap(axes[0], a, title=f"{act}(gate)", xlabel="hidden unit", ylabel="token", cmap=CMAP)
    heatmap(axes[1], up, title="up", xlabel="hidden unit", cmap="PuOr", vmin=-lim, vmax=lim)
    heatmap(axes[2], prod, title=f"{act}(gate) · up", xlabel="hidden unit", cmap="PuOr", vmin=-lim, vmax=lim)
    return close(fig)
