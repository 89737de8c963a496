"""The classroom playground, drawn statically: route a fixed token batch, optionally balance it, plot.

:func:`simulate_playground` does the work (pure torch, no widgets): a fixed batch of tokens that
share a common direction (so an untrained router is visibly unbalanced), a fixed router, and
optionally a few balancing steps: the Switch-style auxiliary loss (gradient steps on the router
weights, against a stand-in for the task loss) or the auxiliary-loss-free bias update (Wang et al.
2024, as in GLM-4.5). Balancing is never free: it sends some tokens to experts their router likes
less, and the state counts them (``moved``).
:func:`playground_figure` draws the result: the routing heatmap, the load bars and MaxVio per step.
The interactive dashboard (``glm4moe_lib.widgets.playground``) calls the same two functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from ..balance import expert_load, load_balancing_loss, max_violation, update_bias
from ..config import MoEConfig
from ..router import route
from .core import CMAP, PALETTE, check_scale, close, heatmap, to_numpy, use_course_style

#: The balancing methods the playground offers.
BALANCING = ("none", "switch aux loss", "bias updates")
#: Limits of the controls (the dashboard clamps to these; simulate_playground rejects the rest).
MAX_EXPERTS = 64
MAX_TOP_K = 8
MAX_STEPS = 200
TEMPERATURE_RANGE = (0.1, 5.0)
STRENGTH_RANGE = (0.01, 10.0)  # alpha of the aux loss; for bias updates, a multiple of BIAS_RATE
SKEW_RANGE = (0.0, 4.0)  # length of the direction every token shares (0: no common direction)
DEFAULT_SKEW = 2.0

HIDDEN = 32  # width of the toy token representations
SHOWN_TOKENS = 32  # rows of the heatmap (the load uses the whole batch)
AUX_LR = 0.1  # SGD learning rate on task + alpha * aux (task: stay near the router's first choices)
BIAS_RATE = 0.005  # u in b_i += u * sign(mean load - load_i), in units of the mean top-K score


@dataclass
class PlaygroundState:
    """What one playground setting computes (tensors on CPU, float32)."""

    num_experts: int
    top_k: int
    scoring_func: str
    temperature: float
    balancing: str
    steps: int
    weights: Tensor  # [T, E] combine weight of each chosen expert, 0 elsewhere
    load: Tensor  # [E] picks per expert after balancing
    load_before: Tensor  # [E] picks per expert before any balancing step
    max_vio: float  # MaxVio after balancing
    max_vio_history: list[float] = field(default_factory=list)  # MaxVio at step 0, 1, ..., steps
    bias: Tensor | None = None  # [E] selection bias ("bias updates" only)
    strength: float = 1.0  # alpha (aux loss) or u / (BIAS_RATE * mean top-K score) (bias updates)
    skew: float = DEFAULT_SKEW  # the batch's shared direction (see toy_batch)
    seed: int = 0  # the batch and the router
    moved: float = 0.0  # share of the (token, expert) picks that balancing moved to another expert
    coef: float = 0.0  # the coefficient balancing used: alpha, or the bias step u (0 without balancing)

    @property
    def tokens(self) -> int:
        return int(self.weights.shape[0])

    @property
    def ideal_load(self) -> float:
        """Picks per expert under perfect balance: T * K / E."""
        return self.tokens * self.top_k / self.num_experts


def _check(name: str, value, low, high, kind=int) -> None:
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer in [{low}, {high}]")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{name}={value!r} is not allowed: it must be a number in [{low}, {high}]")
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r} is not allowed: it must be in [{low}, {high}]")


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed: it must be an integer >= 0")


def toy_batch(tokens: int = 256, seed: int = 0, skew: float = DEFAULT_SKEW) -> tuple[Tensor, Tensor]:
    """A fixed token batch x [T, HIDDEN] and router weights W [MAX_EXPERTS, HIDDEN].

    The tokens share a common direction of length ``skew`` (as real hidden states do), so the
    untrained router prefers a few experts; ``skew=0`` gives tokens with no common direction. Using
    the first E rows of W keeps expert e the same for every E.
    """
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(HIDDEN, generator=g)
    common = skew * common / common.norm()
    x = common + torch.randn(tokens, HIDDEN, generator=g)  # [T, H]
    w = torch.randn(MAX_EXPERTS, HIDDEN, generator=g) / HIDDEN**0.5  # [E_max, H]
    return x, w


def simulate_playground(
    num_experts: int = 8,
    top_k: int = 2,
    scoring_func: str = "sigmoid",
    temperature: float = 1.0,
    balancing: str = "none",
    steps: int = 50,
    tokens: int = 256,
    seed: int = 0,
    strength: float = 1.0,
    skew: float = DEFAULT_SKEW,
) -> PlaygroundState:
    """Route a fixed batch with these settings; with ``balancing``, run ``steps`` balancing steps.

    * "none": route once.
    * "switch aux loss": ``steps`` SGD steps on the router weights minimizing
      ``task + alpha * aux``, with alpha = ``strength``, aux = transformers' ``load_balancing_loss``
      (Switch style, all K picks counted) of the tempered logits, and, as a stand-in for the
      language-model loss, task = KL(first routing distribution || current one): each token "wants"
      the experts its router first preferred. Small alpha balances little; large alpha balances by
      moving more tokens (and too large makes the steps overshoot).
    * "bias updates": ``steps`` auxiliary-loss-free updates of the selection bias with
      u = ``strength`` * BIAS_RATE * (mean top-K score); the weights still come from the
      unbiased scores.

    ``skew`` is the length of the batch's shared direction (0: none), ``seed`` picks the batch and
    the router. Bad values raise ValueError naming the parameter and the allowed range.
    """
    _check("num_experts", num_experts, 2, MAX_EXPERTS)
    _check("top_k", top_k, 1, min(MAX_TOP_K, num_experts))
    if scoring_func not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring_func={scoring_func!r} is not allowed: use 'softmax' or 'sigmoid'")
    _check("temperature", temperature, *TEMPERATURE_RANGE, kind=float)
    if balancing not in BALANCING:
        raise ValueError(f"balancing={balancing!r} is not allowed: use one of {BALANCING}")
    _check("steps", steps, 0, MAX_STEPS)
    _check("tokens", tokens, SHOWN_TOKENS, 4096)
    _check_seed(seed)
    _check("strength", strength, *STRENGTH_RANGE, kind=float)
    _check("skew", skew, *SKEW_RANGE, kind=float)

    config = MoEConfig(
        hidden_size=HIDDEN,
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        scoring_func=scoring_func,
        n_shared_experts=0,
    )
    x, w_all = toy_batch(tokens, seed, float(skew))
    w = w_all[:num_experts].clone()  # [E, H]
    bias = torch.zeros(num_experts) if balancing == "bias updates" else None

    def current():
        return route(x @ w.T, config, bias, temperature)

    out = current()
    first_picks = out.topk_indices  # [T, K]
    load_before = expert_load(first_picks, num_experts)
    history = [max_violation(load_before)]
    coef = 0.0
    if balancing == "switch aux loss" and steps > 0:
        coef = float(strength)
        first = torch.softmax((x @ w.T) / temperature, dim=-1)  # [T, E] what the "task" wants
        w.requires_grad_(True)
        opt = torch.optim.SGD([w], lr=AUX_LR)
        for _ in range(steps):
            opt.zero_grad()
            logits = (x @ w.T) / temperature  # [T, E]
            task = F.kl_div(F.log_softmax(logits, dim=-1), first, reduction="batchmean")
            (task + coef * load_balancing_loss(logits, top_k)).backward()
            opt.step()
            with torch.no_grad():
                history.append(max_violation(expert_load(current().topk_indices, num_experts)))
        w = w.detach()
    elif balancing == "bias updates" and steps > 0:
        # The sign update moves each bias by u per step; scale u to the size of the scores.
        coef = float(strength) * BIAS_RATE * float(out.scores.gather(1, out.topk_indices).mean())
        for _ in range(steps):
            update_bias(bias, expert_load(current().topk_indices, num_experts), coef)
            history.append(max_violation(expert_load(current().topk_indices, num_experts)))
    with torch.no_grad():
        out = current()
    load = expert_load(out.topk_indices, num_experts)
    weights = torch.zeros(tokens, num_experts).scatter_(1, out.topk_indices, out.topk_weights)
    kept = torch.zeros(tokens, num_experts, dtype=torch.bool).scatter_(1, first_picks, True)  # [T, E]
    moved = 1.0 - float(kept.gather(1, out.topk_indices).sum()) / first_picks.numel()
    return PlaygroundState(
        num_experts=num_experts,
        top_k=top_k,
        scoring_func=scoring_func,
        temperature=float(temperature),
        balancing=balancing,
        steps=steps,
        weights=weights,
        load=load,
        load_before=load_before,
        max_vio=max_violation(load),
        max_vio_history=history,
        bias=bias,
        strength=float(strength),
        skew=float(skew),
        seed=seed,
        moved=moved,
        coef=coef,
    )


def draw_playground(
    state: PlaygroundState, *, figsize: tuple[float, float] = (16, 5.5), scale: float | None = None
) -> Figure:
    """Three panels: routing heatmap (first tokens), load per expert, MaxVio per balancing step.

    ``scale`` draws with ``use_course_style(scale)`` for this figure only (1.5 for a projector);
    None keeps the current style.
    """
    if not isinstance(state, PlaygroundState):
        raise TypeError(
            f"state={type(state).__name__} is not allowed: pass the PlaygroundState that "
            "simulate_playground returns"
        )
    if scale is not None:
        check_scale(scale)
        with mpl.rc_context():
            use_course_style(scale)
            return draw_playground(state, figsize=figsize)
    fig, (ax_map, ax_load, ax_vio) = plt.subplots(
        1, 3, figsize=figsize, gridspec_kw={"width_ratios": [1.1, 1.2, 0.9]}
    )
    e = state.num_experts
    shown = state.weights[:SHOWN_TOKENS]  # [tokens shown, E]
    heatmap(
        ax_map,
        shown,
        xlabel="expert",
        ylabel="token",
        title=f"Routing weights (top-{state.top_k}, {state.scoring_func})",
        cmap=CMAP,
        vmin=0.0,
    )
    step = max(1, e // 8)
    ax_map.set_xticks(range(0, e, step))

    idx = np.arange(e)
    ax_load.bar(idx, to_numpy(state.load), color=PALETTE[0], label="load")
    if state.balancing != "none" and state.steps > 0:
        ax_load.step(
            idx,
            to_numpy(state.load_before),
            where="mid",
            color=PALETTE[1],
            linewidth=2.5,
            label="before balancing",
        )
    ax_load.axhline(state.ideal_load, color=PALETTE[3], linestyle="--", linewidth=2.5, label="balanced")
    top = max(float(state.load.max()), float(state.load_before.max()), state.ideal_load)
    ax_load.set_ylim(0, 1.45 * top)  # head-room for the legend
    ax_load.set_xticks(range(0, e, step))
    ax_load.set_xlabel("expert")
    ax_load.set_ylabel("picks")
    ax_load.set_title(f"Load per expert — MaxVio {state.max_vio:.2f}")
    ax_load.legend(loc="upper right", ncols=2 if state.balancing != "none" else 1)

    hist = state.max_vio_history
    ax_vio.plot(range(len(hist)), hist, color=PALETTE[2], linewidth=3, marker="o" if len(hist) < 3 else None)
    ax_vio.axhline(0.0, color=PALETTE[7], linewidth=1)
    ax_vio.set_xlabel("balancing step")
    ax_vio.set_ylabel("MaxVio")
    ax_vio.set_ylim(bottom=-0.05, top=max(1.0, max(hist) * 1.1))
    ax_vio.set_xlim(-0.5, max(len(hist) - 1, 10) + 0.5)
    ax_vio.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    if len(hist) == 1:
        ax_vio.text(
            0.5, 0.5, "choose a balancing\nmethod and steps", transform=ax_vio.transAxes,
            ha="center", va="center", color=PALETTE[7],
        )  # fmt: skip
    ax_vio.set_title(_balancing_title(state))
    fig.tight_layout()
    return close(fig)


def _balancing_title(state: PlaygroundState) -> str:
    """The MaxVio panel's title: the method, its coefficient and what balancing cost."""
    if state.balancing == "none" or state.steps == 0:
        return "none: no balancing" if state.balancing == "none" else f"{state.balancing}: 0 steps"
    coef = f"α={state.coef:.3g}" if state.balancing == "switch aux loss" else f"u={state.coef:.2g}"
    return f"{state.balancing} ({coef})\n{state.moved:.0%} of picks moved"


def playground_figure(*, scale: float | None = None, **settings) -> Figure:
    """The playground's figure for these settings (see :func:`simulate_playground`), e.g. the default."""
    if scale is not None:
        check_scale(scale)
    return draw_playground(simulate_playground(**settings), scale=scale)
