"""glm4moe_lib: the GLM-4 / GLM-4.5 Mixture-of-Experts layer, built the way the course teaches it.

Modules follow the lessons: ``config`` (MoEConfig), ``router``, ``experts``, ``dispatch``,
``moe`` (the full layer), ``balance`` (losses and metrics), ``model`` / ``train`` / ``data`` (a tiny
GLM-4-style language model), ``parallel`` (expert parallelism), ``bench``, ``viz``, ``widgets``,
``exercises``, and ``device`` (pick_device).
"""

from .balance import (
    expert_load,
    load_balancing_loss,
    load_entropy,
    max_violation,
    router_z_loss,
    routing_entropy,
    sequence_balance_loss,
    switch_loss,
    update_bias,
)
from .config import ARCHS, PRESETS, ArchConfig, MoEConfig, preset
from .device import available_devices, keep_freed_cpu_memory, pick_device, torch_threads
from .dispatch import dense_reference, dispatch_combine, loop_dispatch, plan_dispatch, sorted_dispatch
from .experts import MLP, Experts, swiglu
from .model import DecoderLayer, GLMMoEModel, ModelConfig, model_preset
from .moe import MoE
from .router import RouterOutput, TopkRouter, compute_scores, group_limited_mask, route

__version__ = "0.1.0"

__all__ = [
    "ARCHS",
    "DecoderLayer",
    "GLMMoEModel",
    "ModelConfig",
    "MLP",
    "PRESETS",
    "ArchConfig",
    "Experts",
    "MoE",
    "MoEConfig",
    "RouterOutput",
    "TopkRouter",
    "available_devices",
    "compute_scores",
    "dense_reference",
    "dispatch_combine",
    "expert_load",
    "group_limited_mask",
    "keep_freed_cpu_memory",
    "load_balancing_loss",
    "load_entropy",
    "loop_dispatch",
    "max_violation",
    "model_preset",
    "pick_device",
    "torch_threads",
    "plan_dispatch",
    "preset",
    "route",
    "router_z_loss",
    "routing_entropy",
    "sequence_balance_loss",
    "sorted_dispatch",
    "swiglu",
    "switch_loss",
    "update_bias",
]
