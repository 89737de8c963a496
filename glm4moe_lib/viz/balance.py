"""Figures for lessons 06–07: expert load over training, MaxVio and task-loss curves, the
normalization conventions of the balancing losses, and routing load across layers.

The training figures take :class:`glm4moe_lib.lab.LabResult` objects (from
``run_balancing_experiment``); the widget in :mod:`glm4moe_lib.widgets.balance` redraws
:func:`plot_training_step`. Every function returns a closed figure (shown once by the notebook).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import torch
from matplotlib.figure import Figure

from ..balance import load_balancing_loss, sequence_balance_loss
from ..config import check_int
from ..lab import LabResult
from .core import PALETTE, close, heatmap, to_numpy

__all__ = [
    "METHOD_COLORS",
    "balance_conventions",
    "plot_balance_conventions",
    "plot_bias_trajectories",
    "plot_group_selection",
    "plot_layer_loads",
    "plot_load_grid",
    "plot_tradeoff",
    "plot_training_step",
    "relative_load",
    "run_styles",
    "smooth",
]


def _check_results(results: Mapping[str, LabResult]) -> None:
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty dict {label: LabResult} (see lab.run_sweep)")
    for name, r in results.items():
        if not isinstance(r, LabResult):
            raise ValueError(f"results[{name!r}] is a {type(r).__name__}: expected a LabResult")


def _check_result(result: LabResult) -> None:
    if not isinstance(result, LabResult):
        raise TypeError(
            f"result is a {type(result).__name__}: expected a LabResult (from lab.run_balancing_experiment, "
            "or one value of lab.run_sweep's dict)"
        )


def smooth(values: Sequence[float], window: int = 10) -> np.ndarray:
    """Trailing moving average (the first points average what is there so far); ``window`` >= 1."""
    check_int("window", window, 1, what=" (the moving average's length; 1: no smoothing)")
    arr = np.asarray(values, dtype=float)
    if window <= 1 or len(arr) == 0:
        return arr
    c = np.cumsum(np.insert(arr, 0, 0.0))
    out = np.empty_like(arr)
    for i in range(len(arr)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def relative_load(result: LabResult) -> np.ndarray:
    """[S, E] load of each expert divided by the balanced load T·K/E (1 = fair share)."""
    loads = to_numpy(result.loads)
    fair = loads.sum(1, keepdims=True) / loads.shape[1]
    return loads / np.maximum(fair, 1e-9)


def plot_training_step(result: LabResult, step: int | None = None) -> Figure:
    """Expert × step heatmap of the load (relative to the fair share), a line at ``step``, and the
    load bars and MaxVio at that step."""
    _check_result(result)
    steps = result.steps
    step = steps - 1 if step is None else step
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < steps:
        raise ValueError(f"step={step!r} is not allowed: it must be an integer in [0, {steps - 1}]")
    rel = relative_load(result)  # [S, E]
    e = rel.shape[1]
    fig, (ax_map, ax_bar) = plt.subplots(
        1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.2, 1]}, layout="constrained"
    )
    im = heatmap(
        ax_map,
        rel.T,
        xlabel="training step",
        ylabel="expert",
        title=f"{result.label}: load / fair share",
        vmin=0.0,
        vmax=float(e / result.top_k),
    )
    im.colorbar.set_label("load ÷ (T·K/E)")
    ax_map.axvline(step, color="white", lw=2)
    ax_map.axvline(step, color="black", lw=0.8, linestyle="--")
    if e <= 16:
        ax_map.set_yticks(range(e))
    colors = [PALETTE[3] if v > 1.5 else (PALETTE[5] if v < 0.5 else PALETTE[0]) for v in rel[step]]
    ax_bar.bar(np.arange(e), rel[step], color=colors)
    ax_bar.axhline(1.0, color="black", linestyle="--", lw=1.5, label="fair share")
    ax_bar.set_ylim(0, e / result.top_k * 1.05)
    ax_bar.set_xlabel("expert")
    ax_bar.set_ylabel("load ÷ fair share")
    ax_bar.set_title(f"step {step}: MaxVio = {result.max_vio[step]:.2f}")
    if e <= 16:
        ax_bar.set_xticks(range(e))
    ax_bar.legend(loc="upper right")
    return close(fig)


def plot_load_grid(results: Mapping[str, LabResult], columns: int = 3) -> Figure:
    """One expert × step heatmap per run, same colour scale, for a side-by-side comparison."""
    _check_results(results)
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns={columns!r} is not allowed: it must be a positive integer")
    n = len(results)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False, layout="constrained"
    )
    first = next(iter(results.values()))
    vmax = first.num_experts / first.top_k
    im = None
    for ax, (label, r) in zip(axes.flat, results.items()):
        im = heatmap(ax, relative_load(r).T, title=label, vmin=0, vmax=vmax, colorbar=False)
        ax.title.set_fontsize(10)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01, label="load ÷ fair share")
    return close(fig)


#: One colour per balancing method (Okabe–Ito); coefficients of one method differ by line style.
METHOD_COLORS = {
    "none": PALETTE[7],
    "aux": PALETTE[0],
    "zloss": PALETTE[4],
    "bias": PALETTE[2],
    "seq": PALETTE[3],
}
#: (line style, scatter marker) of one method's coefficients, from the largest down: solid, dashed,
#: dotted, dash-dot, then finer dash patterns (matplotlib's (offset, (on, off, ...)) form).
_LADDER: list[tuple[str | tuple, str]] = [
    ("-", "o"),
    ("--", "s"),
    (":", "^"),
    ("-.", "D"),
    ((0, (5, 1, 1, 1, 1, 1)), "v"),
    ((0, (8, 2)), "P"),
    ((0, (1, 3)), "X"),
    ((0, (4, 2, 1, 2, 1, 2, 1, 2)), "*"),
]


def _run_ladder(results: Mapping[str, LabResult]) -> dict[str, tuple[str, str | tuple, str]]:
    """(colour, line style, marker) per run; see :func:`run_styles`."""
    out: dict[str, tuple[str, str | tuple, str]] = {}
    by_method: dict[str, list[tuple[float, str]]] = {}
    for label, r in results.items():
        by_method.setdefault(r.method, []).append((r.coef, label))
    for method, runs in by_method.items():
        if len(runs) > len(_LADDER):
            raise ValueError(
                f"results holds {len(runs)} runs of method {method!r}: at most {len(_LADDER)} coefficients of "
                "one method get distinct line styles"
            )
        runs.sort(key=lambda run: run[0], reverse=True)  # largest coefficient first: solid
        for (_, label), (style, marker) in zip(runs, _LADDER):
            out[label] = (METHOD_COLORS.get(method, PALETTE[5]), style, marker)
    return out


def run_styles(results: Mapping[str, LabResult]) -> dict[str, tuple[str, str | tuple]]:
    """(colour, line style) per run: colour by method; within a method every coefficient gets its
    own style, solid for the largest, then dashed, dotted, dash-dot and finer dash patterns for
    smaller ones (at most 8 coefficients per method)."""
    _check_results(results)
    return {label: (color, style) for label, (color, style, _) in _run_ladder(results).items()}


def plot_tradeoff(results: Mapping[str, LabResult], window: int = 10) -> Figure:
    """MaxVio and task loss over training (moving averages), and the end-of-training trade-off:
    held-out MaxVio (MaxVio_global) against held-out task loss. Colour = method, line style =
    coefficient (solid = the largest); ``window`` is the moving average's length (1: raw)."""
    _check_results(results)
    check_int("window", window, 1, what=" (the moving average's length; 1: no smoothing)")
    styles = _run_ladder(results)
    fig, (ax_v, ax_l, ax_s) = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    for label, r in results.items():
        color, style, marker = styles[label]
        ax_v.plot(smooth(r.max_vio, window), color=color, linestyle=style, lw=1.8, label=label)
        ax_l.plot(smooth(r.task_loss, window), color=color, linestyle=style, lw=1.8, label=label)
        ax_s.scatter(
            r.eval_max_vio,
            r.eval_task_loss,
            color=color,
            marker=marker,
            s=70,
            edgecolors="black",
            zorder=3,
        )
        tag = "none" if r.method == "none" else f"{r.coef:g}"
        ax_s.annotate(
            tag, (r.eval_max_vio, r.eval_task_loss), fontsize=8, xytext=(5, 3), textcoords="offset points"
        )
    first = next(iter(results.values()))
    worst = first.num_experts / first.top_k - 1
    ax_v.axhline(worst, color="gray", linestyle=":", lw=1)
    ax_v.text(first.steps - 1, worst, "total collapse ", color="gray", ha="right", va="top", fontsize=9)
    ax_v.set_xlabel("training step")
    ax_v.set_ylabel(f"MaxVio (moving average of {window})")
    ax_v.set_title("Imbalance during training")
    ax_v.set_ylim(0, (worst if worst > 0 else 1.0) * 1.05)  # (worst 0, e.g. K = E: MaxVio is always 0)
    ax_l.set_xlabel("training step")
    ax_l.set_ylabel(f"task loss (moving average of {window})")
    ax_l.set_yscale("log")
    ax_l.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
    ax_l.yaxis.set_minor_formatter(mticker.FormatStrFormatter("%g"))
    ax_l.tick_params(axis="y", which="minor", labelsize=8)
    ax_l.set_title("Task loss (log scale)")
    ax_s.set_xlabel("MaxVio on held-out tokens")
    ax_s.set_ylabel("task loss on held-out tokens")
    ax_s.set_title(
        "After training: lower-left is better\n(colour = method, label = coefficient)", fontsize=11
    )
    ax_s.margins(0.15)
    handles, labels = ax_v.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=9)
    return close(fig)


def plot_bias_trajectories(result: LabResult) -> Figure:
    """The selection bias of every expert over training (auxiliary-loss-free balancing).

    One Okabe–Ito colour per expert (qualitative, colour-blind-safe: a sequential colormap makes
    neighbouring experts indistinguishable); past 8 experts the colours repeat with another line style.
    """
    _check_result(result)
    bias = to_numpy(result.bias)  # [S, E]
    rel0 = relative_load(result)[0]
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    e = bias.shape[1]
    styles = ["-", "--", ":", "-."]
    for j in range(e):
        ax.plot(
            bias[:, j],
            color=PALETTE[j % len(PALETTE)],
            linestyle=styles[(j // len(PALETTE)) % len(styles)],
            lw=1.8,
            label=f"e{j} (start {rel0[j]:.1f}×)",
        )
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("e_score_correction_bias")
    ax.set_title(f"{result.label}\noverloaded experts are pushed down, starved ones up")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="expert (start load)")
    return close(fig)


def balance_conventions(
    num_experts: int = 8, top_ks: Sequence[int] = (1, 2, 4, 8), tokens: int = 512
) -> dict:
    """The two losses for uniform routing (equal logits, ties broken so the picks are spread
    evenly) at several top-K: Switch/transformers' ``E·Σ f·P`` (uniform gives K) and DeepSeek's
    sequence-wise loss (uniform gives 1)."""
    for name, value in (("num_experts", num_experts), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")
    if isinstance(top_ks, (str, bytes)) or not isinstance(top_ks, Sequence) or not top_ks:
        raise ValueError(f"top_ks={top_ks!r} is not allowed: give a non-empty list of top-K values")
    for k in top_ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(
                f"top_ks={tuple(top_ks)!r} is not allowed: every top-K must be an integer in "
                f"[1, num_experts={num_experts}]"
            )
    out: dict[str, list[float]] = {
        "top_k": list(top_ks),
        "transformers (E·Σ f·P)": [],
        "DeepSeek-V3 sequence-wise": [],
    }
    # tiny token-dependent offsets spread the top-K picks evenly over the experts
    base = torch.arange(tokens)[:, None] - torch.arange(num_experts)[None, :]  # [T, E]
    logits = 1e-6 * (-(base % num_experts)).float()  # [T, E], softmax still uniform to 1e-6
    for k in top_ks:
        idx = logits.topk(k, dim=-1).indices
        out["transformers (E·Σ f·P)"].append(round(float(load_balancing_loss(logits, k)), 3))
        out["DeepSeek-V3 sequence-wise"].append(
            round(float(sequence_balance_loss(logits.sigmoid(), idx, 1)), 3)
        )
    return out


def plot_balance_conventions(num_experts: int = 8, top_ks: Sequence[int] = (1, 2, 4, 8)) -> Figure:
    """Bars: the value of each balancing loss under perfectly uniform routing, per top-K."""
    conv = balance_conventions(num_experts, top_ks)
    ks = conv.pop("top_k")
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    width = 0.8 / len(conv)
    x = np.arange(len(ks))
    for i, (name, vals) in enumerate(conv.items()):
        bars = ax.bar(x + (i - (len(conv) - 1) / 2) * width, vals, width, color=PALETTE[i], label=name)
        ax.bar_label(bars, fmt="%.2g", fontsize=9)
    ax.set_xticks(x, labels=[f"top-{k}" for k in ks])
    ax.set_ylabel("loss under uniform routing")
    ax.set_title(f"Same balance, different numbers: E={num_experts} experts")
    ax.legend()
    return close(fig)


def plot_layer_loads(
    loads: Sequence[torch.Tensor] | torch.Tensor, layer_names: Sequence[str] | None = None
) -> Figure:
    """Layers × experts heatmap of each MoE layer's load relative to the fair share."""
    rows = [to_numpy(x).reshape(-1) for x in loads]
    if not rows:
        raise ValueError("loads is empty: pass one [E] load per MoE layer")
    e = len(rows[0])
    if any(len(r) != e for r in rows):
        raise ValueError(
            f"loads have lengths {[len(r) for r in rows]}: every layer must have the same experts"
        )
    arr = np.stack(rows)
    rel = arr / np.maximum(arr.sum(1, keepdims=True) / e, 1e-9)
    if layer_names is None:
        names = [f"layer {i}" for i in range(len(rows))]
    elif isinstance(layer_names, str) or not isinstance(layer_names, Sequence):
        raise TypeError(
            f"layer_names={layer_names!r:.60} is not allowed: pass a list of names, one per layer"
        )
    elif len(layer_names) != len(rows):
        raise ValueError(
            f"layer_names has {len(layer_names)} names but loads has {len(rows)} layers: give one name per layer"
        )
    else:
        names = [str(n) for n in layer_names]
    fig, ax = plt.subplots(figsize=(min(12, 3 + 0.45 * e), 1.2 + 0.5 * len(rows)), layout="constrained")
    im = heatmap(ax, rel, xlabel="expert", title="Load per layer ÷ fair share", vmin=0, yticklabels=names)
    im.colorbar.set_label("load ÷ (T·K/E)")
    if e <= 32:
        ax.set_xticks(range(e))
    return close(fig)


def plot_group_selection(
    choice: torch.Tensor,
    keep: torch.Tensor,
    topk_indices: torch.Tensor,
    n_group: int,
    tokens: Sequence[str] | None = None,
) -> Figure:
    """Group-limited routing as a picture: the selection scores [T, E] (scores + bias), the groups
    each token may not use greyed out, group borders as white lines, and the chosen experts dotted."""
    c, m = to_numpy(choice), to_numpy(keep).astype(bool)
    if c.ndim != 2 or 0 in c.shape:
        raise ValueError(f"choice has shape {c.shape}: expected a non-empty [tokens, experts]")
    t, e = c.shape
    if m.shape != c.shape:
        raise ValueError(f"keep has shape {m.shape}: it must match choice {c.shape}")
    if isinstance(n_group, bool) or not isinstance(n_group, int) or n_group < 1 or e % n_group != 0:
        raise ValueError(
            f"n_group={n_group!r} is not allowed: it must be a positive integer that divides the {e} experts"
        )
    idx = to_numpy(topk_indices)
    if idx.ndim != 2 or idx.shape[0] != t:
        raise ValueError(f"topk_indices has shape {idx.shape}: expected [tokens={t}, K]")
    if idx.size and (np.any(idx != np.round(idx)) or idx.min() < 0 or idx.max() >= e):
        raise ValueError(
            f"topk_indices holds ids from {idx.min():g} to {idx.max():g}: they must be integers in [0, {e})"
        )
    if tokens is not None and len(tokens) != t:
        raise ValueError(f"tokens has {len(tokens)} labels but choice has {t} rows: they must match")
    shown = np.where(m, c, np.nan)
    fig, ax = plt.subplots(figsize=(min(12, 3 + 0.5 * e), 1.5 + 0.32 * t), layout="constrained")
    ax.imshow(np.where(m, np.nan, 1.0), aspect="auto", cmap="Greys", vmin=0, vmax=4, interpolation="nearest")
    im = heatmap(
        ax,
        shown,
        xlabel="expert",
        ylabel="token",
        title=f"Group-limited selection: {n_group} groups of {e // n_group}; grey = group not kept",
        yticklabels=list(tokens) if tokens is not None else None,
    )
    im.colorbar.set_label("score + bias")
    for b in range(1, n_group):
        ax.axvline(b * e // n_group - 0.5, color="white", lw=3)
    idx = to_numpy(topk_indices).astype(int)
    rows = np.repeat(np.arange(t), idx.shape[1])
    ax.scatter(idx.reshape(-1), rows, s=30, c="white", edgecolors="black", linewidths=0.8, label="chosen")
    ax.set_xticks(range(e))
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.12), fontsize=9)
    return close(fig)
