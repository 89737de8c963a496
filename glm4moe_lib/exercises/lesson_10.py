"""Exercise checks for lesson 10: the two numbers behind the limit of one MoE layer call.

Each ``check_*`` runs the learner's function on a few layer shapes against the library's own count
(:func:`glm4moe_lib.bench.layer_flops`, :func:`glm4moe_lib.bench.layer_bytes`) and, when it
differs, says which common mistake it matches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..bench import layer_bytes, layer_flops
from ..config import PRESETS, MoEConfig
from .core import Case, CheckResult, Mistake, check_function

__all__ = ["check_layer_bytes", "check_layer_flops"]

_NO_SHARED = PRESETS["mixtral-like"]  # n_shared_experts = 0, softmax router
_TWO_SHARED = MoEConfig(
    hidden_size=64, moe_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2
)


def _parts(c: MoEConfig) -> tuple[int, int, int, int, int]:
    return (
        c.hidden_size,
        c.moe_intermediate_size,
        c.n_routed_experts,
        c.num_experts_per_tok,
        c.shared_intermediate_size,
    )


def check_layer_flops(fn: Callable[..., Any]) -> CheckResult:
    """``fn(config, tokens) -> int``: the forward FLOPs of one layer call as dense GEMMs (router,
    shared expert, and every token's K routed experts; 2 FLOPs per multiply-add)."""
    cases = [
        Case("the bench layer, T=16", (PRESETS["bench"], 16)),
        Case("GLM-4.5-Air's layer, one token", (PRESETS["glm4.5-air"], 1)),
        Case("two shared experts, T=7", (_TWO_SHARED, 7)),
        Case("no shared expert (Mixtral-like), T=5", (_NO_SHARED, 5)),
    ]

    def macs(c, t):
        return layer_flops(c, t) // 2

    def dense(c, t):
        h, i, e, k, i_s = _parts(c)
        return 2 * t * (h * e + 3 * h * i_s + e * 3 * h * i)

    def no_shared(c, t):
        h, i, e, k, i_s = _parts(c)
        return 2 * t * (h * e + k * 3 * h * i)

    def no_router(c, t):
        h, i, e, k, i_s = _parts(c)
        return 2 * t * (3 * h * i_s + k * 3 * h * i)

    def two_matrices(c, t):
        h, i, e, k, i_s = _parts(c)
        return 2 * t * (h * e + 2 * h * i_s + k * 2 * h * i)

    def shared_per_pair(c, t):
        h, i, e, k, i_s = _parts(c)
        return 2 * t * (h * e + k * 3 * h * i_s + k * 3 * h * i)

    mistakes = [
        Mistake("you counted multiply-adds: each is 2 FLOPs (a multiply and an add).", macs),
        Mistake(
            "you ran every token through all E routed experts: each token goes to only K of them.", dense
        ),
        Mistake(
            "you left out the shared expert: every token also runs it (3·H·I_shared per token).", no_shared
        ),
        Mistake("you left out the router's [T, H]x[H, E] GEMM.", no_router),
        Mistake(
            "an expert has three matrices, not two: gate and up (stored fused as [2I, H]) and down [H, I].",
            two_matrices,
        ),
        Mistake("the shared expert runs once per token, not once per (token, expert) pair.", shared_per_pair),
    ]
    return check_function("layer FLOPs", fn, layer_flops, cases, mistakes)


def check_layer_bytes(fn: Callable[..., Any]) -> CheckResult:
    """``fn(config, touched, elem_size) -> int``: the bytes of weights one forward call must read
    (router, shared expert, and each of the ``touched`` routed experts once)."""
    cases = [
        Case("the bench layer, 81 experts touched, fp32", (PRESETS["bench"], 81, 4)),
        Case("GLM-4.5-Air's layer, one token (8 experts), bf16", (PRESETS["glm4.5-air"], 8, 2)),
        Case("two shared experts, 5 touched, fp32", (_TWO_SHARED, 5, 4)),
        Case("no shared expert (Mixtral-like), 2 touched, bf16", (_NO_SHARED, 2, 2)),
    ]

    def all_experts(c, touched, b):
        return layer_bytes(c, c.n_routed_experts, b)

    def weights_not_bytes(c, touched, b):
        return layer_bytes(c, touched, 1)

    def no_shared(c, touched, b):
        h, i, e, k, i_s = _parts(c)
        return (e * h + touched * 3 * h * i) * b

    def no_router(c, touched, b):
        h, i, e, k, i_s = _parts(c)
        return (3 * h * i_s + touched * 3 * h * i) * b

    def two_matrices(c, touched, b):
        h, i, e, k, i_s = _parts(c)
        return (e * h + 2 * h * i_s + touched * 2 * h * i) * b

    mistakes = [
        Mistake(
            "you counted all E experts: only the touched ones (with at least one token) must be read.",
            all_experts,
        ),
        Mistake(
            "that is a number of weights: multiply by elem_size (4 for fp32, 2 for bf16).", weights_not_bytes
        ),
        Mistake("you left out the shared expert's weights: every call reads them.", no_shared),
        Mistake("you left out the router's [E, H] weights.", no_router),
        Mistake(
            "an expert has three matrices, not two: gate and up (stored fused as [2I, H]) and down [H, I].",
            two_matrices,
        ),
    ]
    return check_function("layer bytes", fn, layer_bytes, cases, mistakes)
