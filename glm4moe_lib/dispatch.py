"""Dispatch and combine: send each token to its K experts, bring the results back, weighted.

Every strategy computes the same thing,

    out[t] = sum_k  w[t, k] * expert_{idx[t, k]}(x[t])

and differs only in how the work is laid out:

* ``dense_reference``: every expert on every token, masked by the weights. O(T·E) work: for tests
  and teaching only.
* ``loop``: for each expert, gather its tokens, run it, scatter-add back (transformers' eager loop).
* ``sorted``: sort the T·K (token, slot) pairs by expert so each expert's tokens form one
  contiguous block, run the blocks, and scatter-add the weighted rows back. Dropless, and the memory
  it needs is O(T·K·H): no [T, E, H] or [T, E, C] tensors.

Routing weights are float32; each expert's output is multiplied by its weight in float32 and
cast back to the input dtype before the sum (as transformers does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .experts import swiglu

ActFn = Callable[[Tensor], Tensor]


class DispatchPlan(NamedTuple):
    """The (token, slot) pairs of a batch, sorted by expert."""

    order: Tensor  # [T*K] index into the flattened [T, K] pairs, grouped by expert
    token_ids: Tensor  # [T*K] token of each sorted pair
    expert_ids: Tensor  # [T*K] expert of each sorted pair (non-decreasing)
    counts: Tensor  # [E] how many pairs each expert received
    offsets: Tensor  # [E+1] start of each expert's block; block e is offsets[e]:offsets[e+1]


def plan_dispatch(top_k_index: Tensor, num_experts: int) -> DispatchPlan:
    """Sort the flattened (token, slot) pairs by expert (stable, so tokens stay in order)."""
    top_k = top_k_index.shape[-1]
    flat_experts = top_k_index.reshape(-1)  # [T*K]
    order = torch.argsort(flat_experts, stable=True)  # [T*K]
    counts = torch.bincount(flat_experts, minlength=num_experts)  # [E]
    offsets = F.pad(counts.cumsum(0), (1, 0))  # [E+1]
    return DispatchPlan(order, order // top_k, flat_experts[order], counts, offsets)


def dense_reference(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: ActFn = F.silu,
) -> Tensor:
    """Every expert on every token, then keep each token's K weighted outputs. [T, H]."""
    num_experts = gate_up_proj.shape[0]
    gate, up = torch.einsum("th,eih->eti", hidden_states, gate_up_proj).chunk(2, dim=-1)  # [E, T, I]
    all_out = torch.einsum("eti,ehi->eth", act_fn(gate) * up, down_proj)  # [E, T, H]
    dense_w = torch.zeros(
        hidden_states.shape[0], num_experts, dtype=torch.float32, device=hidden_states.device
    )
    dense_w.scatter_add_(1, top_k_index, top_k_weights.float())  # [T, E], zero off the top-k
    return torch.einsum("te,eth->th", dense_w, all_out.float()).to(hidden_states.dtype)


def loop_dispatch(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: ActFn = F.silu,
) -> Tensor:
    """For each expert that got tokens: gather them, run it, weight, scatter-add back."""
    out = torch.zeros_like(hidden_states)  # [T, H]
    for e in torch.unique(top_k_index).tolist():
        token_idx, slot = torch.where(top_k_index == e)  # [n] each
        y = swiglu(hidden_states[token_idx], gate_up_proj[e], down_proj[e], act_fn)  # [n, H]
        y = y * top_k_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def sorted_dispatch(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: ActFn = F.silu,
) -> Tensor:
    """Sort pairs by expert, run each contiguous block, weighted scatter-add back (dropless)."""
    plan = plan_dispatch(top_k_index, gate_up_proj.shape[0])
    x_sorted = hidden_states[plan.token_ids]  # [T*K, H], grouped by expert
    blocks = []
    for e, (start, end) in enumerate(zip(plan.offsets[:-1].tolist(), plan.offsets[1:].tolist())):
        if end > start:
            blocks.append(swiglu(x_sorted[start:end], gate_up_proj[e], down_proj[e], act_fn))
    y_sorted = torch.cat(blocks) if blocks else x_sorted  # [T*K, H]
    w_sorted = top_k_weights.reshape(-1)[plan.order, None]  # [T*K, 1] float32
    out = torch.zeros_like(hidden_states)
    return out.index_add_(0, plan.token_ids, (y_sorted * w_sorted).to(out.dtype))


STRATEGIES: dict[str, Callable[..., Tensor]] = {
    "loop": loop_dispatch,
    "sorted": sorted_dispatch,
    "dense": dense_reference,
}


def choose_strategy(hidden_states: Tensor, top_k_index: Tensor, num_experts: int) -> str:
    """The strategy "auto" resolves to for this shape and device."""
    return "sorted"


def dispatch_combine(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: ActFn = F.silu,
    strategy: str = "auto",
) -> Tensor:
    """Run the routed experts with the chosen strategy: [T, H] -> [T, H]."""
    if strategy == "auto":
        strategy = choose_strategy(hidden_states, top_k_index, gate_up_proj.shape[0])
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not allowed: use 'auto' or one of {sorted(STRATEGIES)}")
    if hidden_states.shape[0] == 0:
        return torch.zeros_like(hidden_states)
    return STRATEGIES[strategy](hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn)
