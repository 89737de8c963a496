"""MoEConfig: the knobs of one GLM-4.5 MoE layer, named as in transformers' ``Glm4MoeConfig``.

The field names match the checkpoint config (``hidden_size``, ``moe_intermediate_size``,
``n_routed_experts`` ...), so a real config converts with :meth:`MoEConfig.from_hf`. One extra
field, ``scoring_func``, switches between the seed lessons' / Mixtral's ``softmax`` router and the
released GLM-4.5's ``sigmoid`` router. Every value is checked on construction: a wrong one raises a
``ValueError`` that names the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

SCORING_FUNCS = ("softmax", "sigmoid")
#: the fields MoEConfig.from_hf needs from a transformers config: every Glm4MoeConfig has them
HF_REQUIRED = (
    "hidden_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
)
HIDDEN_ACTS = ("silu", "gelu", "relu")
DISPATCH_STRATEGIES = (
    "auto",
    "loop",
    "sorted",
    "dense",
    "gather_bmm",
    "sorted_gather",
    "padded",
    "grouped_mm",
    "fused_cpu",
)


def check_int(name: str, value: Any, low: int, high: int | None = None, what: str = "") -> int:
    """``value`` as an int if it is an integer (not a bool) in [low, high], else a TypeError /
    ValueError naming ``name``, the value and what is allowed (``what`` adds a hint). The one
    integer-argument check the library's modules share (numpy integers pass)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} is not allowed: it must be an integer{what}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer {bound}{what}")
    return int(value)


def check_real(name: str, value: Any, low: float | None = None, above: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool), >= ``low`` (> with
    ``above``) when given, else a ValueError naming ``name``, the value and what is allowed."""
    bound = "" if low is None else f" {'>' if above else '>='} {low:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number{bound}")
    if low is not None and (value <= low if above else value < low):
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number{bound}")
    return float(value)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for the command lines (bench, train): an int >= ``low``, else a clean
    ``error:`` naming the value (exit 2), not a traceback from deep inside torch."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: it must be >= {low}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


@dataclass
class MoEConfig:
    """Configuration of one MoE layer (router + routed experts + shared experts).

    Defaults are a small teaching size; see :data:`PRESETS` for GLM-4.5 and GLM-4.5-Air.
    """

    hidden_size: int = 64  # H: width of the token representation
    moe_intermediate_size: int = 32  # I: hidden width of each SwiGLU expert
    n_routed_experts: int = 8  # E: experts the router chooses among
    num_experts_per_tok: int = 2  # K: experts each token is sent to (top-K)
    n_shared_experts: int = 1  # S: shared expert width = I * S, applied to every token (0: none)
    n_group: int = 1  # G: expert groups for group-limited routing
    topk_group: int = 1  # groups each token may pick experts from
    norm_topk_prob: bool = True  # renormalize the K weights to sum to 1 (before scaling)
    routed_scaling_factor: float = 1.0  # multiplies the routed weights (GLM-4.5: 2.5)
    hidden_act: str = "silu"  # activation inside each expert: silu gives SwiGLU
    scoring_func: str = "sigmoid"  # "sigmoid" (GLM-4.5, DeepSeek-V3) or "softmax" (seed, Mixtral)
    dispatch: str = "auto"  # how tokens reach experts; see glm4moe_lib.dispatch

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """Changing a field later is checked as on construction: a value that is not allowed raises
        (and the field keeps its old value), so a layer never runs on a config it could not be built
        with (the fused CPU kernel trusts its routing fields)."""
        if not self.__dict__.get("_validated"):  # still in __init__
            object.__setattr__(self, name, value)
            return
        missing = object()
        old = self.__dict__.get(name, missing)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except (ValueError, TypeError):
            if old is missing:
                object.__delattr__(self, name)
            else:
                object.__setattr__(self, name, old)
            raise

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not allowed."""
        for name in ("hidden_size", "moe_intermediate_size", "n_routed_experts"):
            _positive_int(name, getattr(self, name))
        for name in ("num_experts_per_tok", "n_group", "topk_group"):
            _positive_int(name, getattr(self, name))
        ns = self.n_shared_experts
        if isinstance(ns, bool) or not isinstance(ns, int) or ns < 0:
            raise ValueError(f"n_shared_experts={ns!r} is not allowed: it must be an integer >= 0")
        e, g = self.n_routed_experts, self.n_group
        if e % g != 0:
            raise ValueError(
                f"n_group={g} is not allowed with n_routed_experts={e}: the experts must split "
                f"into equal groups, so n_group must divide n_routed_experts"
            )
        if g > 1 and e // g < 2:
            raise ValueError(
                f"n_group={g} is not allowed with n_routed_experts={e}: group scores sum each "
                f"group's two best experts, so every group needs at least 2 experts"
            )
        if self.topk_group > g:
            raise ValueError(
                f"topk_group={self.topk_group} is not allowed: it must be between 1 and n_group={g}"
            )
        selectable = self.topk_group * (e // g)
        if self.num_experts_per_tok > selectable:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} is not allowed: a token can choose "
                f"from at most topk_group * n_routed_experts / n_group = {selectable} experts"
            )
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func={self.scoring_func!r} is not allowed: use one of {SCORING_FUNCS}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not allowed: use one of {HIDDEN_ACTS}")
        if self.dispatch not in DISPATCH_STRATEGIES:
            raise ValueError(f"dispatch={self.dispatch!r} is not allowed: use one of {DISPATCH_STRATEGIES}")
        r = self.routed_scaling_factor
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 or r == float("inf"):
            raise ValueError(f"routed_scaling_factor={r!r} is not allowed: it must be a finite number > 0")
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"norm_topk_prob={self.norm_topk_prob!r} is not allowed: use True or False")

    # ---- conversions -------------------------------------------------------------------------
    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> MoEConfig:
        """Build from a transformers ``Glm4MoeConfig``, a mapping of its fields (e.g. its
        ``to_dict()`` or a config.json), or any object with the same attributes.

        GLM-4.5 checkpoints always use sigmoid scoring, so ``scoring_func`` is "sigmoid" unless
        the config says otherwise (DeepSeek-style configs carry a ``scoring_func`` field).
        """
        names = [f.name for f in dataclasses.fields(cls) if f.name != "dispatch"]
        if isinstance(hf_config, Mapping):
            fields = {name: hf_config[name] for name in names if name in hf_config}
        else:
            fields = {name: getattr(hf_config, name) for name in names if hasattr(hf_config, name)}
        if not fields:  # e.g. None or a wrong object: defaults would be a silent wrong answer
            raise TypeError(
                f"hf_config of type {type(hf_config).__name__} has none of the MoEConfig fields "
                f"{names}: pass a transformers Glm4MoeConfig, a mapping such as its to_dict(), or an "
                "object with those attributes"
            )
        fields.update(overrides)
        missing = [name for name in HF_REQUIRED if name not in fields]
        if missing:  # e.g. a Mixtral config: the toy defaults would fill in a layer it does not describe
            raise ValueError(
                f"hf_config of type {type(hf_config).__name__} lacks {missing}: a GLM-4.5 (Glm4MoeConfig) "
                f"config has all of {list(HF_REQUIRED)}; pass the missing ones as keyword overrides if you "
                "mean to fill them in"
            )
        fields.setdefault("scoring_func", "sigmoid")
        return cls(**fields)

    def to_hf(self) -> Any:
        """A transformers ``Glm4MoeConfig`` with the same MoE fields (sigmoid scoring only)."""
        if self.scoring_func != "sigmoid":
            raise ValueError(
                f"scoring_func={self.scoring_func!r} has no transformers Glm4MoeConfig equivalent: "
                "Glm4MoeMoE always uses sigmoid scores"
            )
        from transformers import Glm4MoeConfig

        cfg = Glm4MoeConfig(
            hidden_size=self.hidden_size,
            moe_intermediate_size=self.moe_intermediate_size,
            n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            n_shared_experts=self.n_shared_experts,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=float(self.routed_scaling_factor),
            hidden_act=self.hidden_act,
        )
        cfg._experts_implementation = "eager"
        return cfg

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of one MoE layer: total, and active per token."""
        h, i, e, k = (
            self.hidden_size,
            self.moe_intermediate_size,
            self.n_routed_experts,
            self.num_experts_per_tok,
        )
        expert = 3 * h * i  # gate, up and down projections of one SwiGLU expert
        router = e * h
        shared = 3 * h * self.shared_intermediate_size
        return {
            "router": router,
            "per_expert": expert,
            "routed_experts": e * expert,
            "shared_experts": shared,
            "total": router + e * expert + shared,
            "active": router + k * expert + shared,
        }


@dataclass(frozen=True)
class ArchConfig:
    """Decoder-level facts of a released GLM-4.5 model (for parameter counting in lesson 02)."""

    name: str
    moe: MoEConfig
    vocab_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    intermediate_size: int  # dense FFN width of the first layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool
    use_qk_norm: bool
    tie_word_embeddings: bool
    num_mtp_layers: int  # multi-token-prediction layers shipped with the checkpoint
    published_total: str
    published_active: str


GLM45 = MoEConfig(
    hidden_size=5120,
    moe_intermediate_size=1536,
    n_routed_experts=160,
    num_experts_per_tok=8,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
)
GLM45_AIR = MoEConfig(
    hidden_size=4096,
    moe_intermediate_size=1408,
    n_routed_experts=128,
    num_experts_per_tok=8,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
)

#: Named layer configurations. "tiny" and "small" are teaching sizes that run instantly on a CPU.
PRESETS: dict[str, MoEConfig] = {
    "glm4.5": GLM45,
    "glm4.5-air": GLM45_AIR,
    "tiny": MoEConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2),
    "small": MoEConfig(
        hidden_size=128,
        moe_intermediate_size=64,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    ),
    "bench": MoEConfig(
        hidden_size=512, moe_intermediate_size=128, n_routed_experts=128, num_experts_per_tok=8
    ),
    "mixtral-like": MoEConfig(
        hidden_size=64,
        moe_intermediate_size=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=0,
        scoring_func="softmax",
    ),
}

#: Whole-model facts of the released checkpoints (config.json of zai-org/GLM-4.5 and GLM-4.5-Air).
ARCHS: dict[str, ArchConfig] = {
    "glm4.5": ArchConfig(
        name="GLM-4.5",
        moe=GLM45,
        vocab_size=151552,
        num_hidden_layers=92,
        first_k_dense_replace=3,
        intermediate_size=12288,
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        attention_bias=True,
        use_qk_norm=True,
        tie_word_embeddings=False,
        num_mtp_layers=1,
        published_total="355B",
        published_active="32B",
    ),
    "glm4.5-air": ArchConfig(
        name="GLM-4.5-Air",
        moe=GLM45_AIR,
        vocab_size=151552,
        num_hidden_layers=46,
        first_k_dense_replace=1,
        intermediate_size=10944,
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        attention_bias=True,
        use_qk_norm=False,
        tie_word_embeddings=False,
        num_mtp_layers=1,
        published_total="106B",
        published_active="12B",
    ),
}


def preset(name: str, **overrides: Any) -> MoEConfig:
    """A copy of a named preset, optionally with some fields changed."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known: use one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
