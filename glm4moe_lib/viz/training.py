"""Figures for lesson 08: training curves, per-domain losses, expert specialization, per-token routing.

Every ``plot_*`` function returns a closed matplotlib Figure (display it once in the notebook).
``routing_html`` returns HTML: one coloured span per token, coloured by the token's first-choice
expert with the Okabe–Ito palette (colour-blind-safe), with a legend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..config import check_int
from .core import CMAP, PALETTE, close, heatmap, ink, to_numpy

__all__ = [
    "char_classes",
    "plot_corpus_stats",
    "expert_colors",
    "plot_domain_losses",
    "plot_loss_curves",
    "plot_max_vio",
    "plot_routing_text",
    "plot_specialization",
    "routing_html",
    "smooth",
]


_WINDOW = " (the moving average's length; 1: no smoothing)"


def smooth(values: Sequence[float], window: int = 10) -> np.ndarray:
    """Trailing moving average (the first points average what is there); ``window`` >= 1."""
    check_int("window", window, 1, what=_WINDOW)
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _runs(metrics: Mapping[str, Any] | Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Accept one run's metrics or {label: metrics}."""
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(
            f"metrics={metrics!r:.60} is not allowed: pass one run's metrics (a dict with 'train' and "
            "'eval') or a non-empty dict {label: metrics}"
        )
    if "train" in metrics and "eval" in metrics:
        return {"run": metrics}
    for label, m in metrics.items():
        if not isinstance(m, Mapping) or "train" not in m or "eval" not in m:
            raise ValueError(
                f"metrics[{label!r}] is not allowed: every run must be a dict with 'train' and 'eval' lists"
            )
    return dict(metrics)


def plot_loss_curves(
    metrics: Mapping[str, Any], *, window: int = 10, title: str = "Training and validation loss"
) -> Figure:
    """Train loss (smoothed line) and validation loss (markers) against step, one colour per run."""
    runs = _runs(metrics)
    check_int("window", window, 1, what=_WINDOW)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (label, m) in enumerate(runs.items()):
        color = PALETTE[i % len(PALETTE)]
        steps = [r["step"] for r in m["train"]]
        ax.plot(steps, smooth([r["loss"] for r in m["train"]], window), color=color, label=f"{label}: train")
        ev = m["eval"]
        ax.plot(
            [e["step"] for e in ev],
            [e["val_loss"] for e in ev],
            "o--",
            color=color,
            markersize=6,
            label=f"{label}: validation",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return close(fig)


def plot_domain_losses(metrics: Mapping[str, Any], *, title: str = "Validation loss per domain") -> Figure:
    """Grouped bars: the final validation loss of each domain, one bar per run."""
    runs = _runs(metrics)
    for label, m in runs.items():
        if not m["eval"] or "val_loss_per_domain" not in m["eval"][-1]:
            raise ValueError(
                f"metrics run {label!r} has no evaluation with 'val_loss_per_domain': nothing to draw"
            )
    domains = list(next(iter(runs.values()))["eval"][-1]["val_loss_per_domain"])
    for label, m in runs.items():  # the same domains, in any order (bars follow the first run's)
        if set(m["eval"][-1]["val_loss_per_domain"]) != set(domains):
            raise ValueError(
                f"metrics run {label!r} has the domains {list(m['eval'][-1]['val_loss_per_domain'])} but the "
                f"first run {domains}: runs compared in one figure must share their domains"
            )
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(runs)
    x = np.arange(len(domains))
    for i, (label, m) in enumerate(runs.items()):
        per = m["eval"][-1]["val_loss_per_domain"]
        vals = [per[d] for d in domains]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, label=label, color=PALETTE[i % 8])
        ax.bar_label(bars, fmt="%.2f", fontsize=9)
    ax.set_xticks(x, labels=domains)
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return close(fig)


def plot_max_vio(
    metrics: Mapping[str, Any], *, window: int = 20, title: str = "Load imbalance (MaxVio)"
) -> Figure:
    """MaxVio of every MoE layer during training (smoothed), one panel per run."""
    runs = {k: v for k, v in _runs(metrics).items() if v["train"] and v["train"][0].get("max_vio")}
    check_int("window", window, 1, what=_WINDOW)
    if not runs:
        raise ValueError(
            "metrics has no run with a recorded 'max_vio' (a model with MoE layers, trained at least "
            "one step): nothing to draw"
        )
    for label, m in runs.items():
        first = (
            m.get("model_config", {}).get("first_k_dense_replace")
            if isinstance(m.get("model_config"), Mapping)
            else None
        )
        if isinstance(first, bool) or not isinstance(first, int):
            raise ValueError(
                f"metrics run {label!r} has no model_config['first_k_dense_replace'] (the layer numbers of "
                "its MoE layers): pass the metrics train() returns or writes"
            )
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs) + 1, 3.6), squeeze=False, sharey=True)
    for ax, (label, m) in zip(axes[0], runs.items()):
        steps = [r["step"] for r in m["train"]]
        vio = np.array([r["max_vio"] for r in m["train"]])  # [steps, moe layers]
        first = m["model_config"]["first_k_dense_replace"]
        for j in range(vio.shape[1]):
            ax.plot(steps, smooth(vio[:, j], window), color=PALETTE[j % 8], label=f"layer {first + j}")
        ax.set_title(f"{label}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("MaxVio (0 = balanced)")
    axes[0, -1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return close(fig)


def plot_specialization(
    matrices: Sequence[Any],
    domains: Sequence[str],
    *,
    layer_ids: Sequence[int] | None = None,
    title: str = "Which experts each domain's tokens go to",
) -> Figure:
    """One domain × expert heatmap per MoE layer: the share of each domain's picks per expert.

    A uniform router gives 1/E in every cell; bright cells are experts a domain prefers.
    """
    mats = [to_numpy(m) for m in matrices]
    if not mats:
        raise ValueError("matrices is empty: pass one [domains, experts] matrix per MoE layer")
    shapes = [m.shape for m in mats]
    if any(len(sh) != 2 or sh != shapes[0] or 0 in sh for sh in shapes):
        raise ValueError(
            f"matrices have shapes {shapes}: each must be the same non-empty 2-D [domains, experts]"
        )
    if len(domains) != shapes[0][0]:
        raise ValueError(
            f"domains has {len(domains)} names but the matrices have {shapes[0][0]} rows: they must match"
        )
    if layer_ids is not None and len(layer_ids) != len(mats):
        raise ValueError(
            f"layer_ids has {len(layer_ids)} entries but there are {len(mats)} matrices: they must match"
        )
    if not all(np.isfinite(m).all() for m in mats):
        raise ValueError("matrices hold NaN or infinite values: every share must be a finite number")
    n_experts = mats[0].shape[1]
    layer_ids = list(layer_ids) if layer_ids is not None else list(range(len(mats)))
    vmax = max(float(m.max()) for m in mats)
    fig, axes = plt.subplots(
        1, len(mats), figsize=(4.2 * len(mats) + 1.2, 0.5 * len(domains) + 2.2), squeeze=False
    )
    for j, (ax, m) in enumerate(zip(axes[0], mats)):
        heatmap(
            ax,
            m,
            xlabel="expert",
            title=f"MoE layer {layer_ids[j]}",
            vmin=0,
            vmax=vmax,
            colorbar=j == len(mats) - 1,
            yticklabels=domains if j == 0 else [""] * len(domains),
            xticklabels=[str(e) for e in range(n_experts)] if n_experts <= 16 else None,
        )
        best = m.argmax(1)
        for d, e in enumerate(best):
            color = "black" if m[d, e] > 0.6 * vmax else "white"  # readable on viridis
            ax.text(e, d, "★", ha="center", va="center", color=color, fontsize=9)
    fig.suptitle(f"{title}  (uniform = 1/{n_experts} = {1 / n_experts:.3f}; ★ = favourite)")
    fig.tight_layout()
    return close(fig)


CHAR_CLASSES = ("letters", "digits", "spaces", "newlines", "punctuation")


def char_classes(text: str) -> dict[str, float]:
    """Share of letters, digits, spaces, newlines and everything else in ``text``."""
    if not isinstance(text, str):
        raise TypeError(f"text is a {type(text).__name__}: pass a str (decode bytes first)")
    n = max(len(text), 1)
    letters = sum(c.isalpha() for c in text)
    digits = sum(c.isdigit() for c in text)
    spaces = text.count(" ")
    newlines = text.count("\n")
    other = len(text) - letters - digits - spaces - newlines
    return dict(zip(CHAR_CLASSES, (letters / n, digits / n, spaces / n, newlines / n, other / n)))


def plot_corpus_stats(texts: Mapping[str, str], *, title: str = "What each domain is made of") -> Figure:
    """Stacked horizontal bars: the character classes of every domain."""
    if not isinstance(texts, Mapping) or not texts:
        raise ValueError(f"texts={texts!r:.60} is not allowed: pass a non-empty dict {{domain: text}}")
    for name, text in texts.items():
        if not isinstance(text, str):
            raise TypeError(f"texts[{name!r}] is a {type(text).__name__}: every domain's text must be a str")
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(texts) + 1.6))
    left = np.zeros(len(texts))
    names = list(texts)
    shares = [char_classes(t) for t in texts.values()]
    for i, cls in enumerate(CHAR_CLASSES):
        vals = np.array([s[cls] for s in shares])
        ax.barh(names, vals, left=left, color=PALETTE[i], label=cls)
        left += vals
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of bytes")
    ax.set_title(title)
    ax.legend(ncols=len(CHAR_CLASSES), loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    fig.tight_layout()
    return close(fig)


# ---- per-token routing as coloured text ----------------------------------------------------------


def expert_colors(n_experts: int) -> list[str]:
    """One colour per expert: Okabe–Ito for up to 8 experts, else evenly spaced viridis colours."""
    if isinstance(n_experts, bool) or not isinstance(n_experts, (int, np.integer)) or n_experts < 1:
        raise ValueError(f"n_experts={n_experts!r} is not allowed: it must be a positive integer")
    if n_experts <= len(PALETTE):
        return PALETTE[:n_experts]
    cmap = plt.get_cmap(CMAP)
    return [mcolors.to_hex(cmap(i / max(n_experts - 1, 1))) for i in range(n_experts)]


def _text_color(background: str) -> str:
    """Black or white text, whichever contrasts more (WCAG) with ``background``."""
    return "#FFFFFF" if ink(background) == "white" else "#000000"


def _check_token_experts(tokens: Sequence[str], experts: Sequence[int], n_experts: int) -> list[int]:
    """Validate (tokens, experts, n_experts) for the coloured-text views; returns the ids as ints."""
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise TypeError(f"tokens={tokens!r:.60} is not allowed: pass a list of token strings")
    ids = to_numpy(experts).reshape(-1) if not isinstance(experts, Sequence) else np.asarray(experts)
    if len(ids) != len(tokens):
        raise ValueError(f"experts has {len(ids)} ids but tokens has {len(tokens)}: they must match")
    if len(ids) and (ids.dtype.kind not in "iuf" or np.any(ids != np.round(ids))):
        raise ValueError(f"experts={list(ids)[:8]!r} is not allowed: expert ids must be integers")
    out = [int(e) for e in ids]
    bad = [e for e in out if not 0 <= e < n_experts]
    if bad:
        raise ValueError(f"experts holds expert id {bad[0]}: every id must lie in [0, n_experts={n_experts})")
    return out


def routing_html(tokens: Sequence[str], experts: Sequence[int], n_experts: int, *, title: str = "") -> str:
    """HTML: each token in a span coloured by its (first-choice) expert, then a legend.

    ``tokens`` are printable token strings (``ByteTokenizer.token_str``), ``experts`` [T] ints.
    """
    colors = expert_colors(n_experts)
    experts = _check_token_experts(tokens, experts, n_experts)
    spans = []
    for tok, e in zip(tokens, experts):
        bg = colors[int(e)]
        text = escape(tok).replace(" ", "&nbsp;")
        spans.append(
            f'<span title="expert {int(e)}" style="background:{bg};color:{_text_color(bg)};'
            f'font-family:monospace;padding:1px 0">{text}</span>'
        )
        if tok == "⏎":
            spans.append("<br>")
    legend = " ".join(
        f'<span style="background:{c};color:{_text_color(c)};font-family:monospace;padding:1px 4px">'
        f"expert {e}</span>"
        for e, c in enumerate(colors)
    )
    head = f"<b>{escape(title)}</b><br>" if title else ""
    return f'<div style="line-height:1.9">{head}{"".join(spans)}<br><br>{legend}</div>'


def plot_routing_text(
    tokens: Sequence[str],
    experts: Sequence[int],
    n_experts: int,
    *,
    title: str = "",
    chars_per_line: int = 60,
) -> Figure:
    """The static twin of ``routing_html``: the text drawn in a grid of cells coloured by expert."""
    colors = expert_colors(n_experts)
    experts = _check_token_experts(tokens, experts, n_experts)
    if not experts:
        raise ValueError("tokens is empty: there is no text to draw")
    if isinstance(chars_per_line, bool) or not isinstance(chars_per_line, int) or chars_per_line < 1:
        raise ValueError(f"chars_per_line={chars_per_line!r} is not allowed: it must be a positive integer")
    lines: list[list[tuple[str, int]]] = [[]]
    for tok, e in zip(tokens, experts):
        if len(lines[-1]) >= chars_per_line:
            lines.append([])
        lines[-1].append((tok, int(e)))
        if tok == "⏎":
            lines.append([])
    lines = [ln for ln in lines if ln]
    width = max(len(ln) for ln in lines)
    fig, ax = plt.subplots(figsize=(max(0.16 * width, 7), 0.3 * len(lines) + 1.3))
    for row, ln in enumerate(lines):
        for col, (tok, e) in enumerate(ln):
            ax.add_patch(plt.Rectangle((col, -row - 1), 1, 1, color=colors[e], linewidth=0))
            ax.text(
                col + 0.5,
                -row - 0.5,
                tok,
                ha="center",
                va="center",
                family="monospace",
                fontsize=10,
                color=_text_color(colors[e]),
            )
    handles = [Patch(color=c, label=f"expert {e}") for e, c in enumerate(colors)]
    ax.legend(
        handles=handles,
        ncols=min(n_experts, 8),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        frameon=False,
        fontsize=9,
        handlelength=1.2,
        columnspacing=0.8,
    )
    ax.set_xlim(0, width)
    ax.set_ylim(-len(lines), 0)
    ax.axis("off")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return close(fig)
