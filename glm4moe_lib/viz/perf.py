"""Figures for lesson 10: measured MoE layer times against the machine's limit."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
from matplotlib.figure import Figure

from .core import PALETTE, close

#: contenders drawn by default, with their colour and line style
DEFAULT_SERIES: dict[str, tuple[str, str]] = {
    "lib:auto": (PALETTE[0], "-"),
    "lib:sorted": (PALETTE[2], ":"),
    "lib:loop": (PALETTE[4], ":"),
    "lib:gather_bmm": (PALETTE[5], "--"),
    "lib:padded": ("#882255", "--"),  # wine (Paul Tol): Okabe-Ito's yellow is faint on white
    "lib:grouped_mm": (PALETTE[1], "--"),
    "hf:eager": (PALETTE[3], "-"),
    "hf:grouped_mm": ("#7f7f7f", "-."),
    # GPU runs only: the forward replayed from a CUDA graph (no per-op launch overhead)
    "lib:auto+graph": (PALETTE[0], (0, (4, 1, 1, 1))),
    "hf:grouped_mm+graph": ("#4d4d4d", (0, (5, 1, 1, 1, 1, 1))),
}


#: reference costs drawn in grey: (timing name, legend label, line style)
FLOORS = (
    ("floor:dense_grads", "floor: dense grads", (0, (1, 1))),  # fwd+bwd: every expert's gradient
    ("floor:expert_gemms", "floor: expert GEMMs", (0, (3, 2))),  # forward, CPU: the BLAS alone
)


def load_results(path: str | Path) -> dict[str, Any]:
    """The JSON that ``python -m glm4moe_lib.bench`` wrote."""
    return json.loads(Path(path).read_text())


def _rows(results: dict[str, Any], routing: str, mode: str) -> list[dict[str, Any]]:
    rows = [r for r in results["results"] if r["routing"] == routing and r["mode"] == mode]
    return sorted(rows, key=lambda r: r["tokens"])


def plot_times(
    results: dict[str, Any],
    routing: str = "balanced",
    modes: Sequence[str] = ("forward", "fwd+bwd"),
    series: Sequence[str] | None = None,
    ratio: bool = False,
) -> Figure:
    """Time per layer call against T (log-log), one panel per mode, with the limit as a black line.

    ``ratio=True`` draws time / limit instead (the limit is then the line at 1).
    """
    if isinstance(modes, str) or not isinstance(modes, Sequence) or not modes:
        raise ValueError(
            f"modes={modes!r} is not allowed: give a non-empty list of modes, e.g. ('forward', 'fwd+bwd')"
        )
    if not isinstance(results, dict) or "results" not in results or "meta" not in results:
        raise ValueError(
            "results is not allowed: pass the dict load_results() reads (with 'results' and 'meta')"
        )
    series = list(series or DEFAULT_SERIES)
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = _rows(results, routing, mode)
        tokens = [r["tokens"] for r in rows]
        if not rows:
            ax.set_title(f"{mode}: no data")
            continue
        for name in series:
            pts = [(r["tokens"], r["timings"][name]) for r in rows if name in r["timings"]]
            if not pts:
                continue
            colour, style = DEFAULT_SERIES.get(name, (None, "-"))
            ys = [tm["ratio"] if ratio else tm["min_s"] * 1e3 for _, tm in pts]
            width = 2.6 if name == "lib:auto" else 1.6
            ax.plot([t for t, _ in pts], ys, ls=style, color=colour, lw=width, marker="o", ms=4, label=name)
        for key, label, style in FLOORS:
            floor = [(r["tokens"], r["timings"][key]) for r in rows if key in r["timings"]]
            if floor:
                ys = [tm["ratio"] if ratio else tm["min_s"] * 1e3 for _, tm in floor]
                ax.plot([t for t, _ in floor], ys, color="grey", lw=2, ls=style, label=label)
        limit = [1.0 if ratio else r["limit_s"] * 1e3 for r in rows]
        ax.plot(tokens, limit, color="black", lw=3, label="limit", zorder=5)
        if ratio:
            ax.axhline(1.5, color="grey", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [str(t) for t in tokens])  # the measured T as plain numbers, not 2^k
        ax.xaxis.set_minor_locator(mticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time / limit" if ratio else "ms per layer call")
        ax.set_title(f"{mode}, {routing} routing")
        ax.grid(True, which="major", alpha=0.3)
    handles: dict[str, Any] = {}  # one legend for all panels (a series may be in one panel only)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    axes[0][-1].legend(
        handles.values(), handles.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=11
    )
    meta = results["meta"]
    fig.suptitle(f"One MoE layer ({meta['device']}, {meta['dtype']}): measured vs the limit", y=1.02)
    fig.tight_layout()
    return close(fig)


def ratio_table(
    results: dict[str, Any], names: Sequence[str] = ("lib:auto", "hf:eager", "hf:grouped_mm")
) -> list[dict[str, Any]]:
    """Rows (routing, mode, T, auto's pick, then time/limit of each name) for a quick table."""
    out = []
    for r in results["results"]:
        row = {"routing": r["routing"], "mode": r["mode"], "T": r["tokens"], "auto": r["auto_strategy"]}
        for n in names:
            tm = r["timings"].get(n)
            row[n] = round(tm["ratio"], 2) if tm else None
        out.append(row)
    return out


def plot_overlap(rows: Sequence[dict[str, Any]], title: str | None = None) -> Figure:
    """Bars of :func:`glm4moe_lib.bench.overlap_probe`'s rows: for each number of tokens per expert,
    the plain read of the weights, the same work with the weights in cache, and the call itself,
    with the two bounds drawn across each group: both at once (the limit) and one after the other."""
    if not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"rows={rows!r:.60} is not allowed: pass the non-empty list overlap_probe() returns")
    keys = ("read_s", "compute_s", "call_s", "tokens_per_expert", "tokens")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in keys):
            raise ValueError(f"rows[{i}]={row!r:.80} is not allowed: every row needs the keys {keys}")
        for k in keys[:3]:
            v = row[k]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"rows[{i}][{k!r}]={v!r} is not allowed: it must be a finite time >= 0")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bars = (
        ("read_s", "read the weights (memory alone)", PALETTE[5], ""),
        ("compute_s", "the same work, weights in cache", PALETTE[1], "//"),
        ("call_s", "the call: weights from memory", PALETTE[0], ""),
    )
    width = 0.26
    for i, row in enumerate(rows):
        for j, (key, label, colour, hatch) in enumerate(bars):
            ax.bar(i + (j - 1) * width, row[key] * 1e3, width, color=colour, hatch=hatch, edgecolor="white",
                   label=label if i == 0 else None)  # fmt: skip
        both, serial = max(row["read_s"], row["compute_s"]) * 1e3, (row["read_s"] + row["compute_s"]) * 1e3
        span = (i - 1.6 * width, i + 1.6 * width)
        ax.plot(span, (both, both), color="black", lw=2, label="both at once (the limit)" if i == 0 else None)
        ax.plot(span, (serial, serial), color="black", lw=1.5, ls=(0, (2, 2)),
                label="one after the other" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(rows)), [f"{row['tokens_per_expert']} ({row['tokens']} tokens)" for row in rows])
    ax.set_xlabel("tokens per expert (T)")
    ax.set_ylabel("ms per call")
    ax.set_title(title or "The routed experts: reading and computing, how far they overlap")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_ylim(0, max((r["read_s"] + r["compute_s"]) * 1e3 for r in rows) * 1.35)
    fig.tight_layout()
    return close(fig)
