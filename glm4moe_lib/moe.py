"""The GLM-4.5 MoE layer: router + routed experts + shared experts.

``MoE`` has the same submodule names and state_dict keys as transformers' ``Glm4MoeMoE``
(``gate.weight``, ``gate.e_score_correction_bias``, ``experts.gate_up_proj``,
``experts.down_proj``, ``shared_experts.{gate,up,down}_proj.weight``), so a real checkpoint loads
with ``moe.load_state_dict(hf_moe.state_dict())`` and gives the same outputs (``MoE.from_hf`` builds
the layer from its config too, and skips the zero-width shared MLP transformers keeps for
``n_shared_experts=0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import cpu_kernel, dispatch
from .config import MoEConfig
from .experts import MLP, Experts, _plain_call
from .router import RouterOutput, TopkRouter


def check_layer_input(hidden_states: Tensor, hidden_size: int, weight: Tensor, name: str) -> None:
    """A floating-point [..., hidden_size] tensor on ``weight``'s device and of its dtype (unless
    autocast is on), or a clear error; ``name`` is the layer's variable in the hints (``moe.to(...)``)."""
    if not isinstance(hidden_states, Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() == 0 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden_states has shape {tuple(hidden_states.shape)}: its last dimension must be "
            f"hidden_size={hidden_size}"
        )
    if not hidden_states.is_floating_point():
        raise ValueError(
            f"hidden_states has dtype {hidden_states.dtype}: a floating-point tensor is required "
            "(token representations, not token ids)"
        )
    if hidden_states.device != weight.device:
        raise ValueError(
            f"hidden_states is on {hidden_states.device} but the layer's weights are on "
            f"{weight.device}: move one of them (e.g. {name}.to(hidden_states.device))"
        )
    if hidden_states.dtype != weight.dtype and not torch.is_autocast_enabled(hidden_states.device.type):
        raise ValueError(
            f"hidden_states has dtype {hidden_states.dtype} but the layer's weights are "
            f"{weight.dtype}: cast one of them (e.g. {name}.to({hidden_states.dtype}))"
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
        check_layer_input(hidden_states, self.config.hidden_size, self.experts.gate_up_proj, "moe")

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
        done = self._fused_cpu_forward(hidden_states, return_routing)  # a few tokens: one C call
        if done is not None:
            return done
        self._check_input(hidden_states)
        orig_shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.config.hidden_size)  # [T, H]
        routing = self.gate(x)
        self._check_expert_count(routing)
        # the router's ids lie in [0, E) by construction: no range check (no host sync on GPUs)
        out = self.experts(x, routing.topk_indices, routing.topk_weights, check_ids=False)  # [T, H]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        out = out.reshape(orig_shape)
        return (out, routing) if return_routing else out

    def _fused_cpu_forward(self, x: Tensor, return_routing: bool):
        """The whole layer in one C call (router, experts, shared expert, combine) for float32
        CPU work on a few tokens (``cpu_kernel.LAYER_MAX_TOKENS``; more on several threads: see
        ``cpu_kernel.layer_threads``), where the experts take ``fused_cpu`` anyway: the same math
        instead of some twenty torch ops, which at a token or two cost more than reading the
        weights. With gradients (up to ``cpu_kernel.TRAIN_MAX_TOKENS``, likewise more on several
        threads: ``cpu_kernel.layer_train_threads``; not with ``return_routing``, whose logits and scores a
        loss may use) the backward is one C call too; it gives first derivatives only (a second
        one, through ``create_graph=True``, raises, as for the experts' own kernel: a layer built
        with a torch strategy, ``MoEConfig(dispatch="sorted")``, gives it). None where it does
        not apply (then the modules run as usual, and raise the errors): more tokens, softmax
        scoring, hooks on the submodules, a subclass, tensors the kernel cannot read as they are
        (:func:`cpu_kernel.readable`), weights of other shapes than the config's, no kernel, or a
        tie in the routing.

        It runs on every call, and at one token each microsecond here is about 1% of the call:
        so one pass of plain checks, then :func:`cpu_kernel.layer_call` (no more checks).
        """
        c = self.config
        h = c.hidden_size
        if not (
            not torch.compiler.is_compiling()  # first: under compile, layer_threads would break the graph
            and c.scoring_func == "sigmoid"
            and c.dispatch in ("auto", "fused_cpu")
            and isinstance(x, Tensor)
            and x.dim() > 0
            and x.shape[-1] == h
            and (
                threads := cpu_kernel.layer_threads(
                    x.numel() // h, c.num_experts_per_tok, self._experts_on_kernel
                )
            )
        ):
            return None
        # the submodules and weights from nn.Module's own dicts: each attribute through
        # nn.Module.__getattr__ costs about 1 µs, 1% of a one-token call
        modules = self._modules
        gate, experts, shared = modules.get("gate"), modules.get("experts"), modules.get("shared_experts")
        if not (
            type(gate) is TopkRouter
            and type(experts) is Experts
            and experts.act_fn is F.silu  # (the modules' activation, fixed when built: not config.hidden_act)
            and _plain_call(gate)
            and _plain_call(experts)
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)
        ):
            return None
        e, i = c.n_routed_experts, c.moe_intermediate_size
        weights = (
            gate._parameters["weight"],  # [E, H]
            gate._buffers["e_score_correction_bias"],  # [E]
            experts._parameters["gate_up_proj"],  # [E, 2I, H]
            experts._parameters["down_proj"],  # [E, H, I]
        )
        shapes = ((e, h), (e,), (e, 2 * i, h), (e, h, i))
        sh = None
        if shared is not None:
            if not (type(shared) is MLP and shared.act_fn is F.silu and _plain_call(shared)):
                return None
            sh = shared.plain_weights()  # [Is, H], [Is, H], [H, Is]
            if sh is None:
                return None
            i_s = sh[0].shape[0]
            weights += sh
            shapes += ((i_s, h), (i_s, h), (h, i_s))
        if not cpu_kernel.readable(x, *weights):
            return None
        for w, shape in zip(weights, shapes):  # weights replaced (through .data) by other shapes
            if w.shape != shape:
                return None
        args = (x, *weights[:4], sh, c.num_experts_per_tok, c.n_group, c.topk_group, c.norm_topk_prob,
                c.routed_scaling_factor)  # fmt: skip
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
            train_threads = cpu_kernel.layer_train_threads(
                x.numel() // h, c.num_experts_per_tok, self._experts_on_kernel
            )
            if return_routing or not train_threads:
                return None
            return cpu_kernel.layer_train_call(*args, threads=train_threads)  # None for a tie
        done = cpu_kernel.layer_call(*args, routing=return_routing, threads=threads)
        if done is None or not return_routing:  # None: a tie, which torch's topk decides
            return done
        out, logits, scores, weights, indices = done
        return out, RouterOutput(logits, scores, weights, indices)

    def _experts_on_kernel(self, pairs: int, inference: bool) -> bool:
        """Whether "auto" would run the experts on ``pairs`` (token, slot) pairs through the C kernel,
        for inference or with gradients (asked beyond ``cpu_kernel.LAYER_MAX_TOKENS`` tokens): wider
        layers hand large batches to the BLAS."""
        c = self.config
        return dispatch.fused_cpu_pays(pairs, c.n_routed_experts, c.hidden_size, inference=inference)

    @classmethod
    def from_hf(cls, hf_moe: nn.Module) -> MoE:
        """A library MoE with the config and weights of a transformers ``Glm4MoeMoE``."""
        moe = cls(MoEConfig.from_hf(hf_moe.config))
        param = next(hf_moe.parameters())
        moe.to(device=param.device, dtype=param.dtype)
        state = hf_moe.state_dict()
        if moe.shared_experts is None:  # transformers builds a zero-width shared MLP for n_shared_experts=0
            zero_width = [k for k, v in state.items() if k.startswith("shared_experts.") and v.numel() == 0]
            state = {k: v for k, v in state.items() if k not in zero_width}
        moe.load_state_dict(state, strict=True)
        return moe
