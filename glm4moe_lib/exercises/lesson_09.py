"""Exercise checks for lesson 09: expert parallelism (who sends what to whom, and how many bytes).

Each ``check_*`` runs the learner's function on a few cases against the library's own answer
(:mod:`glm4moe_lib.parallel`) and, when it differs, says which common mistake it matches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..parallel import a2a_bytes_formula, traffic_matrix
from .core import Case, CheckResult, Mistake, check_function

__all__ = ["check_dispatch_bytes", "check_send_matrix"]


def _routing_case(name: str, tokens: Any, top_k: int, experts: int, world: int, seed: int) -> Case:
    """Random top-k choices (distinct experts per token) on each of ``world`` ranks."""
    g = torch.Generator().manual_seed(seed)
    sizes = tokens if isinstance(tokens, list) else [tokens] * world
    per_rank = [
        torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(t)])
        if t
        else torch.zeros(0, top_k, dtype=torch.long)
        for t in sizes
    ]
    return Case(name, (per_rank, experts, world))


def check_send_matrix(fn: Callable[..., Any]) -> CheckResult:
    """``fn(topk_indices_per_rank, num_experts, world_size) -> [W, W] int64``: entry [s, d] counts
    the (token, choice) pairs on rank s whose expert lives on rank d (rank d owns the experts
    d*E/W .. (d+1)*E/W - 1)."""
    cases = [
        _routing_case("2 ranks, 8 experts, top-2, 6 tokens each", 6, 2, 8, 2, 0),
        _routing_case("4 ranks, 8 experts, top-2, 10 tokens each", 10, 2, 8, 4, 1),
        _routing_case(
            "4 ranks, 16 experts, top-4, uneven tokens (one rank has none)", [9, 0, 5, 12], 4, 16, 4, 2
        ),
    ]

    def owner_round_robin(per_rank, e, w):
        return torch.stack([torch.bincount(idx.reshape(-1) % w, minlength=w) for idx in per_rank])

    def transposed(per_rank, e, w):
        return traffic_matrix(per_rank, e, w).T

    def tokens_not_pairs(per_rank, e, w):
        rows = []
        for idx in per_rank:
            owner = idx // (e // w)  # [T, K]
            hit = torch.zeros(idx.shape[0], w, dtype=torch.long).scatter_(1, owner, 1)  # [T, W]
            rows.append(hit.sum(0))
        return torch.stack(rows)

    def per_expert_not_rank(per_rank, e, w):
        return torch.stack([torch.bincount(idx.reshape(-1), minlength=e) for idx in per_rank])

    mistakes = [
        Mistake(
            "your matrix matches owner = expert % world_size (round robin), but the experts are split "
            "into contiguous blocks: owner = expert // (num_experts // world_size).",
            owner_round_robin,
        ),
        Mistake(
            "your matrix is transposed: row s should be what rank s *sends*, column d what rank d receives.",
            transposed,
        ),
        Mistake(
            "you counted tokens, not (token, choice) pairs: a token whose two experts both live on "
            "rank d sends two rows to d.",
            tokens_not_pairs,
        ),
        Mistake(
            "you counted pairs per expert ([W, E]); sum them per owning rank to get [W, W].",
            per_expert_not_rank,
        ),
    ]
    return check_function("send matrix", fn, traffic_matrix, cases, mistakes)


def check_dispatch_bytes(fn: Callable[..., Any]) -> CheckResult:
    """``fn(tokens, top_k, hidden_size, world_size, elem_size) -> float``: the expected bytes one
    rank sends to the *other* ranks in one dispatch when every expert is equally likely."""
    cases = [
        Case("4 ranks, bf16", (64, 2, 32, 4, 2)),  # (first: at W=2 two mistakes give the same number)
        Case("toy: 16 tokens, top-2, H=32, 2 ranks, fp32", (16, 2, 32, 2, 4)),
        Case("GLM-4.5 shape: 4096 tokens, top-8, H=5120, 8 GPUs, bf16", (4096, 8, 5120, 8, 2)),
        Case("one rank: nothing leaves", (10, 2, 8, 1, 4)),
    ]

    def with_self(t, k, h, w, b):
        return float(t * k * h * b)

    def tokens_only(t, k, h, w, b):
        return t * h * b * (w - 1) / w

    def both_ways(t, k, h, w, b):
        return 2 * a2a_bytes_formula(t, k, h, w, b)

    def one_over_w(t, k, h, w, b):
        return t * k * h * b / w

    mistakes = [
        Mistake("that is dispatch + combine: the question asks for one dispatch.", both_ways),
        Mistake(
            "you counted the rows that stay on the rank too: only a fraction (W-1)/W of them leaves.",
            with_self,
        ),
        Mistake("each token is sent top_k times (once per chosen expert): multiply by top_k.", tokens_only),
        Mistake("1/W of the rows stay local; (W-1)/W of them leave, not 1/W.", one_over_w),
    ]
    return check_function("dispatch bytes", fn, a2a_bytes_formula, cases, mistakes)
