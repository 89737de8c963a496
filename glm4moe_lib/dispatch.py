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

The fast paths (what ``"auto"`` picks, see :func:`choose_strategy`):

* ``fused_cpu`` (float32 on a CPU, up to some dozens of rows per expert, and for inference at every
  T in layers up to H=512): the C kernel of :mod:`glm4moe_lib.cpu_kernel`: one call that sorts the
  pairs, reads each touched expert's weights once for all its tokens, and sums the K slots; its
  backward is one more pass over those weights.
  Built on first use; where it cannot be built ``"auto"`` takes the torch strategies below.
* ``gather_bmm`` (a token or two, on accelerators): copy the K chosen experts' weights of every token into one
  batch and run two ``torch.bmm`` calls: 2 kernels instead of 2·K small ones, no sort, no sync.
* ``sorted_gather`` (under ``torch.compile`` on a CPU, up to a few hundred tokens): ``gather_bmm``
  over the pairs sorted by expert; compiled, it is one fused loop that reads each expert's weights
  once (eagerly it would copy them per pair, so ``auto`` picks it only when compiling).
* ``padded`` (more tokens; what ``auto`` picks on CUDA without a grouped GEMM): sort by expert, lay each expert's tokens into a padded slab
  [experts, C, H] with C up to a few times the mean load, and run two ``torch.bmm`` calls over all
  experts at once. Experts with more than C tokens (skewed routing) run on their own, so the slab is
  never bigger than 4·T·K + E rows (:func:`padded_plan`): no [T, E, H] tensor even when one expert
  gets every token.
* ``grouped_mm``: the sorted pairs through ``torch.nn.functional.grouped_mm``, one call for all
  experts with the block offsets: one kernel on CUDA (bf16, sm80+); on CPU (torch >= 2.9) a C++
  loop of GEMMs on views of the weights, which beats the Python loops there.

Routing weights are float32; each expert's output is multiplied by its weight in float32. The
reference paths cast back to the input dtype before the scatter-add (as transformers' eager loop
does); the fast paths put the rows back in (token, slot) order and sum the K slots in float32 (as
transformers' grouped_mm path does): deterministic, and more accurate in bf16.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernel
from .config import check_int, check_real
from .cpu_kernel import fused_cpu_dispatch
from .experts import _swiglu

ActFn = Callable[[Tensor], Tensor]


class DispatchPlan(NamedTuple):
    """The (token, slot) pairs of a batch, sorted by expert."""

    order: Tensor  # [T*K] index into the flattened [T, K] pairs, grouped by expert
    token_ids: Tensor  # [T*K] token of each sorted pair
    expert_ids: Tensor  # [T*K] expert of each sorted pair (non-decreasing)
    counts: Tensor  # [E] how many pairs each expert received
    offsets: Tensor  # [E+1] start of each expert's block; block e is offsets[e]:offsets[e+1]


def check_expert_ids(
    ids: Tensor, num_experts: int, name: str = "top_k_index", check_range: bool = True
) -> None:
    """``ids``: an int64 or int32 tensor (any shape) of expert ids in [0, num_experts), else a clear error
    naming ``name``. The dtype costs nothing to check; the range needs one look at the data (a host
    sync on a GPU), skipped with ``check_range=False`` for ids that come from the router. The one
    check of expert ids that dispatch, balance, parallel and the figures share."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts={num_experts!r} is not allowed: it must be a positive integer")
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} is a {type(ids).__name__}: pass an integer tensor of expert ids")
    if ids.dtype not in (torch.int64, torch.int32):  # (torch's index ops take no other integer type)
        # (ValueError, as for every other routing tensor that does not fit: see _check_args)
        raise ValueError(
            f"{name} has dtype {ids.dtype}: an int64 (or int32) tensor of expert ids is required"
        )
    if check_range and ids.numel():
        low, high = (int(v) for v in torch.aminmax(ids))  # one host sync
        if low < 0 or high >= num_experts:
            raise ValueError(
                f"{name} holds expert ids from {low} to {high}: they must lie in [0, {num_experts})"
            )


def _check_index(
    top_k_index: Tensor, num_experts: int, tokens: int | None = None, check_ids: bool = True
) -> None:
    """Clear errors for expert ids that are not an integer [T, K] tensor of ids in [0, num_experts)
    (the range only with ``check_ids``: see :func:`check_expert_ids`)."""
    check_expert_ids(top_k_index, num_experts, check_range=False)
    if top_k_index.dim() != 2 or (tokens is not None and top_k_index.shape[0] != tokens):
        want = "tokens" if tokens is None else f"tokens={tokens}"
        raise ValueError(f"top_k_index has shape {tuple(top_k_index.shape)}: expected [{want}, top_k]")
    if check_ids:
        check_expert_ids(top_k_index, num_experts)


def _check_args(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    check_ids: bool = True,
) -> None:
    """Clear errors for a batch, its routing and the experts' weights that do not fit together
    (shapes, dtypes, devices), and, with ``check_ids``, for expert ids outside [0, E)."""
    tensors = (
        ("hidden_states", hidden_states),
        ("top_k_index", top_k_index),
        ("top_k_weights", top_k_weights),
        ("gate_up_proj", gate_up_proj),
        ("down_proj", down_proj),
    )
    for name, t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    cpu_kernel.check_expert_shapes(hidden_states, gate_up_proj, down_proj)
    _check_index(top_k_index, gate_up_proj.shape[0], hidden_states.shape[0], check_ids)
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights has shape {tuple(top_k_weights.shape)}: it must match top_k_index "
            f"{tuple(top_k_index.shape)}"
        )
    for name, t in tensors:
        if name != "top_k_index" and not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}: a floating-point tensor is required")
        if t.device != hidden_states.device:
            raise ValueError(
                f"{name} is on {t.device} but hidden_states is on {hidden_states.device}: they must be on "
                "one device"
            )
    if down_proj.dtype != gate_up_proj.dtype:
        raise ValueError(
            f"down_proj has dtype {down_proj.dtype} but gate_up_proj {gate_up_proj.dtype}: they must match"
        )
    if hidden_states.dtype != gate_up_proj.dtype and not torch.is_autocast_enabled(hidden_states.device.type):
        raise ValueError(
            f"hidden_states has dtype {hidden_states.dtype} but the experts' weights are {gate_up_proj.dtype}: "
            "cast one of them"
        )


def _no_pairs(hidden_states: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """The output of a batch without (token, expert) pairs (no tokens, or K=0): zeros, still on the
    autograd graph (as a real batch would be): a caller that backpropagates through it, e.g. an
    expert-parallel rank that received no tokens, must still reach the weights."""
    anchor = gate_up_proj.reshape(-1)[:1].sum() + down_proj.reshape(-1)[:1].sum()
    return hidden_states * 0 + (anchor * 0).to(hidden_states.dtype)


def _strategy(run: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A strategy as a public function: checks its arguments first (:func:`_check_args`, the expert
    ids included) and handles a batch without pairs. :func:`dispatch_combine` checks once and then
    calls the unchecked function, ``strategy.__wrapped__`` (the :data:`STRATEGIES` entries)."""

    @functools.wraps(run)
    def checked(
        hidden_states: Tensor,
        top_k_index: Tensor,
        top_k_weights: Tensor,
        gate_up_proj: Tensor,
        down_proj: Tensor,
        act_fn: ActFn = F.silu,
    ) -> Tensor:
        _check_args(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
        if top_k_index.numel() == 0:
            return _no_pairs(hidden_states, gate_up_proj, down_proj)
        return run(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn)

    return checked


def plan_dispatch(top_k_index: Tensor, num_experts: int) -> DispatchPlan:
    """Sort the flattened (token, slot) pairs by expert (stable, so tokens stay in order).

    top_k_index [T, K] integer ids in [0, num_experts) (checked: one look at the ids, a host sync on a
    GPU; the strategies, whose ids :func:`dispatch_combine` has checked, skip it).
    """
    _check_index(top_k_index, num_experts)
    return _plan(top_k_index, num_experts)


def _plan(top_k_index: Tensor, num_experts: int) -> DispatchPlan:
    """:func:`plan_dispatch` without its checks."""
    top_k = top_k_index.shape[-1]
    flat_experts = top_k_index.reshape(-1)  # [T*K]
    order = torch.argsort(flat_experts, stable=True)  # [T*K]
    # scatter_add, not bincount: bincount sizes its output from the data (a host sync on GPUs)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_experts.device)
    counts.scatter_add_(0, flat_experts.long(), torch.ones_like(flat_experts, dtype=torch.long))  # [E]
    offsets = F.pad(counts.cumsum(0), (1, 0))  # [E+1]
    return DispatchPlan(order, order // top_k, flat_experts[order], counts, offsets)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """GShard / Switch capacity: each expert takes at most ``ceil(factor * T * K / E)`` pairs."""
    num_tokens = check_int("num_tokens", num_tokens, 0)
    num_experts = check_int("num_experts", num_experts, 1)
    top_k = check_int("top_k", top_k, 0, num_experts, what=" (a token picks at most num_experts experts)")
    check_real("capacity_factor", capacity_factor, 0, above=True)
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_keep_mask(top_k_index: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Which (token, slot) pairs fit when each expert takes at most ``capacity``: [T, K] bool.

    Priority as in GShard: the first choices of all tokens before the second choices, and so on;
    within one choice, tokens in order. Sort-based, so memory is O(T·K), not O(T·K·E).
    """
    if not isinstance(top_k_index, Tensor) or top_k_index.dim() != 2:
        shape = tuple(top_k_index.shape) if isinstance(top_k_index, Tensor) else type(top_k_index).__name__
        raise ValueError(f"top_k_index has shape {shape}: expected [tokens, K]")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts={num_experts!r} is not allowed: it must be a positive integer")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(
            f"capacity={capacity!r} is not allowed: it must be an integer >= 0 (pairs per expert)"
        )
    top_k = top_k_index.shape[-1]
    if top_k == 0 or top_k_index.shape[0] == 0:  # no pairs: nothing to drop
        _check_index(top_k_index, num_experts)
        return torch.ones_like(top_k_index, dtype=torch.bool)
    slot_major = top_k_index.T.reshape(-1, 1)  # [K*T, 1]: all first choices, then all second ...
    _check_index(top_k_index, num_experts)
    plan = _plan(slot_major, num_experts)  # stable: queue order within each expert
    position = torch.arange(plan.order.numel(), device=top_k_index.device) - plan.offsets[plan.expert_ids]
    keep = torch.empty(plan.order.numel(), dtype=torch.bool, device=top_k_index.device)
    keep[plan.order] = position < capacity  # [K*T] back from expert order to slot-major order
    return keep.view(top_k, -1).T  # [T, K]


@_strategy
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


@_strategy
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
    gate_ups, downs = gate_up_proj.unbind(0), down_proj.unbind(0)  # views: one gradient buffer each
    for e in torch.unique(top_k_index).tolist():
        token_idx, slot = torch.where(top_k_index == e)  # [n] each
        y = _swiglu(hidden_states[token_idx], gate_ups[e], downs[e], act_fn)  # [n, H]
        y = y * top_k_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


@_strategy
def sorted_dispatch(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: ActFn = F.silu,
) -> Tensor:
    """Sort pairs by expert, run each contiguous block, weighted scatter-add back (dropless)."""
    plan = _plan(top_k_index, gate_up_proj.shape[0])
    x_sorted = hidden_states[plan.token_ids]  # [T*K, H], grouped by expert
    gate_ups, downs = gate_up_proj.unbind(0), down_proj.unbind(0)  # views: one gradient buffer each
    blocks = []
    for e, (start, end) in enumerate(zip(plan.offsets[:-1].tolist(), plan.offsets[1:].tolist())):
        if end > start:
            blocks.append(_swiglu(x_sorted[start:end], gate_ups[e], downs[e], act_fn))
    y_sorted = torch.cat(blocks) if blocks else x_sorted  # [T*K, H]
    w_sorted = top_k_weights.reshape(-1)[plan.order, None]  # [T*K, 1] float32
    out = torch.zeros_like(hidden_states)
    return out.index_add_(0, plan.token_ids, (y_sorted * w_sorted).to(out.dtype))


def _combine_slots(y: Tensor, top_k_weights: Tensor, dtype: torch.dtype) -> Tensor:
    """out[t] = sum_k w[t, k] * y[t, k] for y [T*K, H] in (token, slot) order -> [T, H].

    Sums the K slots in float32: no scatter-add, so it is deterministic on CUDA (no atomics) and
    accumulates bf16 outputs in float32.
    """
    tokens, top_k = top_k_weights.shape
    weighted = y.view(tokens, top_k, -1) * top_k_weights[..., None]  # [T, K, H] float32
    return weighted.sum(dim=1).to(dtype)


def _unsort_combine(
    plan: DispatchPlan, y_sorted: Tensor, top_k_weights: Tensor, dtype: torch.dtype
) -> Tensor:
    """Rows y [S, H] in expert order back to (token, slot) order, then :func:`_combine_slots`."""
    y = torch.empty_like(y_sorted).index_copy_(0, plan.order, y_sorted)  # [S, H], (token, slot) order
    return _combine_slots(y, top_k_weights, dtype)


def _experts_per_row(
    x: Tensor, experts: Tensor, gate_up_proj: Tensor, down_proj: Tensor, act_fn: ActFn
) -> Tensor:
    """Row s of x [S, H] through expert ``experts[s]``: two batched GEMMs over the gathered
    weights, one row per batch entry ([S, 1, H] x [S, H, 2I]) -> [S, H]."""
    h = torch.bmm(x.unsqueeze(1), gate_up_proj.index_select(0, experts).transpose(1, 2)).squeeze(1)  # [S, 2I]
    gate, up = h.chunk(2, dim=-1)  # [S, I] each
    a = (act_fn(gate) * up).unsqueeze(1)  # [S, 1, I]
    return torch.bmm(a, down_proj.index_select(0, experts).transpose(1, 2)).squeeze(1)  # [S, H]


@_strategy
def gather_bmm_dispatch(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: ActFn = F.silu,
) -> Tensor:
    """Gather each (token, slot) pair's expert weights and run two batched GEMMs (small T).

    Copies T·K experts' weights (so only for T·K well below E); no sort and no host sync, so it
    also suits CUDA graphs.
    """
    x = hidden_states.repeat_interleave(top_k_index.shape[1], dim=0)  # [S, H], S = T*K
    y = _experts_per_row(x, top_k_index.reshape(-1), gate_up_proj, down_proj, act_fn)  # [S, H]
    return _combine_slots(y, top_k_weights, hidden_states.dtype)


@_strategy
def sorted_gather_dispatch(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: ActFn = F.silu,
) -> Tensor:
    """``gather_bmm`` over the pairs sorted by expert: meant for ``torch.compile`` on a CPU.

    Eagerly it copies T·K experts' weights as ``gather_bmm`` does. Compiled, Inductor fuses the
    gather into the GEMM loop (nothing is copied), and with the pairs of one expert adjacent each
    expert's weights are read from memory once and re-read from cache for its other rows: static
    shapes, no host sync, and about the weight traffic of a grouped GEMM.
    """
    plan = _plan(top_k_index, gate_up_proj.shape[0])
    x_sorted = hidden_states[plan.token_ids]  # [S, H], grouped by expert
    y_sorted = _experts_per_row(x_sorted, plan.expert_ids, gate_up_proj, down_proj, act_fn)  # [S, H]
    return _unsort_combine(plan, y_sorted, top_k_weights, hidden_states.dtype)


#: Padded slab capacity: at most this many times the mean load per used expert (rest run alone).
PAD_CAPACITY_FACTOR = 2.0
#: Slab columns up to which the weights are the left bmm operand (``W @ x``: streams the weights).
_WEIGHT_LEFT_MAX_COLS = 16


def padded_plan(top_k_index: Tensor, num_experts: int, capacity_factor: float = PAD_CAPACITY_FACTOR):
    """Where each sorted pair goes in the padded slab.

    Returns ``(plan, capacity, in_slab, slot, heavy_experts)``: ``in_slab`` [S] bool marks the pairs
    that go to the slab [E, capacity, H] (row ``slot`` [S] of its flattened view); experts listed in
    ``heavy_experts`` got more than ``capacity`` tokens and run alone. ``capacity * E`` is at most
    ``2 * capacity_factor * T * K + E`` rows (the slab is O(T·K·H), whatever the routing).
    """
    plan = _plan(top_k_index, num_experts)
    pairs = plan.order.numel()
    counts = plan.counts
    max_count = int(counts.max())
    # The slab holds E * capacity rows. Take the largest load if that stays within
    # 2 * capacity_factor * S rows (balanced routing: one slab, no expert runs alone); else about
    # capacity_factor times the mean load, and the overloaded experts run alone.
    if num_experts * max_count <= 2 * capacity_factor * pairs:
        capacity = max_count
    else:
        capacity = max(1, math.ceil(capacity_factor * pairs / num_experts))
    rank = torch.arange(pairs, device=top_k_index.device) - plan.offsets[plan.expert_ids]  # [S]
    slot = plan.expert_ids * capacity + rank  # [S]
    heavy = (counts > capacity).nonzero().flatten().tolist() if max_count > capacity else []
    in_slab = rank < capacity if heavy else None
    return plan, capacity, in_slab, slot, heavy


@_strategy
def padded_dispatch(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: ActFn = F.silu,
) -> Tensor:
    """Sorted pairs in a padded slab [E, C, H], two ``torch.bmm`` over all experts (mid/large T).

    C is at most a few times the mean load, so the slab has O(T·K) rows (:func:`padded_plan`);
    tokens beyond C of an overloaded expert go through that expert on its own (one ordinary GEMM
    per heavy expert).
    """
    num_experts, inter2, hidden = gate_up_proj.shape
    inter = inter2 // 2
    plan, cap, in_slab, slot, heavy = padded_plan(top_k_index, num_experts)
    token_ids = plan.token_ids
    slab_pairs = in_slab.nonzero().flatten() if in_slab is not None else None  # skewed routing only
    slab_tokens = token_ids if slab_pairs is None else token_ids[slab_pairs]
    slab_slot = slot if slab_pairs is None else slot[slab_pairs]
    x_pad = hidden_states.new_zeros(num_experts * cap, hidden)  # [E*C, H]
    x_pad = x_pad.index_copy(0, slab_slot, hidden_states[slab_tokens]).view(num_experts, cap, hidden)
    if cap <= _WEIGHT_LEFT_MAX_COLS:  # W @ x^T: [E, 2I, H] x [E, H, C]
        h = torch.bmm(gate_up_proj, x_pad.transpose(1, 2))  # [E, 2I, C]
        a = act_fn(h[:, :inter]) * h[:, inter:]  # [E, I, C]
        y_pad = torch.bmm(down_proj, a).transpose(1, 2)  # [E, C, H]
    else:  # x @ W^T: [E, C, H] x [E, H, 2I]
        h = torch.bmm(x_pad, gate_up_proj.transpose(1, 2))  # [E, C, 2I]
        a = act_fn(h[..., :inter]) * h[..., inter:]  # [E, C, I]
        y_pad = torch.bmm(a, down_proj.transpose(1, 2))  # [E, C, H]
    y_pad = y_pad.reshape(num_experts * cap, hidden)
    if slab_pairs is None:
        y_sorted = y_pad.index_select(0, slot)  # [S, H]
    else:
        pieces = [y_pad.index_select(0, slab_slot)]  # the slab pairs, then each heavy expert's rest
        positions = [slab_pairs]
        for e in heavy:  # overloaded experts: the tokens past the slab, one GEMM each
            start, end = int(plan.offsets[e]) + cap, int(plan.offsets[e + 1])
            pieces.append(_swiglu(hidden_states[token_ids[start:end]], gate_up_proj[e], down_proj[e], act_fn))
            positions.append(torch.arange(start, end, device=token_ids.device))
        y_sorted = torch.empty(plan.order.numel(), hidden, dtype=y_pad.dtype, device=y_pad.device)
        y_sorted = y_sorted.index_copy(0, torch.cat(positions), torch.cat(pieces))  # [S, H]
    return _unsort_combine(plan, y_sorted, top_k_weights, hidden_states.dtype)


def _grouped_mm(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """x [S, K] grouped by ``offs`` (int32 block ends) times weight [G, K, N] -> [S, N]."""
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, weight, offs=offs)
    return torch._grouped_mm(x, weight, offs=offs)


def grouped_mm_available(device: torch.device | str | None = None) -> bool:
    """True where torch has a grouped GEMM (``F.grouped_mm`` or ``torch._grouped_mm``) for ``device``.

    On CUDA it needs compute capability 8.0+ (Ampere, Hopper...); on CPU torch >= 2.9 runs it as a
    loop of GEMMs, which ``choose_strategy`` picks between ``gather_bmm`` and ``loop`` where the
    C kernel does not run.
    """
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":  # the CPU kernel arrived in torch 2.9
        return tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)
    return False


#: the dtypes torch's grouped GEMM takes (float64 falls back to ``sorted``)
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_fits(hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM accepts these widths: every row stride a multiple of 16 bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (hidden_size * itemsize) % 16 == 0 and (intermediate_size * itemsize) % 16 == 0


@_strategy
def grouped_mm_dispatch(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: ActFn = F.silu,
) -> Tensor:
    """Sorted pairs through torch's grouped GEMM: one kernel for all experts' blocks (CUDA bf16).

    No host sync: the block ends (``offsets``) stay on the device, empty experts are skipped by
    the kernel. Weights are used as stored, transposed views [E, H, 2I] and [E, I, H]. Autocast
    does not cover the grouped GEMM: under it, the operands are cast as autocast casts a matmul's.
    """
    out_dtype = hidden_states.dtype
    if torch.is_autocast_enabled(hidden_states.device.type):
        dtype = torch.get_autocast_dtype(hidden_states.device.type)
        hidden_states, gate_up_proj, down_proj = (
            t.to(dtype) for t in (hidden_states, gate_up_proj, down_proj)
        )
    if hidden_states.dtype not in GROUPED_MM_DTYPES or not grouped_mm_fits(
        hidden_states.shape[-1], down_proj.shape[-1], hidden_states.dtype
    ):
        # The kernel takes float32, bf16 and fp16 with 16-byte-aligned rows; float64 and tiny teaching
        # widths fall back to the same math on the sorted blocks.
        return sorted_dispatch.__wrapped__(
            hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn
        )
    plan = _plan(top_k_index, gate_up_proj.shape[0])
    offs = plan.offsets[1:].to(torch.int32)  # [E] block ends
    x_sorted = hidden_states[plan.token_ids]  # [S, H]
    gate, up = _grouped_mm(x_sorted, gate_up_proj.transpose(1, 2), offs).chunk(2, dim=-1)  # [S, I]
    y = _grouped_mm(act_fn(gate) * up, down_proj.transpose(1, 2), offs)  # [S, H]
    return _unsort_combine(plan, y, top_k_weights, out_dtype)


#: name -> the strategy without its argument checks (dispatch_combine checks once); the public
#: functions above (``loop_dispatch`` ...) check their arguments when called directly.
STRATEGIES: dict[str, Callable[..., Tensor]] = {
    "loop": loop_dispatch.__wrapped__,
    "sorted": sorted_dispatch.__wrapped__,
    "dense": dense_reference.__wrapped__,
    "gather_bmm": gather_bmm_dispatch.__wrapped__,
    "sorted_gather": sorted_gather_dispatch.__wrapped__,
    "padded": padded_dispatch.__wrapped__,
    "grouped_mm": grouped_mm_dispatch.__wrapped__,
    "fused_cpu": fused_cpu_dispatch,
}


def strategies_for(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, act_fn: ActFn = F.silu
) -> list[str]:
    """The strategies that run on ``device`` in ``dtype``: all but ``fused_cpu`` where its C kernel
    cannot (a GPU, bf16, another activation, no C compiler). The others run everywhere."""
    probe = torch.empty(0, device=device, dtype=dtype)
    fused_ok = cpu_kernel.unsupported(probe, probe, probe, act_fn) is None
    return [name for name in STRATEGIES if name != "fused_cpu" or fused_ok]


#: "small": T·K <= this fraction of E (gather_bmm copies T·K experts' weights).
GATHER_MAX_PAIRS_PER_EXPERT = 0.125


#: CPU inference: the per-expert loop from this mean load (rows per expert) up.
LOOP_MIN_ROWS_PER_EXPERT = 128

#: Under ``torch.compile`` on a CPU (inference), beyond ``gather_bmm``'s T·K <= E/8:
#: ``sorted_gather`` up to T·K <= this many times E. Inductor fuses its gather, both GEMMs, the
#: activation and the weighted sum into one C++ loop that reads the weights in place; sorted, one
#: expert's rows reuse its weights from cache. Measured at the bench size, 1 thread, the routed
#: experts alone: 2.5x faster than eager ``auto`` at T=16, 2.0x at T=64, 1.2x at T=256, even at
#: T=1024.
COMPILED_SORTED_GATHER_MAX_PAIRS_PER_EXPERT = 16.0


def _compiling() -> bool:
    """True while torch.compile traces this code (a function of its own, so tests can pretend)."""
    return torch.compiler.is_compiling()


def _compiles(strategy: str, device: torch.device) -> bool:
    """Whether ``torch.compile`` can trace ``strategy`` on ``device`` without a graph break or a
    kernel it cannot trace (torch's CPU grouped GEMM has no compiled form)."""
    traceable = ("gather_bmm", "sorted_gather", "dense")
    return strategy in traceable or (strategy == "grouped_mm" and device.type == "cuda")


#: CPU inference, float32, SiLU, the kernel built: ``fused_cpu`` up to this many (token, expert)
#: pairs per expert and torch thread (1 or 2), by hidden size H: rows of (largest H, pairs), the
#: first row with H <= its largest H applies. In the bench layer (H=512) the kernel stays ahead of
#: the BLAS at every batch size; in wider layers the BLAS (better with bigger matrices) wins from a
#: few dozen rows per expert, and the kernel itself is slower per FLOP at H=2048 (30-35 GFLOP/s
#: against 45-60 at H=512-1024 here; not from its token rows leaving L1: strips did not help).
#: Measured, forward, 1 thread, the crossover against ``grouped_mm`` and ``loop``: none up
#: to 512 pairs per expert at H=512 (the bench layer: 1.2x faster at T=1024, 1.05x at T=4096-8192,
#: also on 2 threads); 32-64 at H=1024 (E=64, K=8); 8-16 at H=2048 (E=32, K=4) and H=4096 (E=16,
#: K=4). Change it if your machine measures otherwise (``python -m glm4moe_lib.bench``).
FUSED_CPU_MAX_PAIRS_PER_EXPERT: tuple[tuple[float, float], ...] = ((512, math.inf), (1024, 32), (math.inf, 8))
#: the same with gradients (forward+backward against ``grouped_mm``, 1 thread, the backward by strips
#: of columns, the SwiGLU's sigmoid 16 at a time: the kernel 0.78x the time at 32 pairs per expert at
#: H=512, 0.89x at 64, 0.96x at 128, level at 256 (2 threads: 0.86x at 64 per thread, 0.88x at 128); at
#: H=1024 (E=64, K=8, I=256) 0.80x at 16, 0.96x at 32, 1.07x at 64; at H=2048 (E=32, K=4, I=512) 0.87x
#: at 8, 1.38x at 16).
FUSED_CPU_TRAIN_MAX_PAIRS_PER_EXPERT: tuple[tuple[float, float], ...] = (
    (512, 128),
    (1024, 32),
    (math.inf, 8),
)


def fused_cpu_max_pairs_per_expert(hidden_size: int, inference: bool) -> float:
    """The row of :data:`FUSED_CPU_MAX_PAIRS_PER_EXPERT` (or the training table) for ``hidden_size``."""
    table = FUSED_CPU_MAX_PAIRS_PER_EXPERT if inference else FUSED_CPU_TRAIN_MAX_PAIRS_PER_EXPERT
    return next((pairs for largest, pairs in table if hidden_size <= largest), 0)


def fused_cpu_pays(pairs: int, num_experts: int, hidden_size: int, inference: bool) -> bool:
    """Whether "auto" takes ``fused_cpu`` for ``pairs`` (token, expert) pairs on a CPU (the kernel
    supported): up to the thresholds above, per torch thread (counting at most 2)."""
    per_expert = fused_cpu_max_pairs_per_expert(hidden_size, inference)
    return not _compiling() and pairs <= per_expert * min(torch.get_num_threads(), 2) * num_experts


def choose_strategy(
    hidden_states: Tensor, top_k_index: Tensor, num_experts: int, act_fn: ActFn | None = None
) -> str:
    """The strategy "auto" resolves to for this shape and device (measured: ``bench/``).

    On CPU (weights stay where they are; what costs is copies, passes over memory, and ops):

    * float32 with SiLU experts (``act_fn`` None or ``F.silu``), where the C kernel of
      :mod:`glm4moe_lib.cpu_kernel` builds: ``fused_cpu``, one pass over each touched expert's
      weights, up to a number of pairs per expert and thread (1 or 2) that depends on the hidden
      size and on gradients (:data:`FUSED_CPU_MAX_PAIRS_PER_EXPERT`, its training twin: the
      backward is one more pass). Not under ``torch.compile`` or CPU autocast: see below.
    * otherwise, no gradient needed (inference): T·K <= E/8 (a token or two): ``gather_bmm`` (two batched
      GEMMs over the K chosen experts' weights: about 2x faster than K separate GEMMs at T=1 with
      the weights in cache, measured at the bench size); >= 128 rows per expert: ``loop`` (each
      expert's gather, GEMMs and scatter run while its rows are in cache: faster than one grouped
      GEMM over all [T·K, H] rows); in between ``grouped_mm``.
    * gradients needed: ``grouped_mm`` (one kernel for all experts, forward and backward).
    * ``grouped_mm`` needs torch >= 2.9's CPU kernel (a C++ loop of GEMMs over views of the
      weights); without it: ``sorted`` for inference, ``padded`` with gradients.
    * under ``torch.compile`` (inference), ``sorted_gather`` for E/8 < T·K <= 16·E: Inductor fuses
      it into one loop that reads the experts' weights in place, once each. Strategies that
      cannot be traced run eagerly inside the compiled layer (a graph break, see
      :func:`dispatch_combine`).

    On CUDA and other accelerators (every op is a kernel launch; host syncs stall):

    * T·K <= E/8 (decoding): ``gather_bmm``: two batched GEMMs, no sort, no sync.
    * bf16/fp16, grouped GEMM available (sm80+), hidden width a multiple of 8: ``grouped_mm``.
    * otherwise ``padded``: two batched GEMMs over a slab of about T·K rows.
    """
    pairs = top_k_index.numel()
    device = hidden_states.device
    small = pairs <= GATHER_MAX_PAIRS_PER_EXPERT * num_experts
    if device.type == "cpu":
        inference = not torch.is_grad_enabled()
        if (
            fused_cpu_pays(pairs, num_experts, hidden_states.shape[-1], inference)
            and cpu_kernel.unsupported(hidden_states, hidden_states, hidden_states, act_fn or F.silu) is None
        ):
            return "fused_cpu"
        if inference and _compiling() and not small:
            if pairs <= COMPILED_SORTED_GATHER_MAX_PAIRS_PER_EXPERT * num_experts:
                return "sorted_gather"  # compiled: one fused loop, each expert's weights read once
        if inference and small:
            return "gather_bmm"
        if inference and pairs >= LOOP_MIN_ROWS_PER_EXPERT * num_experts:
            return "loop"
        if grouped_mm_available(device) and hidden_states.dtype in GROUPED_MM_DTYPES:
            return "grouped_mm"
        return "sorted" if inference else "padded"
    if small:
        return "gather_bmm"
    if (
        device.type == "cuda"
        and hidden_states.dtype in (torch.bfloat16, torch.float16)
        and hidden_states.shape[-1] % 8 == 0
        and grouped_mm_available(device)
    ):
        return "grouped_mm"
    return "padded"


def dispatch_combine(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: ActFn = F.silu,
    strategy: str = "auto",
    check_ids: bool = True,
) -> Tensor:
    """Run the routed experts with the chosen strategy: [T, H] -> [T, H].

    ``check_ids=False`` trusts that every id in ``top_k_index`` lies in [0, E) (the router's output
    does): it skips the one host sync of the range check, so the fast GPU paths never wait for
    the device and a layer call can be captured in a CUDA graph.
    """
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not allowed: use 'auto' or one of {sorted(STRATEGIES)}")
    _check_args(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, check_ids)
    if top_k_index.numel() == 0:  # no tokens, or K=0: nothing to compute
        return _no_pairs(hidden_states, gate_up_proj, down_proj)
    if strategy == "auto":
        strategy = choose_strategy(hidden_states, top_k_index, gate_up_proj.shape[0], act_fn)
    run = STRATEGIES[strategy]
    if _compiling() and not _compiles(strategy, hidden_states.device):
        # torch.compile of a layer: run this strategy eagerly (a graph break) rather than fail
        # inside the tracer (host syncs, data-dependent shapes, CPU grouped GEMM)
        run = torch.compiler.disable(run)
    return run(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn)
