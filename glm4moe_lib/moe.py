"""The GLM-4.5 MoE layer: router + routed experts + shared experts.

``MoE`` has the same submodule names and state_dict keys as transformers' ``Glm4MoeMoE``
(``gate.weight``, ``gate.e_score_correction_bias``, ``experts.gate_up_proj``,
``experts.down_proj``, ``shared_experts.{gate,up,down}_proj.weight``), so a real checkpoint loads
with ``moe.load_state_dict(hf_moe.state_dict())`` and gives the same outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import cpu_kernel
from .config import MoEConfig
from .experts import MLP, Experts
from .router import RouterOutput, TopkRouter


def _plain_call(module: nn.Module | None) -> bool:
    """Whether calling ``module`` runs just its class's forward: no hooks, nothing patched in."""
    return module is None or not (
        module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
    )


class MoE(nn.Module):
    """output = sum_k w_k · expert_k(x) + shared_experts(x), for x of shape [..., hidden_size]."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.gate = TopkRouter(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.shared_intermediate_size, config.hidden_act)
            if config.n_shared_experts > 0
            else None
        )

    def _check_input(self, hidden_states: Tensor) -> None:
        h = self.config.hidden_size
        if not isinstance(hidden_states, Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != h:
            raise ValueError(
                f"hidden_states has shape {tuple(hidden_states.shape)}: its last dimension must be "
                f"hidden_size={h}"
            )
        if not hidden_states.is_floating_point():
            raise ValueError(
                f"hidden_states has dtype {hidden_states.dtype}: a floating-point tensor is required"
            )
        weight = self.experts.gate_up_proj
        if hidden_states.device != weight.device:
            raise ValueError(
                f"hidden_states is on {hidden_states.device} but the layer's weights are on "
                f"{weight.device}: move one of them (e.g. moe.to(hidden_states.device))"
            )
        if hidden_states.dtype != weight.dtype and not torch.is_autocast_enabled(hidden_states.device.type):
            raise ValueError(
                f"hidden_states has dtype {hidden_states.dtype} but the layer's weights are "
                f"{weight.dtype}: cast one of them (e.g. moe.to({hidden_states.dtype}))"
            )

    def _check_expert_count(self, routing: RouterOutput) -> None:
        """The router must score as many experts as there are (its ids index the experts)."""
        scored, held = routing.logits.shape[-1], self.experts.gate_up_proj.shape[0]
        if scored != held:
            raise ValueError(
                f"the router scores {scored} experts (gate.weight {tuple(self.gate.weight.shape)}) but "
                f"experts.gate_up_proj holds {held} ({tuple(self.experts.gate_up_proj.shape)}): they must match"
            )

    def forward(
        self, hidden_states: Tensor, return_routing: bool = False
    ) -> Tensor | tuple[Tensor, RouterOutput]:
        """hidden_states [..., H] -> [..., H]; with ``return_routing`` also the RouterOutput."""
        self._check_input(hidden_states)
        orig_shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.config.hidden_size)  # [T, H]
        fused = self._fused_cpu_forward(x) if x.is_cpu and not torch.is_grad_enabled() else None
        if fused is not None:
            out, routing = fused
        else:
            routing = self.gate(x)
            self._check_expert_count(routing)
            # the router's ids lie in [0, E) by construction: no range check (no host sync on GPUs)
            out = self.experts(x, routing.topk_indices, routing.topk_weights, check_ids=False)  # [T, H]
            if self.shared_experts is not None:
                out = out + self.shared_experts(x)
        out = out.reshape(orig_shape)
        return (out, routing) if return_routing else out

    def _fused_cpu_forward(self, x: Tensor) -> tuple[Tensor, RouterOutput] | None:
        """The whole layer in one C call (router, experts, shared expert, combine) for float32
        CPU inference on a few tokens (``cpu_kernel.LAYER_MAX_TOKENS``), where the experts take
        ``fused_cpu`` anyway: the same math instead of some twenty torch ops, which at a token or
        two cost more than reading the weights. None where it does not apply (then the modules run
        as usual): more tokens, softmax scoring, hooks on the submodules, a subclass, no kernel, or
        a tie in the routing."""
        c, gate, experts, shared = self.config, self.gate, self.experts, self.shared_experts
        shared_weights = (
            ()
            if shared is None
            else (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
        )
        if not (
            c.scoring_func == "sigmoid"
            and c.hidden_act == "silu"
            and c.dispatch in ("auto", "fused_cpu")
            and cpu_kernel.layer_applies(x.shape[0], c.num_experts_per_tok)
            and not torch.compiler.is_compiling()
            and type(gate) is TopkRouter
            and type(experts) is Experts
            and (shared is None or (type(shared) is MLP and shared.act_fn is F.silu))
            and all(map(_plain_call, (gate, experts, shared)))
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)
            and all(w.is_cpu and w.dtype is torch.float32 for w in (gate.weight, *shared_weights))
            and cpu_kernel.unsupported(x, experts.gate_up_proj, experts.down_proj) is None
        ):
            return None
        done = cpu_kernel.layer_forward(
            x,
            gate.weight,
            gate.e_score_correction_bias,
            experts.gate_up_proj,
            experts.down_proj,
            shared_weights or None,
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group,
            c.norm_topk_prob,
            c.routed_scaling_factor,
        )
        if done is None:  # a tie: torch's topk decides it
            return None
        out, logits, scores, weights, indices = done
        return out, RouterOutput(logits, scores, weights, indices)

    @classmethod
    def from_hf(cls, hf_moe: nn.Module) -> MoE:
        """A library MoE with the config and weights of a transformers ``Glm4MoeMoE``."""
        moe = cls(MoEConfig.from_hf(hf_moe.config))
        param = next(hf_moe.parameters())
        moe.to(device=param.device, dtype=param.dtype)
        moe.load_state_dict(hf_moe.state_dict(), strict=True)
        return moe
