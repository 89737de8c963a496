"""Experts: E independent SwiGLU feed-forward networks, stored as two fused tensors.

One expert computes ``down(act(gate(x)) * up(x))``. GLM-4.5 (like transformers'
``Glm4MoeExperts``) keeps all E experts in

* ``gate_up_proj``  [E, 2I, H]: rows 0..I-1 are the gate projection, rows I..2I-1 the up projection
* ``down_proj``     [E, H, I]

so one index picks an expert's whole weights, and batched kernels see one tensor. The shared
expert is an ordinary SwiGLU ``MLP`` applied to every token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernel
from .config import MoEConfig

ACT_FNS: dict[str, Callable[[Tensor], Tensor]] = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _check_act(hidden_act: str) -> None:
    if not isinstance(hidden_act, str) or hidden_act not in ACT_FNS:
        raise ValueError(f"hidden_act={hidden_act!r} is not allowed: use one of {sorted(ACT_FNS)}")


def _check_tokens(x: Tensor, name: str) -> None:
    """Token representations: a floating-point tensor (token ids belong in an embedding first)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} is a {type(x).__name__}: expected a floating-point tensor [..., H]")
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}: expected a floating-point tensor [..., H]")


def _plain_call(module: nn.Module | None) -> bool:
    """Whether calling ``module`` runs just its class's forward: no hooks, nothing patched in."""
    return module is None or not (
        module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
    )


class MLP(nn.Module):
    """A SwiGLU MLP with transformers' names (gate_proj, up_proj, down_proj): the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu") -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")
        _check_act(hidden_act)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT_FNS[hidden_act]

    def plain_weights(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The projections' weights (gate [I, H], up [I, H], down [H, I]) if all three are plain
        ``nn.Linear`` calls without a bias (no hooks, nothing patched in), else None: only then may
        the C kernel compute them in their place. Through the modules' own dicts, not
        nn.Module.__getattr__ (about 1 us each): this runs on every call."""
        modules = self._modules
        g, u, d = modules.get("gate_proj"), modules.get("up_proj"), modules.get("down_proj")
        if not (
            type(g) is type(u) is type(d) is nn.Linear
            and _plain_call(g)
            and _plain_call(u)
            and _plain_call(d)
            and g._parameters.get("bias") is None
            and u._parameters.get("bias") is None
            and d._parameters.get("bias") is None
        ):
            return None
        return g._parameters["weight"], u._parameters["weight"], d._parameters["weight"]

    def forward(self, x: Tensor) -> Tensor:  # [..., H] -> [..., H]
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        _check_tokens(x, "x")
        cpu_kernel.check_mlp_shapes(x, *weights)  # a clear error, not one from inside a matmul
        if cpu_kernel.mlp_applies(x, *weights, self.act_fn) and self.plain_weights() is not None:
            return cpu_kernel.mlp_call(x, *weights)  # a few tokens, float32 CPU inference: one C call
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def swiglu(x: Tensor, gate_up: Tensor, down: Tensor, act_fn: Callable[[Tensor], Tensor] = F.silu) -> Tensor:
    """One expert on a block of tokens: x [N, H], gate_up [2I, H], down [H, I] -> [N, H]."""
    _check_tokens(x, "x")
    if (
        not (isinstance(gate_up, Tensor) and isinstance(down, Tensor))
        or gate_up.dim() != 2
        or down.dim() != 2
    ):
        what = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (gate_up, down)]
        raise ValueError(f"gate_up and down are {what[0]} and {what[1]}: expected [2I, H] and [H, I] tensors")
    hidden, inter = down.shape
    cpu_kernel.check_shapes(
        ("gate_up", gate_up, (2 * inter, hidden)),
        fit=lambda: f"down {tuple(down.shape)} (H={hidden}, I={inter})",
    )
    if x.dim() == 0 or x.shape[-1] != hidden:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must be H={hidden}, as down's")
    return _swiglu(x, gate_up, down, act_fn)


def _swiglu(x: Tensor, gate_up: Tensor, down: Tensor, act_fn: Callable[[Tensor], Tensor] = F.silu) -> Tensor:
    """:func:`swiglu` without its checks, for the dispatch loops (their caller checked once)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [N, I] each
    return F.linear(act_fn(gate) * up, down)


class Experts(nn.Module):
    """All routed experts; ``forward`` runs each token through its K experts and combines them."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(e, h, i))  # [E, H, I]
        self.act_fn = ACT_FNS[config.hidden_act]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        h, i = self.config.hidden_size, self.config.moe_intermediate_size
        nn.init.uniform_(self.gate_up_proj, -(h**-0.5), h**-0.5)  # as nn.Linear(H, 2I)
        nn.init.uniform_(self.down_proj, -(i**-0.5), i**-0.5)  # as nn.Linear(I, H)

    def expert(self, index: int, x: Tensor) -> Tensor:
        """Run expert ``index`` alone on x [N, H]."""
        return swiglu(x, self.gate_up_proj[index], self.down_proj[index], self.act_fn)

    def forward(
        self,
        hidden_states: Tensor,
        top_k_index: Tensor,
        top_k_weights: Tensor,
        strategy: str | None = None,
        check_ids: bool = True,
    ) -> Tensor:
        """hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H].

        ``strategy`` overrides ``config.dispatch`` (see :mod:`glm4moe_lib.dispatch`);
        ``check_ids=False`` skips the expert-id range check (ids from the router are valid).
        """
        from .dispatch import dispatch_combine

        return dispatch_combine(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.down_proj,
            self.act_fn,
            strategy=strategy or self.config.dispatch,
            check_ids=check_ids,
        )
