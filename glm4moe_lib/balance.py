"""Load balancing: auxiliary losses, the auxiliary-loss-free bias update, and balance metrics.

Normalization conventions differ between papers, and the lessons show both:

* Switch Transformer (top-1): ``N * sum_i f_i P_i`` is 1 for uniform routing.
* transformers' ``load_balancing_loss_func`` counts all K picks, so uniform routing gives K.
* DeepSeek-V3's sequence-wise loss scales f by N/K, so uniform routing gives 1 again.

The coefficient (alpha) is left to the caller: every loss here is returned unscaled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
    rows, num_experts = scores.shape
    if batch_size <= 0 or rows % batch_size != 0:
        raise ValueError(f"batch_size={batch_size} is not allowed: it must divide the {rows} rows")
    seq_len, top_k = rows // batch_size, topk_indices.shape[-1]
    s = scores.float().view(batch_size, seq_len, num_experts)
    p = (s / s.sum(-1, keepdim=True).clamp_min(1e-20)).mean(1)  # [B, E]
    counts = torch.zeros(batch_size, num_experts, device=scores.device)
    counts.scatter_add_(
        1, topk_indices.view(batch_size, -1), torch.ones_like(counts[:, :1]).expand(-1, seq_len * top_k)
    )
    f = counts * num_experts / (top_k * seq_len)  # [B, E]
    return (f * p).sum(-1).mean()


# ---- auxiliary-loss-free balancing ---------------------------------------------------------------


def expert_load(topk_indices: Tensor, num_experts: int) -> Tensor:
    """How many (token, slot) picks each expert got: [E] float32, sums to T*K."""
    return torch.bincount(topk_indices.reshape(-1), minlength=num_experts).float()


@torch.no_grad()
def update_bias(bias: Tensor, load: Tensor, update_rate: float = 1e-3) -> Tensor:
    """Wang et al. 2024 (DeepSeek-V3, GLM-4.5): ``b_i += u * sign(mean load - load_i)``, in place.

    Overloaded experts get a lower selection bias, underloaded ones a higher one. Returns ``bias``.
    """
    if not update_rate >= 0:
        raise ValueError(f"update_rate={update_rate!r} is not allowed: it must be >= 0")
    if load.shape != bias.shape:
        raise ValueError(f"load has shape {tuple(load.shape)}: it must match bias {tuple(bias.shape)}")
    load = load.float()
    bias += update_rate * torch.sign(load.mean() - load).to(bias.dtype)
    return bias


# ---- metrics -------------------------------------------------------------------------------------


def max_violation(load: Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load: 0 is perfectly balanced."""
    load = load.float()
    mean = load.mean()
    if mean <= 0:
        return 0.0
    return float((load.max() - mean) / mean)


def routing_entropy(scores: Tensor) -> float:
    """Mean per-token entropy (nats) of the router's scores normalized to a distribution.

    log(E) means the router cannot tell experts apart; 0 means it is certain.
    """
    p = scores.float() / scores.float().sum(-1, keepdim=True).clamp_min(1e-20)
    return float(-(p * p.clamp_min(1e-20).log()).sum(-1).mean())


def load_entropy(load: Tensor) -> float:
    """Entropy (nats) of the load distribution over experts: log(E) is perfectly balanced."""
    p = load.float() / load.float().sum().clamp_min(1e-20)
    return float(-(p * p.clamp_min(1e-20).log()).sum())
