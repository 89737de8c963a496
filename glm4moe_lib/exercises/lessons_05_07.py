"""Exercise checks for lessons 05–07: the combine, capacity, balancing losses, the bias update, the
GLM-4.5 router and the assembled MoE layer.

Each ``check_*`` runs the learner's function on a few cases against the library's own answer and,
when it differs, says in plain words which common mistake it matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..balance import load_balancing_loss, update_bias
from ..config import MoEConfig
from ..dispatch import plan_dispatch
from ..moe import MoE
from ..router import route
from ..viz.dispatch import capacity_drops
from .core import Case, CheckResult, Mistake, check_function, compare_values, describe

__all__ = [
    "check_balance_loss",
    "check_bias_update",
    "check_capacity",
    "check_combine",
    "check_glm4_router",
    "check_moe_forward",
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- lesson 05: combine ------------------------------------------------------------------------------


def _combine(y_sorted: Tensor, token_ids: Tensor, order: Tensor, top_k_weights: Tensor) -> Tensor:
    w = top_k_weights.reshape(-1)[order, None]  # [T*K, 1] weights in sorted order
    out = torch.zeros(top_k_weights.shape[0], y_sorted.shape[1], dtype=y_sorted.dtype)  # [T, H]
    return out.index_add_(0, token_ids, y_sorted * w)


def _combine_case(
    name: str, tokens: int, top_k: int, experts: int, hidden: int, scale: float, seed: int
) -> Case:
    g = _gen(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])  # [T, K]
    w = torch.rand(tokens, top_k, generator=g) + 0.1
    w = w / w.sum(-1, keepdim=True) * scale  # [T, K]
    plan = plan_dispatch(idx, experts)
    y_sorted = torch.randn(tokens * top_k, hidden, generator=g)  # [T*K, H]
    return Case(name, (y_sorted, plan.token_ids, plan.order, w))


def check_combine(fn: Callable[..., Any]) -> CheckResult:
    """``fn(y_sorted [T*K, H], token_ids [T*K], order [T*K], top_k_weights [T, K]) -> out [T, H]``:
    the experts' outputs arrive sorted by expert (row j came from pair ``order[j]`` of the flattened
    [T, K] pairs, token ``token_ids[j]``); weight each row and add it into its token's output."""
    cases = [
        _combine_case("4 tokens, top-2 of 4 experts, H=3", 4, 2, 4, 3, 1.0, 0),
        _combine_case("10 tokens, top-3 of 8 experts, scaled by 2.5", 10, 3, 8, 5, 2.5, 1),
        _combine_case("6 tokens, top-1 of 3 experts", 6, 1, 3, 4, 1.0, 2),
    ]

    def no_weights(y, tok, order, w):
        return torch.zeros(w.shape[0], y.shape[1]).index_add_(0, tok, y)

    def unsorted_weights(y, tok, order, w):
        return torch.zeros(w.shape[0], y.shape[1]).index_add_(0, tok, y * w.reshape(-1)[:, None])

    def weights_by_token(y, tok, order, w):
        return torch.zeros(w.shape[0], y.shape[1]).index_add_(0, tok, y * w.reshape(-1)[tok, None])

    def assign(y, tok, order, w):
        out = torch.zeros(w.shape[0], y.shape[1])
        out[tok] = y * w.reshape(-1)[order, None]
        return out

    def plus_equals(y, tok, order, w):
        out = torch.zeros(w.shape[0], y.shape[1])
        out[tok] += y * w.reshape(-1)[order, None]
        return out

    def mean(y, tok, order, w):
        return no_weights(y, tok, order, w) / w.shape[1]

    mistakes = [
        Mistake(
            "you added the expert outputs without their routing weights: multiply row j by "
            "top_k_weights.reshape(-1)[order[j]] before adding it.",
            no_weights,
        ),
        Mistake(
            "you took the weights in (token, slot) order, but the rows are sorted by expert: pick "
            "them with top_k_weights.reshape(-1)[order].",
            unsorted_weights,
        ),
        Mistake(
            "you indexed the flattened weights with token_ids: they are indexed by the pair number, "
            "so use top_k_weights.reshape(-1)[order].",
            weights_by_token,
        ),
        Mistake(
            "each token appears K times in token_ids, and out[token_ids] = ... (or +=) keeps only one "
            "of them: scatter-add with out.index_add_(0, token_ids, rows).",
            assign,
        ),
        Mistake(
            "each token appears K times in token_ids, and out[token_ids] += ... does not accumulate "
            "repeated indices: scatter-add with out.index_add_(0, token_ids, rows).",
            plus_equals,
        ),
        Mistake(
            "you averaged the K outputs: the combine is a weighted sum with the router's weights.",
            mean,
        ),
    ]
    return check_function("weighted combine", fn, _combine, cases, mistakes)


# ---- lesson 05: capacity -----------------------------------------------------------------------------


def _capacity(top_k_index: Tensor, num_experts: int, capacity_factor: float) -> tuple[int, int]:
    return capacity_drops(top_k_index, num_experts, capacity_factor)


def _compare_ints(got: Any, expected: tuple[int, int]) -> str | None:
    """Two counts; one-element tensors and 2.0 for 2 are fine, a string or a 2.5 is not."""
    return compare_values(got, expected)


def check_capacity(fn: Callable[..., Any]) -> CheckResult:
    """``fn(top_k_index [T, K], num_experts, capacity_factor) -> (capacity, dropped)``: the capacity
    C = ceil(factor · T·K / E) of each expert and how many (token, slot) pairs overflow it."""
    g = _gen(5)
    skewed = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(20)])  # [20, 2]
    skewed[:12, 0] = 0  # expert 0 is popular
    cases = [
        Case("balanced: 8 tokens, top-1 of 4, factor 1.0", (torch.tensor([[0], [1], [2], [3]] * 2), 4, 1.0)),
        Case(
            "7 tokens, top-2 of 4, factor 1.0",
            (torch.tensor([[0, 1]] * 4 + [[2, 3], [0, 2], [1, 3]]), 4, 1.0),
        ),
        Case("20 tokens, top-2 of 8, skewed, factor 1.25", (skewed, 8, 1.25)),
        Case("20 tokens, top-2 of 8, skewed, factor 0.5", (skewed, 8, 0.5)),
    ]

    def load(idx, e):
        return torch.bincount(idx.reshape(-1), minlength=e)

    def floor_cap(idx, e, f):
        t, k = idx.shape
        cap = int(f * t * k / e)
        return cap, int((load(idx, e) - cap).clamp_min(0).sum())

    def no_k(idx, e, f):
        cap = math.ceil(f * idx.shape[0] / e)
        return cap, int((load(idx, e) - cap).clamp_min(0).sum())

    def no_clamp(idx, e, f):
        cap, _ = _capacity(idx, e, f)
        return cap, int((load(idx, e) - cap).sum())

    def experts_over(idx, e, f):
        cap, _ = _capacity(idx, e, f)
        return cap, int((load(idx, e) > cap).sum())

    def kept(idx, e, f):
        cap, dropped = _capacity(idx, e, f)
        return cap, idx.numel() - dropped

    def first_choice_only(idx, e, f):
        cap, _ = _capacity(idx, e, f)
        return cap, int((load(idx[:, :1], e) - cap).clamp_min(0).sum())

    mistakes = [
        Mistake(
            "your capacity is not rounded up: a fractional capacity must be rounded up with math.ceil "
            "(int() and round() can go down), or a perfectly balanced batch would already drop tokens.",
            floor_cap,
        ),
        Mistake(
            "your capacity forgot top_k: every token sends K pairs, so the balanced load is T·K/E.",
            no_k,
        ),
        Mistake(
            "you summed load - C over all experts, so underloaded experts cancelled the overflow: "
            "clamp each expert's excess at 0 first.",
            no_clamp,
        ),
        Mistake("you counted the experts that overflow: count the pairs beyond each capacity.", experts_over),
        Mistake("you returned the pairs that fit: return the ones that are dropped.", kept),
        Mistake(
            "you counted only the first choices: the load of an expert is over all K picks.",
            first_choice_only,
        ),
    ]
    return check_function(
        "capacity and dropped tokens", fn, _capacity, cases, mistakes, compare=_compare_ints
    )


# ---- lesson 06: auxiliary loss -----------------------------------------------------------------------


def _compare_scalar(got: Any, expected: Any) -> str | None:
    if isinstance(got, Tensor) and got.numel() != 1:
        return f"it should return one number (a 0-d tensor), but returned shape {list(got.shape)}"
    got = got.detach() if isinstance(got, Tensor) else got  # (the value only: the gradient is checked apart)
    expected = expected.detach() if isinstance(expected, Tensor) else expected
    return compare_values(got, float(expected), atol=1e-6, rtol=1e-5)


def check_balance_loss(fn: Callable[..., Any]) -> CheckResult:
    """``fn(router_logits [T, E], top_k) -> loss`` (a 0-d tensor): transformers' auxiliary loss
    ``E * sum_e f_e * P_e`` with p = softmax over the experts, f_e = (top-K picks of e) / T and
    P_e = mean over tokens of p_e. With ``top_k=1`` it is the Switch Transformer's loss. The loss
    must carry the gradient to the logits (through P_e), since training adds it to the task loss:
    a Python number, or a tensor cut from the graph, is reported as such."""
    with torch.enable_grad():  # the lessons turn gradients off globally; the loss must carry one here
        return _check_balance_loss(fn)


def _check_balance_loss(fn: Callable[..., Any]) -> CheckResult:
    g = _gen(7)
    skew = torch.randn(6, 8, generator=g)
    skew[:, 0] += 2.0
    skew.requires_grad_(True)
    uneven = (torch.randn(12, 4, generator=g) * 2).requires_grad_(True)
    cases = [
        Case("Switch: 6 tokens, top-1 of 8", (skew, 1)),
        Case("12 tokens, top-2 of 4", (uneven, 2)),
        Case("6 tokens, top-3 of 8, expert 0 popular", (skew, 3)),
    ]
    leaves = (skew, uneven)

    def compare(got: Any, expected: Any) -> str | None:
        why = _compare_scalar(got, expected)
        if why is not None:
            return why
        if not (isinstance(got, Tensor) and got.requires_grad):
            return (
                f"the value is right, but the loss carries no gradient: it returned {describe(got)}"
                f"{'' if isinstance(got, Tensor) else ' (a plain number)'}. Return the tensor itself "
                "(no .item(), float(), .detach() or torch.tensor(...) around it), so that loss.backward() "
                "reaches the router logits through P_e"
            )
        got_grads = torch.autograd.grad(got.sum(), leaves, retain_graph=True, allow_unused=True)
        want_grads = torch.autograd.grad(expected, leaves, retain_graph=True, allow_unused=True)
        if all(g is None for g in got_grads):
            return (
                "the value is right, but the loss does not depend on the router logits (it was rebuilt from "
                "a number?): compute it from router_logits with torch ops, so that loss.backward() reaches "
                "them through P_e"
            )
        for got_g, want_g in zip(got_grads, want_grads):
            if want_g is None:
                continue
            if got_g is None or not torch.allclose(got_g.double(), want_g.double(), atol=1e-6, rtol=1e-4):
                return (
                    "the value is right, but its gradient with respect to the logits is not: only "
                    "P_e (the softmax probabilities) should carry it; f_e counts hard top-K picks"
                )
        return None

    def probs(logits, dim=-1):
        return logits.float().softmax(dim)

    def generic(logits, k, p, counts_k=None):
        e = logits.shape[-1]
        kk = k if counts_k is None else counts_k
        picks = torch.zeros_like(logits).scatter_(1, logits.topk(kk, dim=-1).indices, 1.0)
        f = picks.mean(0)
        return e * (f * p.mean(0)).sum()

    mistakes = [
        Mistake(
            "you took the softmax over the tokens (dim=0): the probabilities must be over the experts (dim=-1).",
            lambda x, k: generic(x, k, probs(x, 0)),
        ),
        Mistake(
            "you counted only each token's top-1 choice: with top_k > 1, count all K picks (then sum_e f_e = K).",
            lambda x, k: generic(x, k, probs(x), counts_k=1),
        ),
        Mistake(
            "you divided the counts by T·K: in transformers' convention f_e = picks / T (uniform routing gives K).",
            lambda x, k: generic(x, k, probs(x)) / k,
        ),
        Mistake(
            "you forgot the factor E (the number of experts) in front of the sum.",
            lambda x, k: generic(x, k, probs(x)) / x.shape[-1],
        ),
        Mistake(
            "you used the probabilities as f: f_e counts the hard top-K picks (not differentiable); only P_e "
            "carries the gradient.",
            lambda x, k: x.shape[-1] * (probs(x).mean(0) ** 2).sum(),
        ),
        Mistake(
            "you used sigmoid scores as P: the loss takes the softmax over the experts.",
            lambda x, k: generic(x, k, x.sigmoid()),
        ),
        Mistake(
            "you used the raw logits as P: take their softmax over the experts first.",
            lambda x, k: generic(x, k, x),
        ),
    ]
    return check_function("auxiliary balance loss", fn, load_balancing_loss, cases, mistakes, compare=compare)


# ---- lesson 06: bias update --------------------------------------------------------------------------


def _bias_update(bias: Tensor, load: Tensor, update_rate: float) -> Tensor:
    return update_bias(bias.clone(), load, update_rate)


def check_bias_update(fn: Callable[..., Any]) -> CheckResult:
    """``fn(bias [E], load [E], update_rate) -> new bias [E]``: the auxiliary-loss-free update
    ``b_i + u * sign(mean load - load_i)`` (you may update ``bias`` in place and return it)."""
    cases = [
        Case("4 experts, one at the mean", (torch.zeros(4), torch.tensor([10.0, 2.0, 6.0, 6.0]), 1e-3)),
        Case(
            "8 experts, non-zero bias, u=0.01",
            (
                torch.linspace(-0.05, 0.05, 8),
                torch.tensor([40.0, 0.0, 3.0, 1.0, 12.0, 8.0, 0.0, 0.0]),
                1e-2,
            ),
        ),
        Case("3 experts, u=0.5", (torch.tensor([0.1, -0.2, 0.0]), torch.tensor([1.0, 5.0, 3.0]), 0.5)),
    ]

    def delta(load, u):
        return u * torch.sign(load.float().mean() - load.float())

    mistakes = [
        Mistake(
            "the sign is flipped: an overloaded expert (load above the mean) must get a *lower* bias, so "
            "add u * sign(mean - load).",
            lambda b, load, u: b - delta(load, u),
        ),
        Mistake(
            "you moved the bias in proportion to the imbalance: the update uses only its sign, a fixed step u.",
            lambda b, load, u: b + u * (load.mean() - load),
        ),
        Mistake(
            "you forgot the update rate u: each step moves the bias by ±u.",
            lambda b, load, u: b + delta(load, 1.0),
        ),
        Mistake(
            "you returned only the change: add it to the current bias.", lambda b, load, u: delta(load, u)
        ),
        Mistake(
            "an expert exactly at the mean load must not move (sign(0) = 0): use torch.sign, not a two-way choice.",
            lambda b, load, u: b + torch.where(load > load.mean(), -u, u),
        ),
        Mistake(
            "you compared with the largest load instead of the mean.",
            lambda b, load, u: b + u * torch.sign(load.max() - load),
        ),
    ]
    return check_function("bias update", fn, _bias_update, cases, mistakes)


# ---- lesson 07: GLM-4.5 router -----------------------------------------------------------------------


def _glm4_route(
    logits: Tensor,
    bias: Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[Tensor, Tensor]:
    cfg = MoEConfig(
        hidden_size=1,
        n_routed_experts=logits.shape[-1],
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor,
    )
    r = route(logits, cfg, bias)
    return r.topk_weights, r.topk_indices


def _sorted_routing(value: Any) -> Any:
    """(weights, indices) with each row's experts in ascending order, so any top-k order passes."""
    if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, Tensor) for v in value)):
        return value
    w, idx = value
    if w.shape != idx.shape or idx.dim() != 2 or idx.is_floating_point():
        return value
    idx_sorted, perm = idx.sort(dim=-1)
    return w.gather(-1, perm), idx_sorted


def _compare_routing(got: Any, expected: Any) -> str | None:
    """compare_values on (weights, indices), any order of the K experts in a row; float indices are
    reported as such (not blamed on the weights)."""
    if isinstance(got, tuple) and len(got) == 2 and all(isinstance(v, Tensor) for v in got):
        w, idx = got
        if idx.is_floating_point() and not w.is_floating_point():
            return "it returned (indices, weights): return them in the order (weights, indices)"
        if idx.is_floating_point():
            return "the indices should be integers (torch.topk(...).indices), not floats"
    return compare_values(_sorted_routing(got), _sorted_routing(expected))


def _route_variant(
    logits,
    bias,
    k,
    n_group,
    topk_group,
    norm,
    scale,
    *,
    scoring="sigmoid",
    weights_with_bias=False,
    use_bias=True,
    group_top=2,
    use_groups=True,
    scale_before_norm=False,
    renorm=True,
    mask_value=float("-inf"),
):
    scores = logits.float().sigmoid() if scoring == "sigmoid" else logits.float().softmax(-1)
    choice = scores + bias if use_bias else scores.clone()
    t, e = choice.shape
    if use_groups and n_group > 1:
        gs = choice.view(t, n_group, e // n_group).topk(group_top, dim=-1).values.sum(-1)
        keep = torch.zeros(t, n_group, dtype=torch.bool).scatter_(
            1, gs.topk(topk_group, dim=-1).indices, True
        )
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), mask_value)
    idx = choice.topk(k, dim=-1).indices
    w = (choice if weights_with_bias else scores).gather(1, idx)
    if scale_before_norm:
        w = w * scale
    if norm and renorm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    if not scale_before_norm:
        w = w * scale
    return w, idx


def check_glm4_router(fn: Callable[..., Any]) -> CheckResult:
    """``fn(logits [T, E], bias [E], top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    -> (weights [T, K], indices [T, K])``: GLM-4.5's routing from precomputed logits (sigmoid scores,
    bias for selection only, group-limited top-k, optional renormalization, then scaling).
    Any order of the K experts within a row is accepted."""
    g = _gen(11)
    cases = [
        Case(
            "8 tokens, top-2 of 8, bias, scale 2.5",
            (torch.randn(8, 8, generator=g), torch.randn(8, generator=g) * 0.3, 2, 1, 1, True, 2.5),
        ),
        Case(
            "16 tokens, top-4 of 16, 4 groups keep 2, scale 2.5",
            (torch.randn(16, 16, generator=g) * 2, torch.randn(16, generator=g) * 0.3, 4, 4, 2, True, 2.5),
        ),
        Case(
            "8 tokens, top-3 of 12, 3 groups keep 1, no renormalization, scale 1.5",
            (torch.randn(8, 12, generator=g) * 2, torch.randn(12, generator=g) * 0.3, 3, 3, 1, False, 1.5),
        ),
        Case(  # scores + bias below 0 in the kept groups: a masked expert must still never win
            "32 tokens, top-4 of 16, 4 groups keep 2, biases down to -0.8, scale 2.5",
            (torch.randn(32, 16, generator=g) * 2, -0.8 * torch.rand(16, generator=g), 4, 4, 2, True, 2.5),
        ),
    ]

    def variant(**kw):
        return lambda *args: _route_variant(*args, **kw)

    mistakes = [
        Mistake(
            "your weights include the bias: the bias only decides which experts are picked; the weights "
            "come from the unbiased sigmoid scores.",
            variant(weights_with_bias=True),
        ),
        Mistake(
            "you ignored the bias: add it to the scores before choosing the experts.", variant(use_bias=False)
        ),
        Mistake(
            "you used a softmax: GLM-4.5 scores each expert with an independent sigmoid.",
            variant(scoring="softmax"),
        ),
        Mistake(
            "you ignored the groups: first keep the topk_group best groups, mask the other experts with -inf.",
            variant(use_groups=False),
        ),
        Mistake(
            "a group's score is the sum of its two best experts, not its single best one.",
            variant(group_top=1),
        ),
        Mistake(
            "you masked the dropped groups' experts with 0: with a negative bias a kept expert's score + bias "
            "can fall below 0, and then a dropped expert wins. Mask them with float('-inf').",
            variant(mask_value=0.0),
        ),
        Mistake(
            "your weights sum to 1: they miss the routed_scaling_factor, either never multiplied by it or "
            "scaled before renormalizing (the division cancelled the scale). Renormalize first, then multiply "
            "by routed_scaling_factor.",
            variant(scale_before_norm=True),
        ),
        Mistake(
            "you did not renormalize: with norm_topk_prob, divide the K weights by their sum.",
            variant(renorm=False),
        ),
        Mistake(
            "norm_topk_prob is False here: do not divide by the sum, only multiply by routed_scaling_factor.",
            lambda logits, b, k, ng, tg, norm, s: _route_variant(logits, b, k, ng, tg, True, s),
        ),
        Mistake(
            "you skipped routed_scaling_factor: multiply the weights by it (whether or not they were renormalized).",
            lambda logits, b, k, ng, tg, norm, s: _route_variant(logits, b, k, ng, tg, norm, 1.0),
        ),
    ]
    return check_function("GLM-4.5 router", fn, _glm4_route, cases, mistakes, compare=_compare_routing)


# ---- lesson 07: the whole layer ----------------------------------------------------------------------


class _PartsOnlyMoE(MoE):
    """The layer a learner gets in :func:`check_moe_forward`: calling it whole (``moe(x)``) would
    skip the exercise, so that raises; its parts (gate, experts, shared_experts) work as usual."""

    def forward(self, hidden_states, return_routing=False):
        raise RuntimeError(
            "moe(x) runs the library's finished layer, which this exercise asks you to build: call its "
            "parts instead: routing = moe.gate(x), then moe.experts(x, routing.topk_indices, "
            "routing.topk_weights), plus moe.shared_experts(x)"
        )


def _moe_case(name: str, config: MoEConfig, tokens: int, seed: int) -> Case:
    with torch.random.fork_rng(devices=[]):  # the learner's global RNG stream is left as it was
        torch.random.default_generator.manual_seed(seed)
        moe = _PartsOnlyMoE(config).eval()
        with torch.no_grad():
            moe.gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts) * 0.2)
    x = torch.randn(tokens, config.hidden_size, generator=_gen(seed))
    return Case(name, (moe, x))


def check_moe_forward(fn: Callable[..., Any]) -> CheckResult:
    """``fn(moe, x [T, H]) -> out [T, H]``: the GLM-4.5 MoE layer assembled from its parts:
    ``moe.gate`` (routing), ``moe.experts`` (dispatch + combine) and ``moe.shared_experts``.
    Calling the finished layer (``moe(x)``) raises, with a message saying so."""
    cases = [
        _moe_case(
            "tiny: top-2 of 8, one shared expert", MoEConfig(hidden_size=16, moe_intermediate_size=8), 6, 0
        ),
        _moe_case(
            "small: 4 groups, top-4 of 16, scale 2.5",
            MoEConfig(
                hidden_size=16,
                moe_intermediate_size=8,
                n_routed_experts=16,
                num_experts_per_tok=4,
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.5,
                n_shared_experts=2,
            ),
            10,
            1,
        ),
    ]

    def reference(moe, x):
        with torch.no_grad():
            return MoE.forward(moe, x)  # the library's layer (the learner's copy refuses moe(x))

    def no_shared(moe, x):
        with torch.no_grad():
            r = moe.gate(x)
            return moe.experts(x, r.topk_indices, r.topk_weights)

    def shared_only(moe, x):
        with torch.no_grad():
            return moe.shared_experts(x)

    def unweighted(moe, x):
        with torch.no_grad():
            r = moe.gate(x)
            return moe.experts(x, r.topk_indices, torch.ones_like(r.topk_weights)) + moe.shared_experts(x)

    def shared_weighted(moe, x):
        with torch.no_grad():
            r = moe.gate(x)
            out = moe.experts(x, r.topk_indices, r.topk_weights)
            return out + moe.shared_experts(x) * r.topk_weights.sum(-1, keepdim=True)

    def no_bias(moe, x):
        with torch.no_grad():
            r = route(torch.nn.functional.linear(x.float(), moe.gate.weight.float()), moe.config)
            return moe.experts(x, r.topk_indices, r.topk_weights) + moe.shared_experts(x)

    mistakes = [
        Mistake("you left out the shared expert: add moe.shared_experts(x) for every token.", no_shared),
        Mistake("you returned only the shared expert: add the routed experts' combined output.", shared_only),
        Mistake(
            "you combined the experts with weight 1: pass the router's topk_weights to moe.experts.",
            unweighted,
        ),
        Mistake(
            "you weighted the shared expert: it is added to every token with weight 1.",
            shared_weighted,
        ),
        Mistake(
            "your routing ignored the selection bias (gate.e_score_correction_bias): call moe.gate(x), which "
            "adds it before choosing the experts.",
            no_bias,
        ),
    ]
    return check_function("GLM-4.5 MoE layer", fn, reference, cases, mistakes)
