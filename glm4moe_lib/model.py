"""A tiny GLM-4-style decoder-only language model, in one readable file (nanoGPT-style).

The structure and names follow transformers' ``Glm4MoeForCausalLM``::

    model.embed_tokens                    # [V, H]
    model.layers[i].input_layernorm       # RMSNorm
    model.layers[i].self_attn             # rotary attention (q_proj, k_proj, v_proj, o_proj), GQA
    model.layers[i].post_attention_layernorm
    model.layers[i].mlp                   # dense SwiGLU MLP for i < first_k_dense_replace,
                                          # else the library's MoE (router + experts + shared)
    model.norm                            # final RMSNorm
    model.lm_head                         # [V, H], tied to embed_tokens or not

Each block is pre-norm with two residuals::

    h = h + self_attn(input_layernorm(h))
    h = h + mlp(post_attention_layernorm(h))

``model(input_ids, labels=..., return_routing=True)`` returns a :class:`ModelOutput` whose
``routing`` holds one ``RouterOutput`` per layer (``None`` for the dense layers), which the
lessons use for load, balance and specialization plots.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig
from .experts import MLP
from .moe import MoE
from .router import RouterOutput

__all__ = [
    "IGNORE_INDEX",
    "MODEL_PRESETS",
    "Attention",
    "DecoderLayer",
    "GLMMoEModel",
    "ModelConfig",
    "ModelOutput",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary_pos_emb",
    "model_preset",
    "rotate_half",
]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= {minimum}")


def _is_number(value: Any) -> bool:
    """A real number (int, float, numpy scalar), not a bool and not a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive_float(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number > 0")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not allowed: use True or False")


def _check_ids_tensor(input_ids: Any) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids has shape {tuple(getattr(input_ids, 'shape', ()))} and dtype "
            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}: expected a [batch, seq] int64 tensor"
        )


def _check_model_config(config: Any) -> None:
    if not isinstance(config, ModelConfig):
        raise TypeError(
            f"config of type {type(config).__name__} is not allowed: it must be a ModelConfig "
            "(see model_preset)"
        )


def _check_hidden(name: str, x: Any, hidden_size: int, dims: str = "[..., H]") -> None:
    """A tensor whose last dimension is ``hidden_size`` (and 3 dimensions for "[B, S, H]")."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} of type {type(x).__name__} is not allowed: it must be a {dims} tensor")
    if x.dim() == 0 or x.shape[-1] != hidden_size or (dims == "[B, S, H]" and x.dim() != 3):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}: expected {dims} with H = hidden_size={hidden_size}"
        )


#: Label value that the loss skips (``F.cross_entropy``'s default ``ignore_index``).
IGNORE_INDEX = -100


def _check_token_ids(name: str, ids: Tensor, vocab_size: int, ignore_index: int | None = None) -> None:
    """ValueError naming the first id of ``ids`` outside [0, vocab_size) (``ignore_index`` allowed).

    Two reductions (min, max) over the ids; the slow path that finds the offending value runs only
    when one is out of range (or when ``ignore_index`` values are present).
    """
    if ids.numel() == 0:
        return
    lo, hi = (int(v) for v in ids.aminmax())
    if lo >= 0 and hi < vocab_size:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if ignore_index is not None:
        bad &= ids != ignore_index
    if bad.any():
        value = int(ids[bad][0])
        allowed = f"[0, vocab_size={vocab_size})"
        if ignore_index is not None:
            allowed += f" or {ignore_index} (ignored by the loss)"
        raise ValueError(f"{name} contains {value}: token ids must be in {allowed}")


@dataclass
class ModelConfig:
    """Configuration of the whole decoder; field names as in transformers' ``Glm4MoeConfig``.

    The MoE fields (``moe_intermediate_size`` ... ``scoring_func``) build one
    :class:`~glm4moe_lib.config.MoEConfig` (see :meth:`moe_config`), shared by every MoE layer.
    """

    vocab_size: int = 256  # byte-level tokenizer: one token per byte
    hidden_size: int = 64  # H
    num_hidden_layers: int = 3  # L
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # < num_attention_heads: grouped-query attention (GQA)
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    intermediate_size: int = 128  # width of the dense SwiGLU MLP in the first layers
    first_k_dense_replace: int = 1  # layers 0..k-1 are dense, the rest MoE
    max_position_embeddings: int = 128  # longest sequence (context window)
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5  # GLM-4.5 rotates half of each head's dimensions
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    use_qk_norm: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    # ---- the MoE layers (one MoEConfig for all of them) ----
    moe_intermediate_size: int = 32
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not allowed."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            _check_int(name, getattr(self, name), 1)
        _check_int("first_k_dense_replace", self.first_k_dense_replace, 0)
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace={self.first_k_dense_replace} is not allowed: it must be between "
                f"0 and num_hidden_layers={self.num_hidden_layers}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} is not allowed: it must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"num_attention_heads={self.num_attention_heads} is not allowed: it must divide "
                    f"hidden_size={self.hidden_size} (or set head_dim)"
                )
        else:
            _check_int("head_dim", self.head_dim, 2)
        if not _is_number(self.partial_rotary_factor) or not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(
                f"partial_rotary_factor={self.partial_rotary_factor!r} is not allowed: it must be a number "
                "in (0, 1]"
            )
        product = self.get_head_dim * self.partial_rotary_factor
        if abs(product - round(product)) > 1e-9 or self.rotary_dim % 2 != 0 or self.rotary_dim == 0:
            raise ValueError(
                f"partial_rotary_factor={self.partial_rotary_factor!r} is not allowed with "
                f"head_dim={self.get_head_dim}: head_dim * partial_rotary_factor = {product:g} must be a "
                "positive even integer (the number of rotated dimensions)"
            )
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            _check_positive_float(name, getattr(self, name))
        for name in ("attention_bias", "use_qk_norm", "tie_word_embeddings"):
            _check_bool(name, getattr(self, name))
        if self.num_moe_layers > 0:
            self.moe_config()  # MoEConfig checks its own fields

    # ---- derived sizes ---------------------------------------------------------------------------
    @property
    def get_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return round(self.get_head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def moe_config(self) -> MoEConfig:
        """The MoEConfig of every MoE layer."""
        return MoEConfig(
            hidden_size=self.hidden_size,
            moe_intermediate_size=self.moe_intermediate_size,
            n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            n_shared_experts=self.n_shared_experts,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            scoring_func=self.scoring_func,
        )

    def dense_equivalent(self) -> ModelConfig:
        """An all-dense twin with the same *active* FFN parameters per token.

        An MoE layer runs K routed experts and S shared ones of width I on each token: as many
        FFN weights as one SwiGLU of width I*(K+S). The twin uses that width in every layer, so
        when ``intermediate_size == I*(K+S)`` (as in the presets) both models do the same work per
        token; the MoE model only has more experts to choose from (and a tiny router).
        """
        width = self.moe_intermediate_size * (self.num_experts_per_tok + self.n_shared_experts)
        return self.replace(first_k_dense_replace=self.num_hidden_layers, intermediate_size=width)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config has unknown field(s) {unknown}: allowed are {sorted(known)}")
        return cls(**d)


#: Named model sizes. ``tiny``: CI and notebooks (trains in well under a minute on a CPU);
#: ``small``: a few minutes of CPU training.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        first_k_dense_replace=1,
        max_position_embeddings=64,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
    ),
    "small": ModelConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        first_k_dense_replace=1,
        max_position_embeddings=128,
        moe_intermediate_size=64,
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
    ),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """A copy of a named model preset, optionally with some fields changed."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"preset={name!r} is not known: use one of {sorted(MODEL_PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"model_overrides has unknown field(s) {unknown}: allowed are {sorted(known)}")
    return MODEL_PRESETS[name].replace(**overrides)


# ---- building blocks -----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in float32 (as ``Glm4MoeRMSNorm``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        _check_int("hidden_size", hidden_size, 1)
        _check_positive_float("eps", eps)
        self.weight = nn.Parameter(torch.ones(hidden_size))  # [H]
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:  # [..., H] -> [..., H]
        _check_hidden("hidden_states", hidden_states, self.weight.shape[0])
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        variance = x.pow(2).mean(-1, keepdim=True)  # [..., 1]
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate the first ``rotary_dim`` dims of q, k [B, heads, S, D] by cos, sin [S, rotary_dim]."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} of type {type(t).__name__} is not allowed: it must be a tensor")
    if cos.shape != sin.shape or cos.dim() < 2 or cos.shape[-2] != q.shape[-2] or cos.shape[-1] > q.shape[-1]:
        raise ValueError(
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} do not fit q {tuple(q.shape)}: expected "
            "both [S, rotary_dim] with S = q's sequence length and rotary_dim <= q's head_dim"
        )
    rd = cos.shape[-1]
    q_rot, q_pass = q[..., :rd], q[..., rd:]
    k_rot, k_pass = k[..., :rd], k[..., rd:]
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    k_rot = k_rot * cos + rotate_half(k_rot) * sin
    return torch.cat([q_rot, q_pass], dim=-1), torch.cat([k_rot, k_pass], dim=-1)


class RotaryEmbedding(nn.Module):
    """cos, sin tables [S, rotary_dim] for positions 0..S-1 (float32, then the input's dtype)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _check_model_config(config)
        dim = config.rotary_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rotary_dim / 2]

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))  # [S, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, rotary_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    """Causal multi-head attention with rotary positions and grouped-query K/V heads."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        _check_model_config(config)
        _check_int("layer_idx", layer_idx, 0)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.get_head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        h, d, b = config.hidden_size, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=b)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=b)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=b)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self._rotary: RotaryEmbedding | None = None  # built lazily when used standalone

    def forward(
        self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """hidden_states [B, S, H] -> [B, S, H]; each position sees itself and the past only."""
        _check_hidden("hidden_states", hidden_states, self.config.hidden_size, "[B, S, H]")
        bsz, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, seq, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(bsz, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(bsz, seq, self.num_kv_heads, self.head_dim)
        if self.config.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, D]
        if position_embeddings is None:
            if self._rotary is None:
                self._rotary = RotaryEmbedding(self.config)
            position_embeddings = self._rotary(seq, hidden_states.device, q.dtype)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))
        if self.num_key_value_groups > 1:  # GQA: each K/V head serves a group of query heads
            k = k.repeat_interleave(self.num_key_value_groups, dim=1)
            v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, S, D]
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    """Pre-norm block: attention, then a dense MLP (layer < first_k_dense_replace) or the MoE."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        _check_model_config(config)
        if (
            isinstance(layer_idx, bool)
            or not isinstance(layer_idx, int)
            or not 0 <= layer_idx < config.num_hidden_layers
        ):
            raise ValueError(
                f"layer_idx={layer_idx!r} is not allowed: it must be in [0, {config.num_hidden_layers})"
            )
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module
        if self.is_moe:
            self.mlp = MoE(config.moe_config())
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        return_routing: bool = False,
    ) -> Tensor | tuple[Tensor, RouterOutput | None]:
        """[B, S, H] -> [B, S, H]; with ``return_routing`` also the RouterOutput (None if dense)."""
        _check_hidden("hidden_states", hidden_states, self.input_layernorm.weight.shape[0], "[B, S, H]")
        residual = hidden_states
        hidden_states = residual + self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
        residual = hidden_states
        x = self.post_attention_layernorm(hidden_states)
        routing = None
        if self.is_moe:
            x, routing = self.mlp(x, return_routing=True)
        else:
            x = self.mlp(x)
        hidden_states = residual + x
        return (hidden_states, routing) if return_routing else hidden_states


class ModelOutput(NamedTuple):
    """What the model returns."""

    logits: Tensor  # [B, S, V] (float32 under autocast too)
    loss: Tensor | None  # mean next-token cross-entropy, when labels are given
    routing: list[RouterOutput | None] | None  # one per layer (None: dense layer), if asked for


class GLMMoEModel(nn.Module):
    """Embedding -> L decoder layers -> RMSNorm -> LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _check_model_config(config)
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        """GPT-2/transformers-style init: normal(0, initializer_range) for linear and embedding
        weights; the MoE layers keep the library's own initialization."""
        std = self.config.initializer_range
        in_moe = {id(m) for moe in self.moe_layers() for m in moe.modules()}
        for module in self.modules():
            if id(module) in in_moe or not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for moe in self.moe_layers():
            nn.init.normal_(moe.gate.weight, mean=0.0, std=std)

    def moe_layers(self) -> list[MoE]:
        """The MoE blocks, in layer order."""
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def num_parameters(self) -> dict[str, int]:
        """Total parameters and parameters active per token (K of E routed experts)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for moe in self.moe_layers():
            c = moe.config
            inactive += (
                (c.n_routed_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
            )
        return {"total": total, "active": total - inactive}

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        return_routing: bool = False,
    ) -> ModelOutput:
        """input_ids [B, S] int64 -> logits [B, S, V]; labels [B, S] (next tokens) give the loss.

        Label value -100 (``IGNORE_INDEX``) leaves a position out of the loss.
        """
        _check_ids_tensor(input_ids)
        seq = input_ids.shape[1]
        if seq == 0:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}: it needs at least one token (seq >= 1)"
            )
        if labels is not None and input_ids.shape[0] == 0:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}: the loss needs at least one row (batch >= 1)"
            )
        if seq > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has seq length {seq}: at most max_position_embeddings="
                f"{self.config.max_position_embeddings} is allowed"
            )
        if labels is not None:
            if (
                not isinstance(labels, Tensor)
                or labels.shape != input_ids.shape
                or labels.dtype != torch.long
            ):
                raise ValueError(
                    f"labels has shape {tuple(getattr(labels, 'shape', ()))} and dtype "
                    f"{getattr(labels, 'dtype', type(labels).__name__)}: expected an int64 tensor of "
                    f"input_ids' shape {tuple(input_ids.shape)}"
                )
            if labels.device != input_ids.device:
                raise ValueError(
                    f"labels is on device {labels.device}: it must be on input_ids' device {input_ids.device}"
                )
        # Id range checks: a min/max over the int64 ids, cheap for this tiny model. Only on CPU
        # tensors: on an accelerator reading the result back would sync the device every step
        # (training batches are checked by TrainConfig's vocab_size check, prompts by generate).
        if input_ids.device.type == "cpu":
            _check_token_ids("input_ids", input_ids, self.config.vocab_size)
            if labels is not None:
                _check_token_ids("labels", labels, self.config.vocab_size, IGNORE_INDEX)
        h = self.embed_tokens(input_ids)  # [B, S, H]
        pos = self.rotary_emb(seq, h.device, torch.float32)
        routing: list[RouterOutput | None] = []
        for layer in self.layers:
            h, r = layer(h, pos, return_routing=True)
            routing.append(r)
        logits = self.lm_head(self.norm(h)).float()  # [B, S, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return ModelOutput(logits, loss, routing if return_routing else None)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to input_ids [B, S] (temperature 0: greedy).

        The prompt needs at least one token; one longer than the context is cropped to its last
        ``max_position_embeddings`` tokens.
        """
        _check_ids_tensor(input_ids)
        if input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}: a prompt needs at least one token (seq >= 1)"
            )
        _check_token_ids("input_ids", input_ids, self.config.vocab_size)  # once per call, any device
        _check_int("max_new_tokens", max_new_tokens, 0)
        if not _is_number(temperature) or not temperature >= 0 or math.isinf(temperature):
            raise ValueError(f"temperature={temperature!r} is not allowed: it must be a finite number >= 0")
        if top_k is not None:
            _check_int("top_k", top_k, 1)
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
        ):
            raise TypeError(
                f"generator={generator!r} is not allowed: it must be a CPU torch.Generator (sampling "
                "runs on the CPU) or None"
            )
        ids = input_ids
        for _ in range(max_new_tokens):
            ctx = ids[:, -self.config.max_position_embeddings :]
            logits = self(ctx).logits[:, -1, :]  # [B, V]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
            ids = torch.cat([ids, nxt], dim=1)
        return ids
