"""Expert parallelism (EP): the routed experts are split over ranks, tokens travel to their experts.

With W ranks and E routed experts, rank r owns the E/W experts ``r*E/W .. (r+1)*E/W - 1``; the
router and the shared expert are replicated. Every rank brings its own tokens (data parallel) and
one forward pass does

1. route locally: ``topk_indices`` / ``topk_weights``                          # [T, K]
2. (optional) capacity: each expert accepts at most C = ceil(capacity_factor * T*K/E) pairs from
   this rank (first choices before second choices, as in lesson 05); the others are dropped and
   reported
3. sort the kept (token, slot) pairs by expert (``plan_dispatch``): experts are contiguous per rank,
   so the pairs for rank 0 come first, then rank 1, ...
4. exchange the counts (``all_to_all_single`` of E ints), then the token rows themselves
   (``all_to_all_single`` with uneven split sizes): the **dispatch**
5. run the local experts on the received rows (``dispatch_combine``)
6. send the results back along the same routes (the reverse all-to-all): the **combine**
7. weight them with the router weights and sum them per token, add the shared expert.

Backward runs the two all-to-alls in reverse (an all-to-all's gradient is the all-to-all with the
split sizes swapped). The result equals the single-process :class:`~glm4moe_lib.moe.MoE` on the
concatenation of every rank's tokens; the replicated parameters' gradients must be summed over
ranks (:meth:`EPMoE.allreduce_replicated_grads`) as data parallelism does.

Backends: gloo on CPU, NCCL on GPUs (``init_distributed`` starts from ``pick_device``, so
``GLM4MOE_DEVICE`` decides, and uses ``cuda:LOCAL_RANK`` when the node has a GPU for every local
rank, else gloo on the CPU). Every rank must call forward and backward together; if a peer dies,
the collectives fail (or time out after the process group's ``timeout``) and the layer raises
:class:`ExpertParallelError`.

Run the check on N local processes::

    torchrun --nproc-per-node 2 -m glm4moe_lib.parallel --tokens 32 --skew 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import math
import numbers
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import MoEConfig, check_real, preset
from .dispatch import capacity_keep_mask, check_expert_ids, dispatch_combine, expert_capacity, plan_dispatch
from .experts import ACT_FNS, MLP
from .moe import MoE, check_layer_input
from .router import TopkRouter

__all__ = [
    "EPMoE",
    "EPStats",
    "ExpertParallelError",
    "RankOutcome",
    "a2a_bytes_formula",
    "all_to_all",
    "capacity_keep_mask",
    "check_world_size",
    "comm_bytes_per_token",
    "expert_owner",
    "init_distributed",
    "launch",
    "launch_outcomes",
    "make_inputs",
    "reference_forward",
    "run_check",
    "run_demo",
    "send_counts",
    "traffic_matrix",
]


# ---- who owns what --------------------------------------------------------------------------------


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r} is not allowed: it must be an integer in [0, 2**64)")


def _check_tokens_per_rank(tokens_per_rank: Any) -> list[int]:
    """A list of token counts, one int >= 0 per rank, or a clear error."""
    ok = isinstance(tokens_per_rank, Sequence) and not isinstance(tokens_per_rank, str)
    if not ok or not all(_is_int_at_least(t, 0) for t in tokens_per_rank):
        raise ValueError(
            f"tokens_per_rank={tokens_per_rank!r} is not allowed: it must be an int >= 0 (the same for "
            "every rank) or a list of ints >= 0, one per rank"
        )
    return list(tokens_per_rank)


def _check_capacity_factor(capacity_factor: Any) -> None:
    if capacity_factor is not None:
        expert_capacity(1, 1, 1, capacity_factor)  # a finite number > 0, or its ValueError


def check_world_size(num_experts: int, world_size: int) -> int:
    """Experts per rank; ValueError unless both are positive integers and ``world_size`` divides
    ``num_experts``."""
    if not _is_positive_int(num_experts):
        raise ValueError(f"num_experts={num_experts!r} is not allowed: it must be a positive integer")
    if not _is_positive_int(world_size):
        raise ValueError(f"world_size={world_size!r} is not allowed: it must be a positive integer")
    if num_experts % world_size != 0:
        allowed = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"world_size={world_size} is not allowed with n_routed_experts={num_experts}: every rank "
            f"must own the same number of experts, so world_size must divide n_routed_experts "
            f"(allowed world sizes: {allowed})"
        )
    return num_experts // world_size


def expert_owner(expert: Tensor, num_experts: int, world_size: int) -> Tensor:
    """The rank that owns each expert id (contiguous blocks of E/W experts per rank)."""
    per_rank = check_world_size(num_experts, world_size)
    check_expert_ids(expert, num_experts, "expert")
    return torch.div(expert, per_rank, rounding_mode="floor")


def send_counts(topk_indices: Tensor, num_experts: int, world_size: int) -> Tensor:
    """How many (token, slot) pairs of one rank go to each rank: [T, K] -> [W] int64."""
    per_rank = check_world_size(num_experts, world_size)
    check_expert_ids(topk_indices, num_experts, "topk_indices")
    owner = torch.div(topk_indices.reshape(-1), per_rank, rounding_mode="floor")  # [T*K]
    return torch.bincount(owner, minlength=world_size)


def traffic_matrix(topk_indices_per_rank: Sequence[Tensor], num_experts: int, world_size: int) -> Tensor:
    """The all-to-all traffic in rows: [W, W], entry [s, d] = pairs rank s sends to rank d."""
    check_world_size(num_experts, world_size)
    if not isinstance(topk_indices_per_rank, (Sequence, Tensor)):
        raise TypeError(
            f"topk_indices_per_rank is a {type(topk_indices_per_rank).__name__}: pass a list with one "
            "[T, K] tensor of expert ids per rank"
        )
    for i, idx in enumerate(topk_indices_per_rank):
        check_expert_ids(idx, num_experts, f"topk_indices_per_rank[{i}]")
    if len(topk_indices_per_rank) != world_size:
        raise ValueError(
            f"topk_indices_per_rank has {len(topk_indices_per_rank)} entries: expected one per rank "
            f"(world_size={world_size})"
        )
    return torch.stack([send_counts(idx, num_experts, world_size) for idx in topk_indices_per_rank])


def a2a_bytes_formula(tokens: int, top_k: int, hidden_size: int, world_size: int, elem_size: int) -> float:
    """Expected bytes one rank sends to *other* ranks in one dispatch, under uniform routing.

    Each of the tokens*top_k rows (hidden_size * elem_size bytes) lands on a uniformly random
    rank, so a fraction (W-1)/W leaves the rank. The combine sends the same amount back.
    """
    for name, value in (
        ("tokens", tokens),
        ("top_k", top_k),
        ("hidden_size", hidden_size),
        ("elem_size", elem_size),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number >= 0")
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size <= 0:
        raise ValueError(f"world_size={world_size!r} is not allowed: it must be a positive integer")
    return tokens * top_k * hidden_size * elem_size * (world_size - 1) / world_size


def comm_bytes_per_token(config: MoEConfig, world_size: int, elem_size: int = 2) -> dict[str, float]:
    """All-to-all bytes per token for one MoE layer (uniform routing), e.g. GLM-4.5 in bf16.

    ``dispatch`` and ``combine`` are one direction each; a training step also runs both in
    backward, so ``train_step`` is 4x the dispatch.
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__} (see preset)")
    check_world_size(config.n_routed_experts, world_size)
    dispatch = a2a_bytes_formula(1, config.num_experts_per_tok, config.hidden_size, world_size, elem_size)
    return {
        "dispatch": dispatch,
        "combine": dispatch,
        "forward": 2 * dispatch,
        "train_step": 4 * dispatch,
        "experts_per_rank": config.n_routed_experts // world_size,
    }


# ---- the differentiable all-to-all ------------------------------------------------------------------


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel layer failed: a peer died, hung or disagreed."""


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _a2a_raw(
    output: Tensor, input: Tensor, output_splits: list[int], input_splits: list[int], group, what: str
) -> Tensor:
    rank, world = _group_info(group)
    if world == 1:
        output.copy_(input)
        return output
    try:
        dist.all_to_all_single(output, input, output_splits, input_splits, group=group)
    except Exception as exc:  # gloo: connection closed / timeout; NCCL: watchdog errors
        raise ExpertParallelError(
            f"expert parallelism: all_to_all ({what}) failed on rank {rank} of {world}. A peer rank "
            f"has probably died or stopped calling the layer (every rank must run forward and "
            f"backward together). Stopping instead of waiting. Cause: {type(exc).__name__}: {exc}"
        ) from exc
    return output


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the all-to-all with the split sizes swapped.

    ``torch.distributed.nn.functional.all_to_all_single`` does the same but is deprecated in
    torch 2.13 (a FutureWarning); this one also turns a failed collective into ExpertParallelError.
    """

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group, what: str):
        ctx.splits, ctx.group, ctx.what = (output_splits, input_splits), group, what
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        return _a2a_raw(out, x.contiguous(), output_splits, input_splits, group, what)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(input_splits), *grad_out.shape[1:]))
        grad_in = _a2a_raw(
            grad_in, grad_out.contiguous(), input_splits, output_splits, ctx.group, ctx.what + " backward"
        )
        return grad_in, None, None, None, None


def all_to_all(
    x: Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None = None,
    what: str = "tokens",
) -> Tensor:
    """Differentiable ``all_to_all_single`` with uneven splits: rows [sum(input_splits), ...] ->
    [sum(output_splits), ...]; rows input_splits[j] go to rank j. Failures raise ExpertParallelError.

    Both split lists hold one non-negative int per rank of ``group`` and ``input_splits`` must add up
    to ``x``'s rows; alone (world size 1) both must be ``[len(x)]``.
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        got = "a 0-d tensor" if isinstance(x, Tensor) else f"a {type(x).__name__}"
        raise TypeError(f"x is {got}: pass a tensor of rows [N, ...] to exchange")
    _, world = _group_info(group)
    splits = {"output_splits": output_splits, "input_splits": input_splits}
    for name, value in splits.items():
        ok = isinstance(value, Sequence) and not isinstance(value, str)
        if not ok or len(value) != world or not all(_is_int_at_least(v, 0) for v in value):
            raise ValueError(
                f"{name}={value!r} is not allowed: it must be a list of {world} non-negative ints, "
                f"one per rank of the group (world size {world})"
            )
    if sum(input_splits) != x.shape[0]:
        raise ValueError(
            f"input_splits={list(input_splits)!r} adds up to {sum(input_splits)} rows, but x has "
            f"{x.shape[0]}: the splits must add up to x.shape[0]"
        )
    if world == 1 and list(output_splits) != list(input_splits):
        raise ValueError(
            f"output_splits={list(output_splits)!r} is not allowed with input_splits={list(input_splits)!r} "
            "and no other rank: a rank alone receives exactly what it sends, so they must be equal"
        )
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group, what)


# ---- statistics ------------------------------------------------------------------------------------


@dataclass
class EPStats:
    """What one rank sent and received in one forward (dispatch direction; the combine mirrors it).

    Rows are (token, slot) pairs: a token sent to K experts is K rows of hidden_size values.
    """

    rank: int
    world_size: int
    hidden_size: int
    elem_size: int  # bytes per value (4 for fp32, 2 for bf16)
    tokens: int  # local tokens T
    first_expert: int  # this rank owns experts first_expert .. first_expert + len(expert_load) - 1
    sent: list[int]  # [W] rows sent to each rank (to itself included)
    received: list[int]  # [W] rows received from each rank
    expert_load: list[int]  # [E/W] rows each local expert computed
    capacity: int | None = None  # pairs per expert accepted from this rank (None: dropless)
    dropped: int = 0  # pairs this rank dropped (capacity)
    dropped_per_expert: list[int] = field(default_factory=list)  # [E] pairs dropped, per expert

    @property
    def tokens_sent(self) -> int:
        return sum(self.sent)

    @property
    def tokens_received(self) -> int:
        return sum(self.received)

    @property
    def remote_sent(self) -> int:
        return self.tokens_sent - self.sent[self.rank]

    @property
    def remote_received(self) -> int:
        return self.tokens_received - self.received[self.rank]

    @property
    def bytes_sent(self) -> int:
        return self.tokens_sent * self.hidden_size * self.elem_size

    @property
    def bytes_received(self) -> int:
        return self.tokens_received * self.hidden_size * self.elem_size

    @property
    def remote_bytes_sent(self) -> int:
        """Bytes that actually leave the rank in one dispatch (the self-send is a local copy)."""
        return self.remote_sent * self.hidden_size * self.elem_size

    @property
    def remote_bytes_received(self) -> int:
        return self.remote_received * self.hidden_size * self.elem_size

    @property
    def load(self) -> int:
        """Rows this rank's experts computed."""
        return sum(self.expert_load)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in (
            "tokens_sent",
            "tokens_received",
            "remote_sent",
            "remote_received",
            "bytes_sent",
            "bytes_received",
            "remote_bytes_sent",
            "remote_bytes_received",
            "load",
        ):
            d[name] = getattr(self, name)
        return d

    def summary(self) -> str:
        """One line per rank for the demo's printout."""
        drop = (
            f", dropped {self.dropped} pairs (capacity {self.capacity})" if self.capacity is not None else ""
        )
        return (
            f"rank {self.rank}/{self.world_size}: {self.tokens} tokens; sent {self.sent} rows "
            f"({self.bytes_sent} B, {self.remote_bytes_sent} B off-rank); received {self.received} rows "
            f"({self.bytes_received} B); load per local expert {self.expert_load} = {self.load}{drop}"
        )


# ---- the layer ----------------------------------------------------------------------------------


class LocalExperts(nn.Module):
    """This rank's shard of the routed experts: experts first .. first + E/W - 1."""

    def __init__(self, config: MoEConfig, num_local: int, first: int) -> None:
        super().__init__()
        h, i = config.hidden_size, config.moe_intermediate_size
        self.num_local, self.first = num_local, first
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * i, h))  # [E/W, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_local, h, i))  # [E/W, H, I]
        self.act_fn = ACT_FNS[config.hidden_act]
        nn.init.uniform_(self.gate_up_proj, -(h**-0.5), h**-0.5)
        nn.init.uniform_(self.down_proj, -(i**-0.5), i**-0.5)


class EPMoE(nn.Module):
    """The GLM-4.5 MoE layer with its routed experts sharded over the ranks of ``group``.

    ``forward`` takes this rank's tokens [..., H] and returns their outputs, equal to ``MoE`` on
    all ranks' tokens. ``capacity_factor`` (None: dropless) caps the pairs each expert accepts
    from each rank; dropped pairs contribute nothing (the shared expert still runs).
    Without an initialized process group the layer runs alone (world size 1).

    Every rank of the group must call forward (and backward) together, with inputs that agree on
    ``requires_grad``: the all-to-alls are collectives, and a rank that skips one makes the others
    fail after the process group's timeout.
    """

    def __init__(
        self,
        config: MoEConfig,
        group: dist.ProcessGroup | None = None,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config, self.group = config, group
        self.rank, self.world_size = _group_info(group)
        if self.rank < 0:
            raise ValueError(
                f"group={group!r} is not allowed on global rank {dist.get_rank()}: this process is not "
                "a member of it; build the layer only on the ranks of its group"
            )
        self.num_local = check_world_size(config.n_routed_experts, self.world_size)
        _check_capacity_factor(capacity_factor)
        self.capacity_factor = capacity_factor
        self.gate = TopkRouter(config)  # replicated
        self.experts = LocalExperts(config, self.num_local, self.rank * self.num_local)
        self.shared_experts = (
            MLP(config.hidden_size, config.shared_intermediate_size, config.hidden_act)
            if config.n_shared_experts > 0
            else None
        )
        self.last_stats: EPStats | None = None
        self.last_keep: Tensor | None = None  # [T, K] bool, False for dropped pairs

    @classmethod
    def from_moe(
        cls, moe: MoE, group: dist.ProcessGroup | None = None, capacity_factor: float | None = None
    ) -> EPMoE:
        """This rank's EP layer from a full ``MoE``: same router and shared expert, its expert shard."""
        if not isinstance(moe, MoE):
            raise TypeError(
                f"moe of type {type(moe).__name__} is not allowed: it must be a glm4moe_lib.moe.MoE "
                "(build one with MoE(config))"
            )
        ep = cls(moe.config, group, capacity_factor)
        param = moe.experts.gate_up_proj
        ep.to(device=param.device, dtype=param.dtype)
        lo, hi = ep.experts.first, ep.experts.first + ep.num_local
        with torch.no_grad():
            ep.gate.load_state_dict(moe.gate.state_dict())
            ep.experts.gate_up_proj.copy_(moe.experts.gate_up_proj[lo:hi])
            ep.experts.down_proj.copy_(moe.experts.down_proj[lo:hi])
            if ep.shared_experts is not None:
                ep.shared_experts.load_state_dict(moe.shared_experts.state_dict())
        return ep

    def replicated_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters every rank holds a full copy of (router, shared expert)."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("experts.")]

    @torch.no_grad()
    def allreduce_replicated_grads(self) -> None:
        """Sum the replicated parameters' grads over the group (what DDP does for them)."""
        if self.world_size == 1:
            return
        for _, p in self.replicated_parameters():
            if p.grad is None:  # every rank must take part in every all_reduce
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.group)

    @torch.no_grad()
    def gather_full_grads(self) -> dict[str, Tensor]:
        """Full-size grads named as ``MoE``'s parameters, on every rank (for comparison).

        Replicated grads are summed over ranks, expert grads concatenated in expert order.
        """
        grads: dict[str, Tensor] = {}
        for name, p in self.named_parameters():
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            if self.world_size > 1:
                if name.startswith("experts."):
                    parts = [torch.empty_like(g) for _ in range(self.world_size)]
                    dist.all_gather(parts, g, group=self.group)
                    g = torch.cat(parts)
                else:
                    dist.all_reduce(g, group=self.group)
            grads[name] = g
        return grads

    def forward(self, hidden_states: Tensor, return_stats: bool = False) -> Tensor | tuple[Tensor, EPStats]:
        """This rank's tokens [..., H] -> [..., H]; with ``return_stats`` also the EPStats."""
        cfg, world, e_local = self.config, self.world_size, self.num_local
        h, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
        check_layer_input(hidden_states, h, self.experts.gate_up_proj, "ep")
        orig_shape = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [T, H]
        tokens = x.shape[0]
        routing = self.gate(x)
        idx, w = routing.topk_indices, routing.topk_weights  # [T, K] each

        # 2. capacity: drop the pairs past each expert's capacity (first come, first served)
        cap = None
        keep = torch.ones_like(idx, dtype=torch.bool)  # [T, K]
        if self.capacity_factor is not None:
            cap = expert_capacity(tokens, e, k, self.capacity_factor)
            keep = capacity_keep_mask(idx, e, cap)

        # 3. sort the kept pairs by expert: rank 0's experts first, then rank 1's, ...
        plan = plan_dispatch(idx, e)
        kept = keep.reshape(-1)[plan.order]  # [T*K] in expert order
        order, token_ids, expert_ids = plan.order[kept], plan.token_ids[kept], plan.expert_ids[kept]
        counts = torch.bincount(expert_ids, minlength=e)  # [E] kept pairs per expert

        # 4. exchange counts, then the rows (uneven splits)
        recv_counts = torch.empty_like(counts)  # [W * E/W]: from rank s for my local expert j
        _a2a_raw(recv_counts, counts, [e_local] * world, [e_local] * world, self.group, "counts")
        recv_counts = recv_counts.view(world, e_local)  # [W, E/W]
        send_splits = counts.view(world, e_local).sum(1).tolist()  # [W]
        recv_splits = recv_counts.sum(1).tolist()  # [W]
        x_recv = all_to_all(x[token_ids], recv_splits, send_splits, self.group, "dispatch")  # [N_recv, H]

        # 5. run the local experts; the received rows are grouped by (source rank, local expert)
        local_ids = torch.arange(e_local, device=x.device).repeat(world)  # [W * E/W]
        local_ids = torch.repeat_interleave(local_ids, recv_counts.reshape(-1))  # [N_recv]
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        if x_recv.shape[0] > 0:
            ones = torch.ones(local_ids.shape[0], 1, dtype=torch.float32, device=x.device)
            y_recv = dispatch_combine(
                x_recv,
                local_ids[:, None],
                ones,
                gate_up,
                down,
                self.experts.act_fn,
                strategy=cfg.dispatch,
                check_ids=False,  # local ids in [0, E/W) by construction
            )  # [N_recv, H]
        else:
            # Nothing to compute, but keep y_recv in the autograd graph (of x_recv and the expert
            # weights) so that this rank, like every other, runs the backward all-to-alls.
            y_recv = x_recv + 0 * (gate_up.sum() + down.sum()).to(x_recv.dtype)  # [0, H]

        # 6. send the results back along the same routes, 7. weight and sum per token
        y_back = all_to_all(y_recv, send_splits, recv_splits, self.group, "combine")  # [N_sent, H]
        w_sent = w.reshape(-1)[order, None]  # [N_sent, 1] float32
        out = torch.zeros_like(x).index_add(0, token_ids, (y_back * w_sent).to(x.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        dropped_per_expert = torch.bincount(idx[~keep], minlength=e)  # [E]
        stats = EPStats(
            rank=self.rank,
            world_size=world,
            hidden_size=h,
            elem_size=x.element_size(),
            tokens=tokens,
            first_expert=self.experts.first,
            sent=send_splits,
            received=recv_splits,
            expert_load=recv_counts.sum(0).tolist(),
            capacity=cap,
            dropped=int(dropped_per_expert.sum()),
            dropped_per_expert=dropped_per_expert.tolist(),
        )
        self.last_stats, self.last_keep = stats, keep
        out = out.reshape(orig_shape)
        return (out, stats) if return_stats else out


# ---- references and the check --------------------------------------------------------------------


def make_inputs(
    config: MoEConfig, tokens_per_rank: Sequence[int], seed: int = 0, skew: float = 0.0
) -> tuple[MoE, list[Tensor], list[Tensor]]:
    """The same full MoE, per-rank inputs and per-rank loss weights on every rank (seeded).

    ``skew`` > 0 adds a selection bias favouring low-numbered experts (rank 0's), so the
    all-to-all splits become very uneven (some ranks may receive nothing).
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__} (see preset)")
    tokens_per_rank = _check_tokens_per_rank(tokens_per_rank)
    _check_seed(seed)
    check_real("skew", skew)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moe = MoE(config)
    if skew:
        with torch.no_grad():
            moe.gate.e_score_correction_bias.copy_(skew * torch.linspace(1.0, 0.0, config.n_routed_experts))
    total = sum(tokens_per_rank)
    x = torch.randn(total, config.hidden_size, generator=gen)
    g = torch.randn(total, config.hidden_size, generator=gen)
    return moe, list(x.split(list(tokens_per_rank))), list(g.split(list(tokens_per_rank)))


def reference_forward(moe: MoE, chunks: Sequence[Tensor], capacity_factor: float | None = None) -> Tensor:
    """Single-process outputs for all ranks' tokens [sum T_r, H], with EP's capacity rule applied
    per rank chunk (dropped pairs get weight 0). Without a capacity it is ``moe(cat(chunks))``."""
    chunks = list(chunks) if isinstance(chunks, Sequence) else chunks
    if not isinstance(chunks, list) or not chunks or not all(isinstance(c, Tensor) for c in chunks):
        raise ValueError(
            f"chunks={chunks!r} is not allowed: pass a non-empty list of [T_r, H] tensors, one per rank"
        )
    x = torch.cat(chunks)
    if capacity_factor is None:
        return moe(x)
    cfg = moe.config
    routing = moe.gate(x)
    keep = torch.cat(
        [
            capacity_keep_mask(
                idx,
                cfg.n_routed_experts,
                expert_capacity(len(idx), cfg.n_routed_experts, cfg.num_experts_per_tok, capacity_factor),
            )
            for idx in routing.topk_indices.split([len(c) for c in chunks])
        ]
    )
    out = moe.experts(x, routing.topk_indices, routing.topk_weights * keep)
    return out + moe.shared_experts(x) if moe.shared_experts is not None else out


def run_check(
    config: MoEConfig | str = "tiny",
    tokens_per_rank: int | Sequence[int] = 16,
    seed: int = 0,
    skew: float = 0.0,
    capacity_factor: float | None = None,
    group: dist.ProcessGroup | None = None,
    return_tensors: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """On every rank of ``group``: EP forward + backward vs the single-process MoE (same weights).

    Returns this rank's stats (as a dict), the largest output/grad differences, whether all of them
    are within ``atol + rtol * |reference|`` (``close``), its routing choices and kept pairs, and
    with ``return_tensors`` its input, outputs, input grads and full parameter grads.
    """
    cfg = preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"config must be a MoEConfig or a preset name, got {type(config).__name__}")
    rank, world = _group_info(group)
    if _is_int_at_least(tokens_per_rank, 0):
        tokens_per_rank = [tokens_per_rank] * world
    tokens_per_rank = _check_tokens_per_rank(tokens_per_rank)
    _check_seed(seed)
    check_real("skew", skew)
    _check_capacity_factor(capacity_factor)
    check_real("atol", atol, 0)
    check_real("rtol", rtol, 0)
    if len(tokens_per_rank) != world:
        raise ValueError(
            f"tokens_per_rank={list(tokens_per_rank)} needs one entry per rank (world_size={world})"
        )
    moe, xs, gs = make_inputs(cfg, tokens_per_rank, seed, skew)
    device = _rank_device()
    moe.to(device)
    xs, gs = [x.to(device) for x in xs], [g.to(device) for g in gs]

    ep = EPMoE.from_moe(moe, group, capacity_factor)
    x = xs[rank].clone().requires_grad_(True)
    out, stats = ep(x, return_stats=True)
    (out * gs[rank]).sum().backward()
    grads = ep.gather_full_grads()

    x_all = torch.cat(xs).requires_grad_(True)
    ref = reference_forward(moe, x_all.split(list(tokens_per_rank)), capacity_factor)
    (ref * torch.cat(gs)).sum().backward()
    ref_out = ref.split(list(tokens_per_rank))[rank]
    ref_dx = x_all.grad.split(list(tokens_per_rank))[rank]
    ref_grads = dict(moe.named_parameters())
    grad_err = max(float((grads[n] - p.grad).abs().max()) for n, p in ref_grads.items())
    pairs = [(out, ref_out), (x.grad, ref_dx)] + [(grads[n], p.grad) for n, p in ref_grads.items()]
    close = all(torch.allclose(a.detach(), b.detach(), rtol=rtol, atol=atol) for a, b in pairs)
    result: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "stats": stats.to_dict(),
        "max_out_err": float((out - ref_out).detach().abs().max()) if out.numel() else 0.0,
        "max_dx_err": float((x.grad - ref_dx).abs().max()) if out.numel() else 0.0,
        "max_grad_err": grad_err,
        "close": close,  # every output and gradient within atol + rtol * |reference|
        "topk_indices": ep.gate(xs[rank]).topk_indices.cpu(),
        "keep": ep.last_keep.cpu(),
    }
    if return_tensors:
        result.update(
            x=xs[rank].cpu(),
            out=out.detach().cpu(),
            dx=x.grad.cpu(),
            grads={n: t.cpu() for n, t in grads.items()},
        )
    return result


# ---- launching processes --------------------------------------------------------------------------


def _rank_device() -> torch.device:
    """This rank's device: :func:`~glm4moe_lib.pick_device` (``GLM4MOE_DEVICE`` or auto), per rank.

    CUDA becomes ``cuda:LOCAL_RANK`` (NCCL) when this node has a GPU for every local rank, else the
    CPU (gloo): every rank decides alike, so a 4-rank launch on a 1-GPU machine runs gloo on the
    CPU rather than asking for cuda:1..3. A single rank keeps an explicit ``cuda:N``. MPS has no
    collective backend, so it also means the CPU. ``GLM4MOE_DEVICE=cpu`` forces gloo.
    """
    from .device import pick_device

    device = pick_device()
    if device.type != "cuda":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local_world == 1 and device.index is not None:
        return device
    if local_world <= torch.cuda.device_count():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(timeout_s: float = 60.0, store: dist.Store | None = None) -> torch.device:
    """Initialize the default process group from torchrun's environment; returns this rank's device.

    NCCL on ``cuda:LOCAL_RANK`` when the device is CUDA (see :func:`_rank_device`: ``pick_device``,
    so ``GLM4MOE_DEVICE`` decides), else gloo on the CPU. ``timeout_s`` bounds how long a collective
    waits for a peer before failing.
    """
    device = _rank_device()
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if store is not None:
        kwargs.update(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)
    return device


@dataclass
class RankOutcome:
    """How one launched rank ended: its return value, or the error it raised (or its exit code)."""

    rank: int
    exitcode: int | None  # None: still running when the launcher gave up (then killed)
    result: Any = None
    error: str | None = None
    elapsed_s: float = 0.0  # from launch until the rank was seen finished

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    out_dir: str,
    pg_timeout_s: float,
    stack_after_s: float,
) -> None:
    import faulthandler

    # If this rank is still running when the launcher gives up, leave its Python stacks behind.
    stack_file = open(Path(out_dir) / f"rank{rank}.stack", "w")  # noqa: SIM115 (kept open until exit)
    faulthandler.dump_traceback_later(stack_after_s, file=stack_file)
    if hasattr(signal, "SIGUSR1"):  # the launcher asks for the stacks before it kills a stalled rank
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # localhost only
    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pt"
    phase = "init"
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=pg_timeout_s))
        init_distributed(pg_timeout_s, store=store)
        (Path(out_dir) / f"rank{rank}.ready").touch()
        phase = "run"
        result = fn(*args, **kwargs)
        torch.save({"result": result, "error": None, "phase": phase}, path)
    except BaseException as exc:  # report it to the launcher, then exit non-zero
        msg = f"{type(exc).__name__}: {exc}"
        torch.save({"result": None, "error": msg, "traceback": traceback.format_exc(), "phase": phase}, path)
        sys.stderr.write(f"[rank {rank}] {msg}\n")
        sys.stderr.flush()
        os._exit(1)  # skip the process group's shutdown, which may wait for dead peers
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


def _launch_once(
    ctx,
    fn,
    world_size: int,
    args: tuple,
    kwargs: dict,
    timeout_s: float,
    pg_timeout_s: float,
    init_timeout_s: float,
) -> tuple[list[RankOutcome], bool]:
    """One attempt; returns the outcomes and whether setting up the process group failed."""
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False)
    outcomes: list[RankOutcome | None] = [None] * world_size
    init_failed = False
    with tempfile.TemporaryDirectory(prefix="glm4moe_ep_") as out_dir:
        out = Path(out_dir)
        stack_after_s = max(timeout_s - 1, 0.5)
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, store.port, fn, args, kwargs, out_dir, pg_timeout_s, stack_after_s),
                daemon=True,
            )
            for r in range(world_size)
        ]
        start = time.monotonic()
        for p in procs:
            p.start()
        ready = False
        while time.monotonic() - start < timeout_s and any(o is None for o in outcomes):
            for r, p in enumerate(procs):
                if outcomes[r] is None and p.exitcode is not None:
                    outcomes[r] = RankOutcome(r, p.exitcode, elapsed_s=time.monotonic() - start)
            ready = ready or all((out / f"rank{r}.ready").exists() for r in range(world_size))
            if not ready:
                exited_early = any(
                    o is not None and not (out / f"rank{o.rank}.ready").exists() for o in outcomes
                )
                if exited_early or time.monotonic() - start > init_timeout_s:
                    init_failed = True  # the process group never came up: give up this attempt
                    break
            time.sleep(0.02)
        stalled = [p for r, p in enumerate(procs) if outcomes[r] is None and p.pid is not None]
        if stalled and hasattr(signal, "SIGUSR1"):  # have them write where they are, then kill them
            for p in stalled:
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGUSR1)
            time.sleep(0.5)
        for r, p in enumerate(procs):
            if outcomes[r] is None:  # still running: kill it
                p.kill()
                p.join(5)
                stack_path = out / f"rank{r}.stack"
                stack = stack_path.read_text()[:3000] if stack_path.exists() else ""
                why = (
                    "the process group was not up"
                    if init_failed
                    else f"still running after timeout_s={timeout_s}"
                )
                outcomes[r] = RankOutcome(
                    r, None, error=f"{why}: killed. Its stacks:\n{stack}", elapsed_s=time.monotonic() - start
                )
            path = out / f"rank{r}.pt"
            if path.exists():
                saved = torch.load(path, weights_only=False)
                outcomes[r].result = saved["result"]
                outcomes[r].error = saved["error"] or outcomes[r].error
            elif outcomes[r].error is None and outcomes[r].exitcode != 0:
                outcomes[r].error = f"exited with code {outcomes[r].exitcode} without a result"
    del store
    return [o for o in outcomes if o is not None], init_failed


def launch_outcomes(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 30.0,
    start_method: str | None = None,
    init_timeout_s: float | None = None,
    init_retries: int = 2,
    **kwargs: Any,
) -> list[RankOutcome]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` local processes (127.0.0.1) and report each.

    Every rank gets the default process group (timeout ``pg_timeout_s``; NCCL on ``cuda:RANK`` when
    the device is CUDA and there is a GPU for every rank, else gloo on the CPU: see
    :func:`init_distributed`; ``GLM4MOE_DEVICE=cpu`` forces gloo) and one CPU thread; ranks
    still running after ``timeout_s`` are killed (their Python stacks go into the error).
    ``start_method`` defaults to "fork" on Linux (while CUDA and torch.distributed are not
    initialized here) and "spawn" elsewhere; with "spawn", ``fn`` must be importable.

    Setting up the connections between freshly started processes occasionally fails or stalls
    on a busy machine; if the process group is not up on every rank within ``init_timeout_s``
    (default 10 s with fork, 120 s with spawn), all ranks are killed and started again, up to
    ``init_retries`` times (ranks that had already started ``fn`` start it again: it should be
    safe to repeat, as the checks here are).
    """
    import multiprocessing as mp

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size={world_size!r} is not allowed: it must be a positive integer")
    if start_method is None:  # fork is much faster (no re-import of torch) but unsafe once CUDA is up
        fork_ok = sys.platform.startswith("linux") and not torch.cuda.is_initialized()
        fork_ok = fork_ok and not (dist.is_available() and dist.is_initialized())
        start_method = "fork" if fork_ok else "spawn"
    if init_timeout_s is None:
        init_timeout_s = 10.0 if start_method == "fork" else 120.0
    ctx = mp.get_context(start_method)
    for _ in range(init_retries + 1):
        outcomes, init_failed = _launch_once(
            ctx, fn, world_size, args, kwargs, timeout_s, pg_timeout_s, min(init_timeout_s, timeout_s)
        )
        if not init_failed:
            break
    return outcomes


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 30.0,
    **kwargs: Any,
) -> list[Any]:
    """Like :func:`launch_outcomes` but returns the ranks' results, raising if any rank failed."""
    outcomes = launch_outcomes(
        fn, world_size, *args, timeout_s=timeout_s, pg_timeout_s=pg_timeout_s, **kwargs
    )
    failed = [o for o in outcomes if not o.ok]
    if failed:
        lines = "; ".join(f"rank {o.rank}: {o.error}" for o in failed)
        raise RuntimeError(f"{len(failed)} of {world_size} ranks failed: {lines}")
    return [o.result for o in outcomes]


def run_demo(world_size: int, timeout_s: float = 120.0, **check_kwargs: Any) -> list[dict[str, Any]]:
    """:func:`run_check` on ``world_size`` local processes (see :func:`launch_outcomes`); one result
    dict per rank."""
    return launch(run_check, world_size, timeout_s=timeout_s, **check_kwargs)


# ---- torchrun entry point -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Expert-parallel MoE check: run with torchrun --nproc-per-node N -m glm4moe_lib.parallel"
    )
    parser.add_argument("--preset", default="tiny", help="MoEConfig preset (default: tiny)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skew", type=float, default=0.0, help="bias towards rank 0's experts (uneven splits)"
    )
    parser.add_argument("--capacity-factor", type=float, default=None, help="drop pairs past this capacity")
    parser.add_argument("--timeout", type=float, default=60.0, help="process group timeout (s)")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:  # plain `python -m`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = init_distributed(args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    ok = False
    try:
        res = run_check(
            args.preset,
            args.tokens,
            args.seed,
            args.skew,
            args.capacity_factor,
            atol=args.atol,
            rtol=args.rtol,
        )
        stats = EPStats(**{k: v for k, v in res["stats"].items() if k in EPStats.__dataclass_fields__})
        # [out, dx, grad errors, 1 if not close]: on the rank's device (NCCL needs CUDA tensors)
        errs = torch.tensor(
            [res["max_out_err"], res["max_dx_err"], res["max_grad_err"], 0.0 if res["close"] else 1.0],
            device=device,
        )
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
        errs = errs.cpu()
        for r in range(world):  # print in rank order
            if r == rank:
                print(stats.summary(), flush=True)
            dist.barrier()
        ok = bool(errs[3] == 0)
        if rank == 0:
            print(
                f"world size {world}: max |out - MoE| = {errs[0]:.2e}, max |dx - MoE| = {errs[1]:.2e}, "
                f"max |grad - MoE| = {errs[2]:.2e} -> {'OK' if ok else 'MISMATCH'}",
                flush=True,
            )
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
