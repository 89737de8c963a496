"""Load balancing: auxiliary losses, the auxiliary-loss-free bias update, and balance metrics.

Normalization conventions differ between papers, and the lessons show both:

* Switch Transformer (top-1): ``N * sum_i f_i P_i`` is 1 for uniform routing.
* transformers' ``load_balancing_loss_func`` counts all K picks, so uniform routing gives K.
* DeepSeek-V3's sequence-wise loss scales f by N/K, so uniform routing gives 1 again.

The coefficient (alpha) is left to the caller: every loss here is returned unscaled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from .dispatch import check_expert_ids


def _stack_logits(router_logits: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(router_logits, Tensor):
        layers = [router_logits]
    elif isinstance(router_logits, (list, tuple)) and len(router_logits) > 0:
        layers = list(router_logits)
    else:
        raise ValueError(
            "router_logits must be a [tokens, experts] tensor or a non-empty sequence of them, "
            f"got {type(router_logits).__name__}"
        )
    num_experts = layers[0].shape[-1]
    for i, layer in enumerate(layers):
        if not isinstance(layer, Tensor) or layer.dim() != 2 or layer.shape[-1] != num_experts:
            shape = tuple(layer.shape) if isinstance(layer, Tensor) else type(layer).__name__
            raise ValueError(
                f"router_logits[{i}] has shape {shape}: every layer must be [tokens, {num_experts}]"
            )
    if sum(layer.shape[0] for layer in layers) == 0:  # a mean over no rows is NaN, not a loss
        raise ValueError("router_logits has 0 rows (tokens) in all layers: a loss needs at least one token")
    return layers


def load_balancing_loss(
    router_logits: Tensor | Sequence[Tensor],
    top_k: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """transformers' ``load_balancing_loss_func``: ``E * sum_e f_e * P_e`` over all layers' rows.

    p = softmax(logits); f_e = (picks of e among the top-k of p) / rows, so sum_e f_e = top_k;
    P_e = mean p_e. ``attention_mask`` [B, S] (1 = real token) weights the rows of every layer,
    whose rows must then be the B*S tokens in order. Uniform routing gives ``top_k``.
    """
    layers = _stack_logits(router_logits)
    num_experts = layers[0].shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} is not allowed: it must be an integer in [1, {num_experts}]")
    logits = torch.cat([layer.float() for layer in layers], dim=0)  # [L*T, E]
    probs = logits.softmax(dim=-1)
    picks = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)  # [L*T, E]
    if attention_mask is None:
        row_w = torch.ones(probs.shape[0], 1, device=probs.device)
    else:
        mask = attention_mask.reshape(-1).to(probs.device, torch.float32)  # [B*S]
        if layers[0].shape[0] != mask.numel() or any(x.shape[0] != mask.numel() for x in layers):
            raise ValueError(
                f"attention_mask has {mask.numel()} positions but the router logits have "
                f"{[x.shape[0] for x in layers]} rows per layer: they must be equal"
            )
        # One scalar sync, only with a mask: an all-padding batch would otherwise give a NaN loss
        # (transformers' load_balancing_loss_func returns NaN there too).
        if not bool(mask.any()):
            raise ValueError(
                "attention_mask has no real tokens (all zeros): the loss is undefined (0 / 0); "
                "skip this batch instead"
            )
        row_w = mask.repeat(len(layers)).unsqueeze(-1)  # [L*T, 1]
    total = row_w.sum()
    f = (picks * row_w).sum(0) / total  # [E], sums to top_k
    p = (probs * row_w).sum(0) / total  # [E], sums to 1
    return num_experts * (f * p).sum()


def switch_loss(router_logits: Tensor | Sequence[Tensor]) -> Tensor:
    """Switch Transformer's auxiliary loss ``N * sum_i f_i P_i`` with top-1 counts (uniform: 1)."""
    return load_balancing_loss(router_logits, top_k=1)


def router_z_loss(router_logits: Tensor | Sequence[Tensor]) -> Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small."""
    logits = torch.cat([x.float() for x in _stack_logits(router_logits)], dim=0)
    return torch.logsumexp(logits, dim=-1).square().mean()


def sequence_balance_loss(scores: Tensor, topk_indices: Tensor, batch_size: int) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``sum_i f_i P_i``, averaged over sequences.

    scores [B*S, E] are the router's (sigmoid) scores, topk_indices [B*S, K] its choices, rows in
    sequence order. Per sequence: f_i = N / (K*S) * count_i, P_i = mean_t s_ti / sum_j s_tj.
    Uniform routing gives 1; multiply by a small alpha (the paper uses 1e-4).
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2 or 0 in scores.shape:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores has shape {shape}: expected a non-empty [tokens, experts] tensor")
    rows, num_experts = scores.shape
    if (
        not isinstance(topk_indices, Tensor)
        or topk_indices.dim() != 2
        or topk_indices.shape[0] != rows
        or topk_indices.shape[1] == 0
    ):
        shape = tuple(topk_indices.shape) if isinstance(topk_indices, Tensor) else type(topk_indices).__name__
        raise ValueError(
            f"topk_indices has shape {shape}: expected [tokens={rows}, K] with K >= 1, as scores"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size={batch_size!r} is not allowed: it must be an integer")
    if batch_size <= 0 or rows % batch_size != 0:
        raise ValueError(f"batch_size={batch_size} is not allowed: it must divide the {rows} rows")
    check_expert_ids(topk_indices, num_experts, "topk_indices")  # a loss, once per step: min/max is cheap
    low = float(scores.detach().min())
    if not low >= 0:  # logits would give a meaningless loss (P_i divides by their sum)
        raise ValueError(
            f"scores has a minimum of {low:g}: expected the router's scores >= 0 (sigmoid of the logits), "
            "not raw logits"
        )
    seq_len, top_k = rows // batch_size, topk_indices.shape[-1]
    s = scores.float().view(batch_size, seq_len, num_experts)
    p = (s / s.sum(-1, keepdim=True).clamp_min(1e-20)).mean(1)  # [B, E]
    counts = torch.zeros(batch_size, num_experts, device=scores.device)
    counts.scatter_add_(
        1,
        topk_indices.long().reshape(batch_size, -1),
        torch.ones_like(counts[:, :1]).expand(-1, seq_len * top_k),
    )
    f = counts * num_experts / (top_k * seq_len)  # [B, E]
    return (f * p).sum(-1).mean()


# ---- auxiliary-loss-free balancing ---------------------------------------------------------------


def expert_load(topk_indices: Tensor, num_experts: int) -> Tensor:
    """How many (token, slot) picks each expert got: [E] float32, sums to T*K.

    ``topk_indices`` holds integer expert ids in [0, num_experts), any shape.
    """
    check_expert_ids(
        topk_indices, num_experts, "topk_indices"
    )  # (and num_experts) bincount reads them all anyway
    return torch.bincount(topk_indices.reshape(-1), minlength=num_experts).float()


@torch.no_grad()
def update_bias(bias: Tensor, load: Tensor, update_rate: float = 1e-3) -> Tensor:
    """Wang et al. 2024 (DeepSeek-V3, GLM-4.5): ``b_i += u * sign(mean load - load_i)``, in place.

    Overloaded experts get a lower selection bias, underloaded ones a higher one. Returns ``bias``.
    """
    if isinstance(update_rate, bool) or not isinstance(update_rate, Real):
        raise TypeError(f"update_rate={update_rate!r} is not allowed: it must be a finite number >= 0")
    if not (update_rate >= 0 and math.isfinite(update_rate)):
        raise ValueError(f"update_rate={update_rate!r} is not allowed: it must be a finite number >= 0")
    if load.shape != bias.shape:
        raise ValueError(f"load has shape {tuple(load.shape)}: it must match bias {tuple(bias.shape)}")
    load = load.float()
    bias += update_rate * torch.sign(load.mean() - load).to(bias.dtype)
    return bias


# ---- metrics -------------------------------------------------------------------------------------


def _check_load(load: Tensor) -> None:
    """A non-empty real tensor of non-negative loads, one per expert, else a clear error."""
    if not isinstance(load, Tensor) or load.numel() == 0 or load.is_complex() or load.dtype == torch.bool:
        what = (
            f"shape {tuple(load.shape)} and dtype {load.dtype}"
            if isinstance(load, Tensor)
            else type(load).__name__
        )
        raise ValueError(f"load has {what}: it must be a non-empty real tensor, one count per expert")
    low = float(load.detach().min())
    if not low >= 0:
        raise ValueError(f"load has a minimum of {low:g}: loads (tokens per expert) must be >= 0")


def max_violation(load: Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load: 0 is perfectly balanced."""
    _check_load(load)
    load = load.detach().float()
    mean = load.mean()
    if mean <= 0:
        return 0.0
    return float((load.max() - mean) / mean)


def routing_entropy(scores: Tensor) -> float:
    """Mean per-token entropy (nats) of the router's scores normalized to a distribution.

    ``scores`` [T, E] must be non-negative (softmax or sigmoid outputs), not raw logits.
    log(E) means the router cannot tell experts apart; 0 means it is certain.
    """
    if scores.dim() == 0 or scores.numel() == 0:
        raise ValueError(
            f"scores has shape {tuple(scores.shape)}: expected a non-empty [tokens, experts] tensor"
        )
    low = float(scores.detach().min())  # a metric, not a training step: one extra pass is fine
    if not low >= 0:
        raise ValueError(
            f"scores has a minimum of {low:g}: expected router scores >= 0 (softmax or sigmoid of the "
            "logits), not raw logits"
        )
    s = scores.detach().float()  # a number to report, not a loss: no graph
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-20)
    return float(-(p * p.clamp_min(1e-20).log()).sum(-1).mean())


def load_entropy(load: Tensor) -> float:
    """Entropy (nats) of the load distribution over experts: log(E) is perfectly balanced.

    ``load`` [E]: tokens (or a share of them) per expert, non-negative; all zeros gives 0."""
    _check_load(load)
    load = load.detach().float()
    p = load / load.sum().clamp_min(1e-20)
    return float(-(p * p.clamp_min(1e-20).log()).sum())
