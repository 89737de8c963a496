"""Exercise checks for lesson 08 (training a tiny MoE language model; what the experts learn).

* ``check_rms_norm(fn)``: ``fn(x, weight, eps) -> Tensor``, GLM-4's RMSNorm (float32 math).
* ``check_specialization_matrix(fn)``: ``fn(topk_indices, domain_ids, n_domains, n_experts)``
  -> [D, E], the share of each domain's expert picks that went to each expert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .core import Case, CheckResult, Mistake, check_function, compare_values

__all__ = [
    "check_rms_norm",
    "check_specialization_matrix",
    "reference_rms_norm",
    "reference_specialization_matrix",
]


# ---- RMSNorm -------------------------------------------------------------------------------------


def reference_rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """weight * x / sqrt(mean(x^2 over the last dim) + eps), computed in float32, cast back."""
    from ..model import RMSNorm

    norm = RMSNorm(x.shape[-1], eps).to(x.device)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x).to(torch.promote_types(x.dtype, weight.dtype))


def _layer_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    xf = x.float()
    xf = xf - xf.mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _no_weight(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _sum_not_mean(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _wrong_dim(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(0, keepdim=True) + eps)).to(x.dtype)


def _no_eps(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True))).to(x.dtype)


def _no_float32(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  # in x's own dtype


def _compare_rms(got: Any, expected: Any) -> str | None:
    """compare_values, with the dtype checked (the result is cast back to the input's dtype) and a
    float16 case compared to float16's precision (one rounding step either way is fine)."""
    if isinstance(got, Tensor) and isinstance(expected, Tensor) and got.dtype != expected.dtype:
        return (
            f"it returned dtype {got.dtype}, but {expected.dtype} is expected: cast the normalized x back to "
            "the input's dtype (x.to(input_dtype)) before multiplying by weight, as GLM-4 does"
        )
    low = isinstance(expected, Tensor) and expected.dtype in (torch.float16, torch.bfloat16)
    return compare_values(got, expected, atol=1e-2, rtol=1e-2) if low else compare_values(got, expected)


def _rms_cases() -> list[Case]:
    g = torch.Generator().manual_seed(8)
    return [
        Case("4 tokens, hidden 8", (torch.randn(4, 8, generator=g), torch.ones(8))),
        Case(
            "batch [2, 3, 16] with a learned weight",
            (torch.randn(2, 3, 16, generator=g) * 3, torch.rand(16, generator=g) + 0.5),
        ),
        Case(
            "small values and eps=0.1 (eps matters here)",
            (torch.randn(5, 6, generator=g) * 0.05, torch.rand(6, generator=g) + 0.5),
            {"eps": 0.1},
        ),
        Case(
            "float16 activations of size ~300 (x² overflows float16)",
            (
                (torch.randn(4, 32, generator=g) * 300).half(),
                (torch.rand(32, generator=g) + 0.5).half(),
            ),
        ),
    ]


def check_rms_norm(fn: Callable[..., Tensor]) -> CheckResult:
    """Check ``fn(x, weight, eps=1e-6)`` against the library's RMSNorm."""
    return check_function(
        "RMSNorm",
        fn,
        reference_rms_norm,
        _rms_cases(),
        mistakes=[
            Mistake(
                "you subtracted the mean first: that is LayerNorm. RMSNorm only divides by the root "
                "mean square, it does not centre x.",
                _layer_norm,
            ),
            Mistake("you forgot to multiply by `weight` (the learned per-channel scale).", _no_weight),
            Mistake(
                "you summed x² over the hidden dimension instead of averaging it: use .mean(-1).",
                _sum_not_mean,
            ),
            Mistake(
                "you averaged over the wrong dimension: normalize each token over its hidden "
                "dimension (the last one, dim=-1, keepdim=True).",
                _wrong_dim,
            ),
            Mistake("you left out eps: add it inside the square root, rsqrt(mean(x²) + eps).", _no_eps),
            Mistake(
                "you did the arithmetic in float16: x² overflows float16 (largest value 65504) for entries "
                "above about 256, so mean(x²) is inf and the output 0. Compute in float32 (x.float()), then "
                "cast back to the input's dtype.",
                _no_float32,
            ),
        ],
        compare=_compare_rms,
    )


# ---- specialization matrix -----------------------------------------------------------------------


def reference_specialization_matrix(
    topk_indices: Tensor, domain_ids: Tensor, n_domains: int, n_experts: int
) -> Tensor:
    """[D, E]: share of each domain's (token, slot) picks that went to each expert (rows sum to 1)."""
    from ..train import specialization_matrix

    return specialization_matrix(topk_indices, domain_ids, n_domains, n_experts)


def _counts(topk_indices: Tensor, domain_ids: Tensor, n_domains: int, n_experts: int) -> Tensor:
    out = torch.zeros(n_domains, n_experts)
    for t in range(topk_indices.shape[0]):
        for e in topk_indices[t].tolist():
            out[int(domain_ids[t]), e] += 1
    return out


def _raw_counts(topk_indices, domain_ids, n_domains, n_experts):
    return _counts(topk_indices, domain_ids, n_domains, n_experts)


def _per_expert(topk_indices, domain_ids, n_domains, n_experts):
    c = _counts(topk_indices, domain_ids, n_domains, n_experts)
    return c / c.sum(0, keepdim=True).clamp_min(1)


def _per_token(topk_indices, domain_ids, n_domains, n_experts):
    c = _counts(topk_indices, domain_ids, n_domains, n_experts)
    tokens = torch.bincount(domain_ids, minlength=n_domains).to(c.dtype)[:, None]  # [D, 1]
    return c / tokens.clamp_min(1)  # rows sum to K


def _top1_only(topk_indices, domain_ids, n_domains, n_experts):
    c = _counts(topk_indices[:, :1], domain_ids, n_domains, n_experts)
    return c / c.sum(1, keepdim=True).clamp_min(1)


def _no_clamp(topk_indices, domain_ids, n_domains, n_experts):
    c = _counts(topk_indices, domain_ids, n_domains, n_experts)
    return c / c.sum(1, keepdim=True)  # an empty domain's row: 0/0 = NaN


def _global_norm(topk_indices, domain_ids, n_domains, n_experts):
    c = _counts(topk_indices, domain_ids, n_domains, n_experts)
    return c / c.sum()


def _spec_cases() -> list[Case]:
    g = torch.Generator().manual_seed(80)

    def distinct_topk(t: int, e: int, k: int) -> Tensor:
        return torch.rand(t, e, generator=g).topk(k, dim=-1).indices

    return [
        Case(
            "6 tokens, 2 domains, 4 experts, top-2",
            (
                torch.tensor([[0, 1], [0, 2], [1, 0], [3, 2], [3, 1], [2, 0]]),  # column sums 4, 3, 3, 2
                torch.tensor([0, 0, 0, 1, 1, 1]),
                2,
                4,
            ),
        ),
        Case(
            "unequal domains: 40 tokens, 3 domains, 8 experts, top-2",
            (distinct_topk(40, 8, 2), torch.tensor([0] * 25 + [1] * 10 + [2] * 5), 3, 8),
        ),
        Case(
            "a domain with no tokens (its row is all zeros), top-3",
            (distinct_topk(12, 6, 3), torch.randint(0, 2, (12,), generator=g), 3, 6),
        ),
    ]


def check_specialization_matrix(fn: Callable[..., Tensor]) -> CheckResult:
    """Check ``fn(topk_indices, domain_ids, n_domains, n_experts)`` against the library's."""
    return check_function(
        "specialization matrix",
        fn,
        reference_specialization_matrix,
        _spec_cases(),
        mistakes=[
            Mistake(
                "you returned raw counts: divide each domain's row by its number of picks so the "
                "rows sum to 1 (domains have different numbers of tokens).",
                _raw_counts,
            ),
            Mistake(  # (before the column one: in the first case both give the same numbers)
                "you divided each domain's counts by its number of tokens, so the rows sum to K: divide "
                "by its number of picks (tokens x K), so each row sums to 1.",
                _per_token,
            ),
            Mistake(
                "you normalized each expert's column (sum over domains) instead of each domain's "
                "row: the question is 'where do this domain's tokens go?'.",
                _per_expert,
            ),
            Mistake(
                "you counted only each token's first choice: count all K picks (every column of "
                "topk_indices).",
                _top1_only,
            ),
            Mistake(
                "you divided by the total over all domains: normalize within each domain's row.",
                _global_norm,
            ),
            Mistake(
                "a domain with no tokens has a row sum of 0, and dividing by it gives 0/0 = NaN: divide by "
                "the row sum .clamp_min(1), so an empty domain's row stays all zeros.",
                _no_clamp,
            ),
        ],
    )
