"""The router (a.k.a. gate): which K experts each token goes to, and with what weights.

GLM-4.5 (``Glm4MoeTopkRouter`` in transformers) does, for T tokens and E experts:

1. ``logits = x @ W.T`` in float32                                  # [T, E]
2. ``scores = sigmoid(logits)`` (the seed lessons and Mixtral: softmax)
3. ``choice = scores + e_score_correction_bias``  (selection only, never the weights)
4. group-limited selection: keep the ``topk_group`` groups whose two best experts sum highest
5. ``topk_indices = topk(choice, K)``                                # [T, K]
6. ``topk_weights = scores[topk_indices]``, optionally / sum, then * ``routed_scaling_factor``

Each step is a small function here, so the lessons can show them one at a time; ``TopkRouter``
chains them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig, check_real


def _check_temperature(temperature: float) -> None:
    """A finite real number > 0 (inf would make every sigmoid score 0.5: a uniform routing)."""
    check_real("temperature", temperature, 0, above=True)


class RouterOutput(NamedTuple):
    """Everything the router decided, for the experts, the losses and the plots."""

    logits: Tensor  # [T, E] float32, before any scoring function
    scores: Tensor  # [T, E] float32, softmax or sigmoid of logits / temperature
    topk_weights: Tensor  # [T, K] float32, the weights the expert outputs are combined with
    topk_indices: Tensor  # [T, K] int64, the chosen experts (distinct per token)


def compute_scores(logits: Tensor, scoring_func: str = "sigmoid", temperature: float = 1.0) -> Tensor:
    """Scores in float32: softmax over experts (probabilities) or an independent sigmoid each."""
    _check_temperature(temperature)
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits is a {type(logits).__name__}: expected a tensor [tokens, experts]")
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    if scoring_func == "softmax":
        return logits.softmax(dim=-1)
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"scoring_func={scoring_func!r} is not allowed: use 'softmax' or 'sigmoid'")


def group_limited_mask(choice: Tensor, n_group: int, topk_group: int) -> Tensor:
    """Boolean mask [T, E]: True for experts in the ``topk_group`` best groups of each token.

    A group's score is the sum of its two highest choice scores (as in DeepSeek-V3 / GLM-4.5).
    ``n_group`` must be a positive integer dividing E, and ``1 <= topk_group <= n_group``.
    """
    if not isinstance(choice, Tensor) or choice.dim() != 2:
        shape = tuple(choice.shape) if isinstance(choice, Tensor) else type(choice).__name__
        raise ValueError(f"choice has shape {shape}: expected [tokens, experts]")
    tokens, num_experts = choice.shape
    # Plain int comparisons only: this runs on every routed call when n_group > 1.
    if isinstance(n_group, bool) or not isinstance(n_group, int) or n_group <= 0 or num_experts % n_group:
        raise ValueError(
            f"n_group={n_group!r} is not allowed: it must be a positive integer dividing the "
            f"{num_experts} experts of choice"
        )
    if isinstance(topk_group, bool) or not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
        raise ValueError(
            f"topk_group={topk_group!r} is not allowed: it must be an integer between 1 and n_group={n_group}"
        )
    if n_group == 1 or topk_group >= n_group:
        return torch.ones_like(choice, dtype=torch.bool)
    per_group = num_experts // n_group
    if per_group < 2:
        raise ValueError(
            f"n_group={n_group} is not allowed with {num_experts} experts: group scores sum each "
            f"group's two best experts, so every group needs at least 2 experts"
        )
    group_scores = choice.view(tokens, n_group, per_group).topk(2, dim=-1).values.sum(-1)  # [T, G]
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return group_mask.unsqueeze(-1).expand(tokens, n_group, per_group).reshape(tokens, num_experts)


def route(
    logits: Tensor,
    config: MoEConfig,
    bias: Tensor | None = None,
    temperature: float = 1.0,
) -> RouterOutput:
    """Steps 2–6 above on precomputed ``logits`` [T, E]; ``bias`` [E] shifts selection only."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits is a {type(logits).__name__}: expected a tensor [tokens, n_routed_experts]")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias is a {type(bias).__name__}: expected a tensor [n_routed_experts] or None")
    _check_temperature(temperature)
    if logits.dim() != 2 or logits.shape[-1] != config.n_routed_experts:
        raise ValueError(
            f"logits has shape {tuple(logits.shape)}: expected [tokens, n_routed_experts="
            f"{config.n_routed_experts}]"
        )
    if bias is not None and tuple(bias.shape) != (config.n_routed_experts,):
        raise ValueError(  # a [1] bias would broadcast silently: a wrong routing, not an error
            f"bias (e_score_correction_bias) has shape {tuple(bias.shape)}: expected "
            f"[n_routed_experts={config.n_routed_experts}]"
        )
    logits = logits.float()
    scores = compute_scores(logits, config.scoring_func, temperature)  # [T, E]
    choice = scores if bias is None else scores + bias.float()  # [T, E] selection scores
    if config.n_group > 1 and config.topk_group < config.n_group:
        keep = group_limited_mask(choice, config.n_group, config.topk_group)
        choice = choice.masked_fill(~keep, float("-inf"))
    topk_indices = choice.topk(config.num_experts_per_tok, dim=-1).indices  # [T, K]
    topk_weights = scores.gather(1, topk_indices)  # [T, K] from the *unbiased* scores
    if config.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * config.routed_scaling_factor
    return RouterOutput(logits, scores, topk_weights, topk_indices)


class TopkRouter(nn.Module):
    """Linear router with a selection bias, as ``Glm4MoeTopkRouter`` (same state_dict keys)."""

    def __init__(self, config: MoEConfig) -> None:
        if not isinstance(config, MoEConfig):
            raise TypeError(
                f"config of type {type(config).__name__} is not allowed: TopkRouter needs a MoEConfig "
                "(use MoEConfig.from_hf for a transformers config)"
            )
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))  # [E, H]
        # Float32 buffer, zero at init: changed by the auxiliary-loss-free balancer, not by SGD.
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # as nn.Linear: U(-1/sqrt(H), 1/sqrt(H))
        self.e_score_correction_bias.zero_()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # model.to(torch.bfloat16) must not round the selection bias: keep it float32 (as
        # transformers' _keep_in_fp32_modules_strict does), only follow the device.
        # fn's own result is kept where it stays float32 (.to(device), to_empty() from the meta device).
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if new is not None and new.dtype != torch.float32:  # cast by fn: from the float32 original instead
            self.e_score_correction_bias = bias.to(new.device, torch.float32)
        return self

    def forward(self, hidden_states: Tensor, temperature: float = 1.0) -> RouterOutput:
        """Route ``hidden_states`` [..., H] (flattened to [T, H]); the math runs in float32."""
        # Cheap attribute checks only (per-call path): a wrong H would otherwise reshape silently.
        if not isinstance(hidden_states, Tensor):
            raise TypeError(
                f"hidden_states is a {type(hidden_states).__name__}: expected a floating-point tensor [..., H]"
            )
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states has shape {tuple(hidden_states.shape)}: expected [..., hidden_size="
                f"{self.config.hidden_size}]"
            )
        if not hidden_states.is_floating_point():
            raise TypeError(
                f"hidden_states has dtype {hidden_states.dtype}: expected a floating-point tensor "
                "(token representations, not token ids)"
            )
        x = hidden_states.reshape(-1, self.config.hidden_size)  # [T, H]
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        return route(logits, self.config, self.e_score_correction_bias, temperature)
