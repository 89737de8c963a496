"""Interactive controls for lessons 01–04: the routing explorer and the capacity calculator.

Each widget is an ``ipywidgets.VBox``: a row of labelled controls and one ``Output`` that holds one
matplotlib figure, redrawn when a control changes. The figure comes from the same function the
notebook's static cell calls (``routing_explorer_figure`` / ``viz.routing.plot_capacity``), so the
static twin shows exactly the widget's default view. The box carries ``controls`` (a dict of the
controls by name), ``output``, ``figure`` (the last figure drawn), ``redraw_count`` and
``redraw()``, for tests and for driving it from code.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure

from ..config import MoEConfig
from ..router import RouterOutput, route
from ..viz.routing import plot_capacity, plot_routing
from .core import attach_redraw, check_slider_value

SCORING_CHOICES = ("softmax", "sigmoid")

__all__ = [
    "capacity_calculator",
    "embed_text",
    "routing_explorer",
    "routing_explorer_figure",
]


def embed_text(text: str, hidden_size: int = 32, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """Split ``text`` into words and give each a fixed random embedding: (words, x [T, H]).

    The vector of a word depends only on the word, ``hidden_size`` and ``seed`` (a generator seeded
    with the word's CRC-32), so a repeated word gets the same vector and is routed the same way.
    """
    if not isinstance(text, str):
        raise TypeError(f"text={text!r:.60} is not allowed: it must be a string")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed: it must be an integer >= 0")
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"hidden_size={hidden_size!r} is not allowed: it must be a positive integer")
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    if not words:
        raise ValueError(f"text={text!r} is not allowed: it must contain at least one word")
    rows = []
    for w in words:
        g = torch.Generator().manual_seed(zlib.crc32(w.encode()) + 1_000_003 * seed)
        rows.append(torch.randn(hidden_size, generator=g))
    return words, torch.stack(rows)  # [T, H]


def _toy_setup(num_experts: int, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    tokens, x = embed_text("the cat sat on the mat while the dog ran to the park .", 32, seed)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_experts, x.shape[1], generator=g) / x.shape[1] ** 0.5  # [E, H]
    return tokens, x, weight


def routing_explorer_figure(
    logits: torch.Tensor,
    tokens: Sequence[str] | None = None,
    *,
    top_k: int = 2,
    temperature: float = 1.0,
    scoring: str = "softmax",
    bias_expert: int = 0,
    bias: float = 0.0,
    renormalize: bool = True,
    show: str = "weights",
) -> tuple[Figure, RouterOutput]:
    """Route ``logits`` [T, E] with these settings and draw heatmap + load bars.

    ``bias`` is added to the selection score of expert ``bias_expert`` only (as GLM-4.5's
    ``e_score_correction_bias``): it changes which experts are picked, never the weights.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits={type(logits).__name__} is not allowed: pass a [tokens, experts] tensor")
    if scoring not in SCORING_CHOICES:
        raise ValueError(f"scoring={scoring!r} is not allowed: use one of {SCORING_CHOICES}")
    if logits.dim() != 2:
        raise ValueError(f"logits has shape {tuple(logits.shape)}: expected [tokens, experts]")
    e = logits.shape[1]
    if not 0 <= bias_expert < e:
        raise ValueError(f"bias_expert={bias_expert!r} is not allowed: it must be in [0, {e})")
    config = MoEConfig(
        hidden_size=1,
        n_routed_experts=e,
        num_experts_per_tok=top_k,
        n_shared_experts=0,
        scoring_func=scoring,
        norm_topk_prob=renormalize,
    )
    b = torch.zeros(e, device=logits.device)
    b[bias_expert] = bias
    routing = route(logits, config, bias=b, temperature=temperature)
    title = f"{scoring}, T={temperature:.2g}, top-{top_k}" + (
        f", bias[{bias_expert}]={bias:+.2f}" if bias else ""
    )
    return plot_routing(routing, tokens, show=show, title=title), routing


def routing_explorer(
    x: torch.Tensor | None = None,
    tokens: Sequence[str] | None = None,
    weight: torch.Tensor | None = None,
    *,
    top_k: int = 2,
    scoring: str = "softmax",
    seed: int = 0,
) -> widgets.VBox:
    """A routing heatmap (tokens × experts) with load bars and controls for top-K, temperature,
    scoring function, a selection bias on one expert, renormalization and what to show.

    x [T, H] are the token vectors and weight [E, H] the router's weight (both default to a seeded
    toy sentence and an 8-expert router).
    """
    for name, value in (("x", x), ("weight", weight)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name}={type(value).__name__} is not allowed: pass a tensor (or None for the toy)"
            )
    if scoring not in SCORING_CHOICES:
        raise ValueError(f"scoring={scoring!r} is not allowed: use one of {SCORING_CHOICES}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed: it must be an integer >= 0")
    if x is None or weight is None:
        if x is not None or weight is not None:
            raise ValueError("x and weight go together: pass both, or neither for the toy example")
        tokens, x, weight = _toy_setup(8, seed)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x has shape {tuple(x.shape)} and weight {tuple(weight.shape)}: expected [T, H] and [E, H]"
        )
    if tokens is not None and len(tokens) != x.shape[0]:
        raise ValueError(f"tokens has {len(tokens)} labels but x has {x.shape[0]} rows: they must match")
    e = weight.shape[0]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k!r} is not allowed: it must be an integer in [1, {e}]")
    logits = x.float() @ weight.float().T  # [T, E]
    style = {"description_width": "initial"}
    controls = {
        "top_k": widgets.IntSlider(value=top_k, min=1, max=e, description="top-K", style=style),
        "temperature": widgets.FloatLogSlider(
            value=1.0, base=10, min=-1, max=1, step=0.05, description="temperature", style=style
        ),
        "scoring": widgets.Dropdown(options=list(SCORING_CHOICES), value=scoring, description="scoring"),
        "bias_expert": widgets.IntSlider(
            value=0, min=0, max=e - 1, description="bias on expert", style=style
        ),
        "bias": widgets.FloatSlider(value=0.0, min=-1.0, max=1.0, step=0.05, description="bias", style=style),
        "renormalize": widgets.Checkbox(value=True, description="renormalize top-K"),
        "show": widgets.Dropdown(options=["weights", "scores"], value="weights", description="show"),
    }
    output = widgets.Output()
    names = list(controls)
    row1 = widgets.HBox([controls[n] for n in names[:3]])
    row2 = widgets.HBox([controls[n] for n in names[3:]])
    box = widgets.VBox([row1, row2, output])

    def draw() -> Figure:
        state = {n: c.value for n, c in controls.items()}
        fig, routing = routing_explorer_figure(logits, tokens, **state)
        box.routing = routing
        return fig

    attach_redraw(box, controls, output, draw)
    return box


#: (min, max, step) of each capacity_calculator slider; a start value outside them is rejected.
_CAPACITY_RANGES = {
    "num_experts": (1, 256, 1),
    "top_k": (1, 16, 1),
    "hidden_size": (256, 8192, 256),
    "expert_size": (128, 16384, 128),
    "dense_size": (128, 65536, 128),
}


def capacity_calculator(
    num_experts: int = 8, top_k: int = 2, hidden_size: int = 1024, expert_size: int = 2816
) -> widgets.VBox:
    """Sliders for experts, top-K, hidden width, expert width and dense width; bars of total vs
    active parameters and per-token FLOPs (see :func:`glm4moe_lib.viz.routing.plot_capacity`)."""
    style = {"description_width": "initial"}
    start = {
        "num_experts": num_experts,
        "top_k": top_k,
        "hidden_size": hidden_size,
        "expert_size": expert_size,
    }
    for name, value in start.items():
        low, high, step = _CAPACITY_RANGES[name]
        if name == "top_k" and isinstance(num_experts, int):
            high = min(high, num_experts)  # top-K can never exceed the number of experts
        check_slider_value(name, value, low, high, step)
    r = _CAPACITY_RANGES
    controls = {
        "num_experts": widgets.IntSlider(
            value=num_experts, min=r["num_experts"][0], max=r["num_experts"][1], step=r["num_experts"][2],
            description="experts E", style=style,
        ),
        "top_k": widgets.IntSlider(
            value=top_k, min=r["top_k"][0], max=r["top_k"][1], step=r["top_k"][2], description="top-K",
            style=style,
        ),
        "hidden_size": widgets.IntSlider(
            value=hidden_size, min=r["hidden_size"][0], max=r["hidden_size"][1], step=r["hidden_size"][2],
            description="hidden H", style=style,
        ),
        "expert_size": widgets.IntSlider(
            value=expert_size, min=r["expert_size"][0], max=r["expert_size"][1], step=r["expert_size"][2],
            description="expert width I", style=style,
        ),
        "dense_size": widgets.IntSlider(
            value=expert_size, min=r["dense_size"][0], max=r["dense_size"][1], step=r["dense_size"][2],
            description="dense width", style=style,
        ),
    }  # fmt: skip

    # top-K can never exceed the number of experts.
    def clamp(change):
        controls["top_k"].max = min(16, change["new"])

    controls["num_experts"].observe(clamp, names="value")
    clamp({"new": controls["num_experts"].value})
    output = widgets.Output()
    names = list(controls)
    box = widgets.VBox(
        [
            widgets.HBox([controls[n] for n in names[:3]]),
            widgets.HBox([controls[n] for n in names[3:]]),
            output,
        ]
    )

    def draw() -> Figure:
        return plot_capacity(**{n: c.value for n, c in controls.items()})

    attach_redraw(box, controls, output, draw)
    return box
