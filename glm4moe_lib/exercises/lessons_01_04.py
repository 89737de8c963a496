"""Exercise checks for lessons 01–04: parameter counting, expert load, routers and SwiGLU experts.

Each ``check_*`` runs the learner's function on a few cases against the library's own answer and,
when it differs, says in plain words which common mistake it matches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ArchConfig, MoEConfig
from ..experts import swiglu
from ..router import route
from .core import Case, CheckResult, Mistake, check_function, compare_values

__all__ = [
    "check_active_params",
    "check_expert_load",
    "check_ffn_params",
    "check_fused_expert",
    "check_layer_params",
    "check_sigmoid_router",
    "check_swiglu",
    "check_topk_softmax_router",
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- lesson 01 -----------------------------------------------------------------------------------


def _moe_params(num_experts: int, top_k: int, hidden_size: int, expert_size: int) -> tuple[int, int]:
    expert = 3 * hidden_size * expert_size
    router = num_experts * hidden_size
    return router + num_experts * expert, router + top_k * expert


def check_active_params(fn: Callable[..., Any]) -> CheckResult:
    """``fn(num_experts, top_k, hidden_size, expert_size) -> (total, active)``: parameters of one MoE
    layer made of a linear router (no bias) and ``num_experts`` SwiGLU experts, K of them active."""
    cases = [
        Case("E=8, K=2, H=16, I=32", (8, 2, 16, 32)),
        Case("E=100, K=2, H=64, I=128", (100, 2, 64, 128)),
        Case("E=160, K=8, H=5120, I=1536 (GLM-4.5's routed experts)", (160, 8, 5120, 1536)),
    ]

    def two_matrices(e, k, h, i):
        return e * h + e * 2 * h * i, e * h + k * 2 * h * i

    def no_router(e, k, h, i):
        return e * 3 * h * i, k * 3 * h * i

    def active_is_total(e, k, h, i):
        t, _ = _moe_params(e, k, h, i)
        return t, t

    def active_top1(e, k, h, i):
        return _moe_params(e, 1, h, i)

    def active_no_router(e, k, h, i):
        return e * h + e * 3 * h * i, k * 3 * h * i

    mistakes = [
        Mistake(
            "you counted 2 weight matrices per expert: a SwiGLU expert has three (gate, up and down), "
            "so one expert has 3·H·I weights.",
            two_matrices,
        ),
        Mistake("you left out the router: its weight is an [E, H] matrix, E·H more parameters.", no_router),
        Mistake(
            "the router runs for every token, so its E·H weights are active too: add them to the active count.",
            active_no_router,
        ),
        Mistake(
            "your active count includes every expert: only the K chosen experts run for a token.",
            active_is_total,
        ),
        Mistake("your active count has only one expert: each token uses top_k experts.", active_top1),
    ]
    return check_function("MoE parameter count", fn, _moe_params, cases, mistakes)


def _expert_load(topk_indices: Tensor, num_experts: int) -> Tensor:
    return torch.bincount(topk_indices.reshape(-1), minlength=num_experts)  # [E]


def _compare_counts(got: Any, expected: Any) -> str | None:
    if isinstance(got, Tensor) and got.shape == expected.shape:
        return compare_values(got.double(), expected.double())
    return compare_values(got, expected)


def check_expert_load(fn: Callable[..., Any]) -> CheckResult:
    """``fn(topk_indices [T, K], num_experts) -> counts [E]``: how many (token, slot) picks each
    expert received; experts nobody picked count 0."""
    g = _gen(1)
    skewed = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(12)])
    skewed[:, 0] = 3  # expert 3 is everybody's first choice
    cases = [
        Case("5 tokens, top-2 of 6", (torch.tensor([[0, 1], [1, 2], [2, 1], [5, 1], [0, 2]]), 6)),
        Case("12 tokens, top-2 of 8, expert 3 popular", (skewed, 8)),
        Case("4 tokens, top-1 of 10 (experts 7-9 unused)", (torch.tensor([[0], [4], [4], [6]]), 10)),
    ]
    mistakes = [
        Mistake(
            "the experts nobody picked are missing at the end: use torch.bincount(..., minlength=num_experts).",
            lambda idx, e: torch.bincount(idx.reshape(-1)),
        ),
        Mistake(
            "you only counted each token's first choice (column 0): count all K picks of every token.",
            lambda idx, e: torch.bincount(idx[:, 0], minlength=e),
        ),
        Mistake(
            "you returned fractions of the picks: return the counts themselves (they sum to T·K).",
            lambda idx, e: torch.bincount(idx.reshape(-1), minlength=e).float() / idx.numel(),
        ),
        Mistake(
            "you returned fractions of the tokens: return the counts themselves (they sum to T·K).",
            lambda idx, e: torch.bincount(idx.reshape(-1), minlength=e).float() / idx.shape[0],
        ),
    ]
    return check_function("expert load", fn, _expert_load, cases, mistakes, compare=_compare_counts)


# ---- lesson 02 -----------------------------------------------------------------------------------


def _layer_params(config: MoEConfig) -> tuple[int, int]:
    p = config.num_parameters()
    return p["total"], p["active"]


def check_layer_params(fn: Callable[..., Any]) -> CheckResult:
    """``fn(config: MoEConfig) -> (total, active)``: parameters of one GLM-4.5 MoE layer: router,
    ``n_routed_experts`` SwiGLU experts (K active) and the shared expert (always active)."""
    from ..config import GLM45, GLM45_AIR

    cases = [
        Case("teaching size, 1 shared expert", (MoEConfig(),)),
        Case("no shared expert", (MoEConfig(hidden_size=32, n_shared_experts=0, num_experts_per_tok=3),)),
        Case(
            "2 shared experts",
            (MoEConfig(hidden_size=48, moe_intermediate_size=24, n_routed_experts=6, n_shared_experts=2),),
        ),
        Case("GLM-4.5", (GLM45,)),
        Case("GLM-4.5-Air", (GLM45_AIR,)),
    ]

    def parts(c: MoEConfig):
        h, i, e, k = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok
        return h, i, e, k, 3 * h * i * c.n_shared_experts

    def no_shared(c):
        h, i, e, k, s = parts(c)
        return e * h + e * 3 * h * i, e * h + k * 3 * h * i

    def shared_not_active(c):
        h, i, e, k, s = parts(c)
        return e * h + e * 3 * h * i + s, e * h + k * 3 * h * i

    def no_router(c):
        h, i, e, k, s = parts(c)
        return e * 3 * h * i + s, k * 3 * h * i + s

    def two_matrices(c):
        h, i, e, k, s = parts(c)
        return e * h + e * 2 * h * i + 2 * s // 3, e * h + k * 2 * h * i + 2 * s // 3

    def active_is_total(c):
        t, _ = _layer_params(c)
        return t, t

    def shared_as_flag(c):
        h, i, e, k, _ = parts(c)
        s = 3 * h * i * min(c.n_shared_experts, 1)
        return e * h + e * 3 * h * i + s, e * h + k * 3 * h * i + s

    mistakes = [
        Mistake(
            "you left out the shared expert: it is one more SwiGLU MLP of width "
            "moe_intermediate_size · n_shared_experts, in the total and in the active count.",
            no_shared,
        ),
        Mistake(
            "the shared expert runs for every token, so it belongs in the active count too.",
            shared_not_active,
        ),
        Mistake("you left out the router's [E, H] weight.", no_router),
        Mistake("you counted 2 matrices per SwiGLU MLP: there are three (gate, up, down).", two_matrices),
        Mistake(
            "your active count includes every routed expert: only num_experts_per_tok run.", active_is_total
        ),
        Mistake(
            "you counted one shared expert however many the config has: n_shared_experts is a count, not "
            "an on/off flag. With n_shared_experts = 2 the shared MLP is 2 · moe_intermediate_size wide, "
            "3 · H · I · n_shared_experts parameters.",
            shared_as_flag,
        ),
    ]
    return check_function("MoE layer parameters", _without_num_parameters(fn), _layer_params, cases, mistakes)


def _without_num_parameters(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with ``MoEConfig.num_parameters`` refused: the exercise is to count them yourself
    (the check compares with that method's numbers)."""
    if not callable(fn):
        return fn

    def refuse(self: MoEConfig) -> dict[str, int]:
        raise RuntimeError(
            "this exercise asks you to count the parameters yourself from the config's fields: "
            "config.num_parameters() is the answer it is checked against, so it is off limits here"
        )

    def run(*args: Any, **kwargs: Any) -> Any:
        with mock.patch.object(MoEConfig, "num_parameters", refuse):
            return fn(*args, **kwargs)

    return run


def _ffn_params(arch: ArchConfig) -> tuple[int, int]:
    m = arch.moe
    dense = 3 * m.hidden_size * arch.intermediate_size
    d, n_moe = arch.first_k_dense_replace, arch.num_hidden_layers - arch.first_k_dense_replace
    total, active = _layer_params(m)
    return d * dense + n_moe * total, d * dense + n_moe * active


def check_ffn_params(fn: Callable[..., Any]) -> CheckResult:
    """``fn(arch: ArchConfig) -> (total, active)``: the feed-forward parameters of the whole decoder:
    ``first_k_dense_replace`` dense SwiGLU MLPs of width ``intermediate_size``, then MoE layers."""
    from ..config import ARCHS

    small = ArchConfig(
        name="small",
        moe=MoEConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2),
        vocab_size=100,
        num_hidden_layers=5,
        first_k_dense_replace=2,
        intermediate_size=40,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        attention_bias=False,
        use_qk_norm=False,
        tie_word_embeddings=False,
        num_mtp_layers=0,
        published_total="-",
        published_active="-",
    )
    cases = [
        Case("5 layers, first 2 dense", (small,)),
        Case("GLM-4.5", (ARCHS["glm4.5"],)),
        Case("GLM-4.5-Air", (ARCHS["glm4.5-air"],)),
    ]

    def variant(arch, n_dense, moe_active_all=False):
        m = arch.moe
        dense = 3 * m.hidden_size * arch.intermediate_size
        total, active = _layer_params(m)
        if moe_active_all:
            active = total
        n_moe = arch.num_hidden_layers - n_dense
        return n_dense * dense + n_moe * total, n_dense * dense + n_moe * active

    mistakes = [
        Mistake(
            "you treated every layer as an MoE layer: the first first_k_dense_replace layers have a dense "
            "MLP of width intermediate_size instead.",
            lambda a: variant(a, 0),
        ),
        Mistake(
            "you have one dense layer too many: layers 0 .. first_k_dense_replace-1 are dense, that is "
            "first_k_dense_replace layers.",
            lambda a: variant(a, a.first_k_dense_replace + 1),
        ),
        Mistake(
            "you added the dense layers on top of num_hidden_layers MoE layers: the dense layers replace "
            "the first MoE layers.",
            lambda a: (
                _ffn_params(a)[0] + a.first_k_dense_replace * _layer_params(a.moe)[0],
                _ffn_params(a)[1] + a.first_k_dense_replace * _layer_params(a.moe)[1],
            ),
        ),
        Mistake(
            "your active count runs every routed expert in the MoE layers: only num_experts_per_tok do.",
            lambda a: variant(a, a.first_k_dense_replace, moe_active_all=True),
        ),
    ]
    return check_function("decoder FFN parameters", fn, _ffn_params, cases, mistakes)


# ---- lesson 03 -----------------------------------------------------------------------------------


def _sorted_routing(weights: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    idx, order = indices.long().sort(dim=-1)
    return weights.float().gather(-1, order), idx


def _compare_routing(got: Any, expected: Any) -> str | None:
    """Like compare_values on (weights, indices), but the K experts of a token may come in any order."""
    if not isinstance(got, tuple) or len(got) != 2 or not all(isinstance(g, Tensor) for g in got):
        return f"it should return a tuple (weights, indices) of two tensors, but returned {_describe(got)}"
    w, i = got
    ew, ei = expected
    if w.shape != ew.shape or i.shape != ei.shape:
        return (
            f"it returned weights of shape {list(w.shape)} and indices of shape {list(i.shape)}, but both "
            f"should be [tokens, K] = {list(ei.shape)}"
        )
    if i.is_floating_point():
        if not w.is_floating_point():  # integers first, then floats: the two swapped
            return "it returned (indices, weights): return (weights, indices), in that order"
        return "the indices should be integers (torch.topk(...).indices), not floats"
    gw, gi = _sorted_routing(w, i)
    xw, xi = _sorted_routing(ew, ei)
    if not torch.equal(gi, xi):
        bad = int((gi != xi).any(-1).sum())
        return f"it chose different experts than expected for {bad} of {gi.shape[0]} tokens"
    why = compare_values(gw, xw)
    return None if why is None else f"it chose the right experts, but the weights are wrong: {why}"


def _describe(value: Any) -> str:
    from .core import describe

    return describe(value)


def _topk_softmax(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    config = MoEConfig(
        hidden_size=1, n_routed_experts=logits.shape[-1], num_experts_per_tok=k, scoring_func="softmax"
    )
    r = route(logits, config)
    return r.topk_weights, r.topk_indices


def _router_cases(seed: int) -> list[Tensor]:
    g = _gen(seed)
    return [
        torch.randn(6, 8, generator=g),
        2.0 * torch.randn(10, 16, generator=g),
        torch.randn(3, 4, generator=g),
    ]


def check_topk_softmax_router(fn: Callable[..., Any]) -> CheckResult:
    """``fn(logits [T, E], k) -> (weights [T, K], indices [T, K])``: softmax over the experts, the K
    highest probabilities, renormalized to sum to 1 per token (the seed's / Mixtral's router)."""
    a, b, c = _router_cases(3)
    cases = [
        Case("6 tokens, top-2 of 8", (a, 2)),
        Case("10 tokens, top-4 of 16", (b, 4)),
        Case("3 tokens, top-1 of 4", (c, 1)),
    ]

    def wrong_dim(logits, k):
        p = logits.softmax(dim=0)
        w, i = p.topk(k, dim=-1)
        return w / w.sum(-1, keepdim=True), i

    def no_renorm(logits, k):
        return logits.softmax(dim=-1).topk(k, dim=-1)

    def raw_logits(logits, k):
        return logits.topk(k, dim=-1)

    def smallest(logits, k):
        w, i = logits.softmax(-1).topk(k, dim=-1, largest=False)
        return w / w.sum(-1, keepdim=True), i

    mistakes = [
        Mistake(
            "you took the softmax over the tokens (dim=0) instead of over the experts (dim=-1): each "
            "token's probabilities must sum to 1 across the experts.",
            wrong_dim,
        ),
        Mistake(
            "you forgot to renormalize: divide the K chosen probabilities by their sum so they add up to 1.",
            no_renorm,
        ),
        Mistake("you returned the raw logits as weights: apply the softmax first.", raw_logits),
        Mistake(
            "you picked the K *smallest* probabilities: torch.topk picks the largest by default.", smallest
        ),
    ]
    return check_function(
        "top-K softmax router", fn, _topk_softmax, cases, mistakes, compare=_compare_routing
    )


def _sigmoid_router(logits: Tensor, bias: Tensor, k: int, scaling_factor: float) -> tuple[Tensor, Tensor]:
    config = MoEConfig(
        hidden_size=1,
        n_routed_experts=logits.shape[-1],
        num_experts_per_tok=k,
        scoring_func="sigmoid",
        routed_scaling_factor=scaling_factor,
    )
    r = route(logits, config, bias=bias)
    return r.topk_weights, r.topk_indices


def check_sigmoid_router(fn: Callable[..., Any]) -> CheckResult:
    """``fn(logits [T, E], bias [E], k, scaling_factor) -> (weights, indices)``: GLM-4.5's router:
    sigmoid scores; pick the top K of ``scores + bias``; weights = the *unbiased* scores of the
    picked experts, renormalized to sum to 1, times ``scaling_factor``."""
    a, b, c = _router_cases(4)
    bias8 = torch.tensor([0.4, -0.4, 0.0, 0.3, 0.0, -0.2, 0.1, 0.0])
    bias16 = 0.3 * torch.randn(16, generator=_gen(5))
    cases = [
        Case("6 tokens, top-2 of 8, bias, scale 1", (a, bias8, 2, 1.0)),
        Case("10 tokens, top-4 of 16, bias, scale 2.5", (b, bias16, 4, 2.5)),
        Case("3 tokens, top-2 of 4, no bias, scale 2.5", (c, torch.zeros(4), 2, 2.5)),
    ]

    def finish(scores, idx, s, norm=True):
        w = scores.gather(-1, idx)
        if norm:
            w = w / w.sum(-1, keepdim=True)
        return w * s, idx

    def biased_weights(logits, bias, k, s):
        choice = logits.sigmoid() + bias
        return finish(choice, choice.topk(k, dim=-1).indices, s)

    def bias_in_logits(logits, bias, k, s):
        scores = logits.sigmoid()
        return finish(scores, (logits + bias).sigmoid().topk(k, dim=-1).indices, s)

    def bias_ignored(logits, bias, k, s):
        scores = logits.sigmoid()
        return finish(scores, scores.topk(k, dim=-1).indices, s)

    def softmax_scores(logits, bias, k, s):
        scores = logits.softmax(-1)
        return finish(scores, (scores + bias).topk(k, dim=-1).indices, s)

    def no_renorm(logits, bias, k, s):
        scores = logits.sigmoid()
        return finish(scores, (scores + bias).topk(k, dim=-1).indices, s, norm=False)

    def no_scale(logits, bias, k, s):
        return _sigmoid_router(logits, bias, k, 1.0)

    mistakes = [
        Mistake(
            "your weights come from the biased scores (scores + bias): the bias only decides *which* experts "
            "are picked; take the weights from the unbiased sigmoid scores.",
            biased_weights,
        ),
        Mistake(
            "you added the bias to the logits before the sigmoid: GLM-4.5 adds it to the sigmoid scores.",
            bias_in_logits,
        ),
        Mistake(
            "you ignored the bias when choosing the experts: pick the top K of scores + bias.",
            bias_ignored,
        ),
        Mistake(
            "you used a softmax: GLM-4.5 scores each expert with an independent sigmoid.", softmax_scores
        ),
        Mistake(
            "you forgot to renormalize: divide the K weights by their sum before multiplying by the "
            "scaling factor.",
            no_renorm,
        ),
        Mistake(
            "your weights sum to 1: multiply them by scaling_factor after renormalizing (if you scaled "
            "first, the renormalization undid it).",
            no_scale,
        ),
    ]
    return check_function(
        "sigmoid router with selection bias", fn, _sigmoid_router, cases, mistakes, compare=_compare_routing
    )


# ---- lesson 04 -----------------------------------------------------------------------------------


def _swiglu_ref(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def check_swiglu(fn: Callable[..., Any]) -> CheckResult:
    """``fn(x [N, H], w_gate [I, H], w_up [I, H], w_down [H, I]) -> [N, H]``: one SwiGLU expert,
    ``down(silu(gate(x)) * up(x))`` with weights stored as in ``nn.Linear`` ([out, in])."""
    g = _gen(6)

    def case(n, h, i):
        return (
            torch.randn(n, h, generator=g),
            torch.randn(i, h, generator=g) / h**0.5,
            torch.randn(i, h, generator=g) / h**0.5,
            torch.randn(h, i, generator=g) / i**0.5,
        )

    cases = [Case("4 tokens, H=8, I=12", case(4, 8, 12)), Case("7 tokens, H=16, I=6", case(7, 16, 6))]
    mistakes = [
        Mistake(
            "gate and up are swapped: the activation goes on the gate projection, silu(x @ w_gate.T), "
            "and multiplies the plain up projection.",
            lambda x, wg, wu, wd: _swiglu_ref(x, wu, wg, wd),
        ),
        Mistake(
            "you forgot the activation: silu(gate(x)) * up(x), not gate(x) * up(x).",
            lambda x, wg, wu, wd: F.linear(F.linear(x, wg) * F.linear(x, wu), wd),
        ),
        Mistake(
            "you applied silu to the product: it goes on the gate only, silu(gate(x)) * up(x).",
            lambda x, wg, wu, wd: F.linear(F.silu(F.linear(x, wg) * F.linear(x, wu)), wd),
        ),
        Mistake(
            "you used ReLU: SwiGLU uses SiLU (x · sigmoid(x)), torch.nn.functional.silu.",
            lambda x, wg, wu, wd: F.linear(F.relu(F.linear(x, wg)) * F.linear(x, wu), wd),
        ),
        Mistake(
            "you used GELU: SwiGLU uses SiLU (x · sigmoid(x)), torch.nn.functional.silu.",
            lambda x, wg, wu, wd: F.linear(F.gelu(F.linear(x, wg)) * F.linear(x, wu), wd),
        ),
        Mistake(
            "you added gate and up: the gate *multiplies* the up projection, silu(gate(x)) * up(x).",
            lambda x, wg, wu, wd: F.linear(F.silu(F.linear(x, wg)) + F.linear(x, wu), wd),
        ),
    ]
    return check_function("SwiGLU expert", fn, _swiglu_ref, cases, mistakes)


def _fused_expert(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, e: int) -> Tensor:
    return swiglu(x, gate_up_proj[e], down_proj[e])


def check_fused_expert(fn: Callable[..., Any]) -> CheckResult:
    """``fn(x [N, H], gate_up_proj [E, 2I, H], down_proj [E, H, I], e) -> [N, H]``: expert ``e`` run
    from the fused storage (rows 0..I-1 of ``gate_up_proj[e]`` are the gate, rows I..2I-1 the up)."""
    g = _gen(7)

    def case(n, h, i, e, idx):
        return (
            torch.randn(n, h, generator=g),
            torch.randn(e, 2 * i, h, generator=g) / h**0.5,
            torch.randn(e, h, i, generator=g) / i**0.5,
            idx,
        )

    cases = [
        Case("expert 2 of 4, H=8, I=6", case(5, 8, 6, 4, 2)),
        Case("expert 0 of 3", case(3, 12, 4, 3, 0)),
    ]

    def halves_swapped(x, gu, d, e):
        gate, up = gu[e].chunk(2, dim=0)
        return _swiglu_ref(x, up, gate, d[e])

    def interleaved(x, gu, d, e):
        return _swiglu_ref(x, gu[e][0::2], gu[e][1::2], d[e])

    def wrong_expert(x, gu, d, e):
        return _fused_expert(x, gu, d, (e + 1) % gu.shape[0])

    def no_silu(x, gu, d, e):
        gate, up = gu[e].chunk(2, dim=0)
        return F.linear(F.linear(x, gate) * F.linear(x, up), d[e])

    mistakes = [
        Mistake(
            "you took the halves the wrong way round: the first I rows are the gate, the last I rows the up "
            "projection.",
            halves_swapped,
        ),
        Mistake(
            "you split the rows alternately (even/odd): the gate is one contiguous block of I rows, then the "
            "up block (use .chunk(2, dim=0) on gate_up_proj[e]).",
            interleaved,
        ),
        Mistake("you ran a different expert: index the fused tensors with e.", wrong_expert),
        Mistake(
            "you forgot the activation: apply SiLU to the gate projection before multiplying by up.", no_silu
        ),
    ]
    return check_function("expert from fused weights", fn, _fused_expert, cases, mistakes)
