"""Train the tiny GLM-4-style MoE language model on the course corpus.

Python::

    from glm4moe_lib.train import train, train_preset
    result = train(train_preset("tiny", steps=200, progress=False))
    result.model, result.metrics            # the trained model and its history

Command line::

    python -m glm4moe_lib.train --preset small --balance aux_loss_free --out runs/small
    python -m glm4moe_lib.train --preset small --out runs/small --resume   # continue a run

An ``out_dir`` (``--out``) that already holds a run is not written over: pass ``resume=True``
(``--resume``) to continue it or ``overwrite=True`` (``--overwrite``) to replace it. Ctrl-C during a
run with an ``out_dir`` finishes the current step, checkpoints it and stops (a second Ctrl-C stops at
once); ``--resume`` then continues from there.

What it does: AdamW with linear warmup then cosine decay; load balancing chosen by ``balance``:

* ``"aux_loss"``      add ``aux_loss_coef * load_balancing_loss(router logits of every MoE layer)``
* ``"aux_loss_free"`` after every step, ``update_bias`` moves each MoE layer's
  ``gate.e_score_correction_bias`` towards balance (GLM-4.5 / DeepSeek-V3)
* ``"none"``          nothing

Every ``eval_interval`` steps it measures the validation loss (overall and per domain), every MoE
layer's expert load and MaxVio on a fixed held-out set. Metrics go to ``metrics.json``; checkpoints
(``checkpoint.safetensors``: weights, optimizer, scheduler, RNG and loader state, step, history) are
written atomically (temporary file in the same folder, then ``os.replace``), so a crash while
writing leaves the previous checkpoint intact, and a resumed run ends with exactly the weights of
an uninterrupted one (on CPU). A checkpoint records which corpus it was trained on; resuming on
other data is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .balance import expert_load, load_balancing_loss, max_violation, update_bias
from .config import int_at_least
from .data import Batch, BatchLoader, ByteTokenizer, Corpus, eval_batches, load_corpus, split_corpus
from .device import keep_freed_cpu_memory
from .model import GLMMoEModel, ModelConfig, model_preset
from .router import RouterOutput

__all__ = [
    "BALANCE_MODES",
    "DOMAIN_PROMPTS",
    "TRAIN_PRESETS",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "atomic_write",
    "build_model",
    "collect_routing",
    "corpus_digest",
    "domain_expert_information",
    "domain_samples",
    "evaluate",
    "generate",
    "load_checkpoint",
    "lr_at",
    "main",
    "model_from_checkpoint",
    "route_text",
    "save_checkpoint",
    "specialization_matrix",
    "train",
    "train_preset",
]

BALANCE_MODES = ("aux_loss_free", "aux_loss", "none")
#: TrainConfig fields that hold real numbers.
_FLOAT_FIELDS = (
    "lr",
    "min_lr",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "aux_loss_coef",
    "bias_update_rate",
)
#: Device names TrainConfig accepts (what pick_device accepts; whether it is there is checked by train).
_DEVICE_NAME = re.compile(r"auto|cpu(:0)?|mps(:0)?|cuda(:\d+)?")
CHECKPOINT_NAME = "checkpoint.safetensors"
METRICS_NAME = "metrics.json"
CHECKPOINT_FORMAT = "glm4moe_lib.train/1"
#: Metadata entries every checkpoint holds (all but "step" are JSON).
CHECKPOINT_META_KEYS = ("step", "train_config", "model_config", "optim_param_groups", "scheduler", "metrics")
#: Tensors every checkpoint holds besides the weights and optimizer state.
CHECKPOINT_RNG_KEYS = ("rng.torch", "rng.loader")


@dataclass
class TrainConfig:
    """Everything a training run depends on (the model comes from ``preset`` + ``model_overrides``)."""

    preset: str = "tiny"  # model size: see glm4moe_lib.model.MODEL_PRESETS
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to change
    dense: bool = False  # train the dense twin with equal active parameters instead
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    balance: str = "aux_loss_free"  # one of BALANCE_MODES
    aux_loss_coef: float = 1e-2
    bias_update_rate: float = 1e-3
    eval_interval: int = 50  # 0: evaluate only at the end
    eval_batches: int = 4
    checkpoint_interval: int = 0  # 0: checkpoint only at the end; > 0 needs out_dir
    out_dir: str | None = None  # where metrics.json and checkpoint.safetensors go
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:N", "mps" or "auto" (see pick_device)
    data_dir: str | None = None  # default: data/corpus of this repository
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not allowed."""
        from .model import MODEL_PRESETS

        for name in ("preset", "balance", "device"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise TypeError(f"{name}={v!r} is not allowed: it must be a str")
        for name in ("dense", "progress"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"{name}={v!r} is not allowed: it must be True or False")
        for name in ("out_dir", "data_dir"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise TypeError(
                    f"{name}={v!r} is not allowed: it must be a folder path (str or os.PathLike) or None"
                )
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(
                    f"{name}={v!r} is not allowed: it must be a number (int or float), not {type(v).__name__}"
                )
            if not math.isfinite(v):
                raise ValueError(f"{name}={v!r} is not allowed: it must be a finite number")
        if self.preset not in MODEL_PRESETS:
            raise ValueError(f"preset={self.preset!r} is not known: use one of {sorted(MODEL_PRESETS)}")
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is not allowed: it must be a positive integer")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} is not allowed: it must be an integer >= 0")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance={self.balance!r} is not allowed: use one of {BALANCE_MODES}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is not allowed: it must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr!r} is not allowed: it must be in [0, lr={self.lr}]")
        for name in ("weight_decay", "grad_clip", "aux_loss_coef", "bias_update_rate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: it must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: it must be in [0, 1)")
        if not _DEVICE_NAME.fullmatch(self.device.strip().lower()):
            raise ValueError(
                f"device={self.device!r} is not allowed: use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"
            )
        if self.checkpoint_interval and not self.out_dir:
            raise ValueError(
                f"checkpoint_interval={self.checkpoint_interval} is not allowed without out_dir: checkpoints "
                "are written to out_dir; set out_dir, or checkpoint_interval=0"
            )
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides={self.model_overrides!r} is not allowed: it must be a dict")
        cfg = self.model_config()
        if cfg.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(
                f"model_overrides vocab_size={cfg.vocab_size} is not allowed: the byte tokenizer's ids go "
                f"up to {ByteTokenizer.vocab_size - 1}, so vocab_size must be >= {ByteTokenizer.vocab_size}"
            )
        if self.seq_len > cfg.max_position_embeddings:
            raise ValueError(
                f"seq_len={self.seq_len} is not allowed: it must be at most the model's "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )

    #: Fields a resumed run may change: the run length (not below the saved step), where files go,
    #: how often to evaluate and checkpoint, the device and the progress bar. Everything else must
    #: match the checkpoint, since resuming continues the saved run.
    RESUME_MAY_CHANGE = (
        "steps",
        "out_dir",
        "data_dir",
        "eval_interval",
        "checkpoint_interval",
        "device",
        "progress",
    )

    def model_config(self) -> ModelConfig:
        """The ModelConfig this run trains (the dense twin if ``dense``)."""
        cfg = model_preset(self.preset, **self.model_overrides)
        return cfg.dense_equivalent() if self.dense else cfg

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        if not isinstance(d, dict):
            raise TypeError(f"d of type {type(d).__name__} is not allowed: pass a dict of TrainConfig fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train config has unknown field(s) {unknown}: allowed are {sorted(known)}")
        return cls(**d)


#: Training settings that go with each model preset. A preset's ``checkpoint_interval`` applies
#: when ``out_dir`` is given (checkpoints need somewhere to go); without it, it is 0.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(steps=300, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=20, eval_interval=50),
    "small": dict(
        steps=800,
        batch_size=32,
        seq_len=128,
        lr=2e-3,
        warmup_steps=50,
        eval_interval=100,
        eval_batches=8,
        checkpoint_interval=100,  # a few minutes of CPU time: a crash loses at most 100 steps
    ),
}


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """The TrainConfig of a named preset, optionally with some fields changed."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"preset={name!r} is not known: use one of {sorted(TRAIN_PRESETS)}")
    if "preset" in overrides:
        raise ValueError(
            f"preset={overrides['preset']!r} is not allowed here: name the preset first, train_preset(name)"
        )
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"train_preset got unknown field(s) {unknown}: allowed are {sorted(known)}")
    settings = dict(TRAIN_PRESETS[name])
    if not overrides.get("out_dir"):
        settings.pop("checkpoint_interval", None)
    return TrainConfig(**{"preset": name, **settings, **overrides})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step``: linear warmup to ``lr``, then cosine decay to ``min_lr``."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(
            f"cfg of type {type(cfg).__name__} is not allowed: pass a TrainConfig (see train_preset)"
        )
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} is not allowed: it must be an integer >= 0 (steps count from 0)")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(progress, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _resolve_device(name: str) -> torch.device:
    from .device import pick_device

    return pick_device(name)


def build_model(cfg: TrainConfig) -> GLMMoEModel:
    """The model of ``cfg``, initialized from ``cfg.seed`` (on CPU, then moved)."""
    torch.manual_seed(cfg.seed)
    return GLMMoEModel(cfg.model_config())


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def _check_model(model: Any) -> None:
    if not isinstance(model, GLMMoEModel):
        raise TypeError(
            f"model of type {type(model).__name__} is not allowed: it must be a GLMMoEModel (see "
            "build_model, model_from_checkpoint or a TrainResult's .model)"
        )


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


# ---- evaluation and routing analysis -------------------------------------------------------------


@torch.no_grad()
def collect_routing(
    model: GLMMoEModel, batches: Sequence[Batch]
) -> tuple[list[Tensor], Tensor, list[Tensor], Tensor]:
    """Run ``batches`` and gather, for every MoE layer, the chosen experts of every token.

    Returns (topk_indices per MoE layer [T, K], token domain ids [T], per-token losses [T] as a
    one-element list, token ids [T]), with T = all tokens of all batches, in order.
    """
    _check_model(model)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass at least one Batch (see glm4moe_lib.data.eval_batches)")
    for i, b in enumerate(batches):
        if not isinstance(b, Batch):
            raise TypeError(
                f"batches[{i}] is a {type(b).__name__}: expected a Batch (see glm4moe_lib.data.eval_batches)"
            )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_layer: list[list[Tensor]] = [[] for _ in model.moe_layers()]
    domains, losses, tokens = [], [], []
    for b in batches:
        x, y = b.x.to(device), b.y.to(device)
        with _autocast(device):
            out = model(x, return_routing=True)
        moe_routing = [r for r in out.routing if r is not None]
        for i, r in enumerate(moe_routing):
            per_layer[i].append(r.topk_indices.cpu())
        ce = nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1), reduction="none"
        )
        losses.append(ce.cpu())
        domains.append(b.domain[:, None].expand_as(b.x).reshape(-1))
        tokens.append(b.x.reshape(-1))
    model.train(was_training)
    return (
        [torch.cat(layer) for layer in per_layer],
        torch.cat(domains),
        [torch.cat(losses)],
        torch.cat(tokens),
    )


def specialization_matrix(topk_indices: Tensor, domain_ids: Tensor, n_domains: int, n_experts: int) -> Tensor:
    """[D, E] float32: for each domain, the fraction of its (token, slot) picks that went to each expert.

    topk_indices [T, K] int64, domain_ids [T] int64. Each row sums to 1 (0 for a domain with no
    tokens); a uniform router gives 1/E everywhere.
    """
    for name, v in (("n_domains", n_domains), ("n_experts", n_experts)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} is not allowed: it must be a positive integer")
    for name, t in (("topk_indices", topk_indices), ("domain_ids", domain_ids)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} of type {type(t).__name__} is not allowed: it must be an integer tensor")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} is a {t.dtype} tensor: it must hold integer ids")
    if topk_indices.dim() != 2 or domain_ids.shape != topk_indices.shape[:1]:
        raise ValueError(
            f"topk_indices has shape {tuple(topk_indices.shape)} and domain_ids {tuple(domain_ids.shape)}: "
            "expected [T, K] and [T]"
        )
    for name, t, n in (("topk_indices", topk_indices, n_experts), ("domain_ids", domain_ids, n_domains)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            limit = "n_experts" if name == "topk_indices" else "n_domains"
            raise ValueError(f"{name} contains {bad}: ids must be in [0, {limit}={n})")
    topk_indices, domain_ids = topk_indices.long(), domain_ids.long()
    k = topk_indices.shape[1]
    dom = domain_ids[:, None].expand(-1, k).reshape(-1)  # [T*K]
    flat = dom * n_experts + topk_indices.reshape(-1)  # [T*K] index into D*E cells
    counts = torch.bincount(flat, minlength=n_domains * n_experts).float().view(n_domains, n_experts)
    return counts / counts.sum(1, keepdim=True).clamp_min(1)


def domain_expert_information(matrix: Tensor) -> float:
    """Mutual information (bits) between a pick's domain and its expert, domains weighted equally.

    ``matrix`` [D, E] is a specialization matrix (rows sum to 1) or a matrix of pick counts: each
    row is normalised to sum to 1, and all-zero rows (domains without tokens) are left out. 0 bits:
    every domain uses the experts alike; log2(D) bits: the expert alone tells which domain a token
    came from.
    """
    try:
        m = torch.as_tensor(matrix, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"matrix is not allowed: it must be a [D, E] tensor of numbers ({exc})") from None
    if m.dim() != 2 or m.numel() == 0:
        raise ValueError(f"matrix has shape {tuple(m.shape)}: it must be a non-empty 2-D [D, E] matrix")
    if not torch.isfinite(m).all():
        raise ValueError("matrix contains NaN or infinite values: it must hold finite numbers")
    if (m < 0).any():
        raise ValueError(f"matrix contains {float(m.min())}: its entries must be >= 0")
    if not m.sum() > 0:
        raise ValueError("matrix sums to 0: at least one domain must have picks")
    m = m[m.sum(1) > 0]
    m = m / m.sum(1, keepdim=True)

    def entropy(p: Tensor) -> Tensor:
        return -(p * p.clamp_min(1e-30).log2()).sum(-1)

    return float(entropy(m.mean(0)) - entropy(m).mean())


@torch.no_grad()
def evaluate(model: GLMMoEModel, batches: Sequence[Batch], domains: Sequence[str]) -> dict[str, Any]:
    """Validation loss (overall and per domain), per-layer expert load, MaxVio and specialization."""
    if isinstance(domains, str) or not all(isinstance(d, str) for d in domains):
        raise TypeError(f"domains={domains!r} is not allowed: it must be a sequence of domain names (str)")
    indices, dom, (losses,), _ = collect_routing(model, batches)
    if dom.numel() and int(dom.max()) >= len(domains):
        raise ValueError(
            f"domains={list(domains)!r} is not allowed: it names {len(domains)} domain(s) but the batches "
            f"hold domain ids up to {int(dom.max())}; pass one name per domain of the data the batches came from"
        )
    result: dict[str, Any] = {"val_loss": float(losses.mean())}
    result["val_loss_per_domain"] = {
        name: float(losses[dom == d].mean()) for d, name in enumerate(domains) if (dom == d).any()
    }
    loads, vios, spec = [], [], []
    for layer_idx in indices:
        e = model.moe_layers()[0].config.n_routed_experts
        load = expert_load(layer_idx, e)
        loads.append([int(v) for v in load.tolist()])
        vios.append(max_violation(load))
        spec.append(specialization_matrix(layer_idx, dom, len(domains), e).tolist())
    result["load"], result["max_vio"], result["specialization"] = loads, vios, spec
    return result


# ---- checkpoints ---------------------------------------------------------------------------------


class TrainingError(RuntimeError):
    """A run that failed; ``last_checkpoint`` is the last good checkpoint (or None)."""

    def __init__(self, message: str, last_checkpoint: Path | None) -> None:
        super().__init__(message)
        self.last_checkpoint = last_checkpoint


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then move the temporary file over ``path`` in one step: an
    interrupted write leaves the old file (or none), never half of one. Checkpoints and the learner
    notebooks are written through it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _rng_tensor(state: Tensor) -> Tensor:
    return state.clone().to(torch.uint8)


def save_checkpoint(
    path: str | Path,
    model: GLMMoEModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: BatchLoader,
    step: int,
    cfg: TrainConfig,
    metrics: dict[str, Any],
    corpus_sha256: str | None = None,
) -> Path:
    """Write everything needed to resume into one safetensors file, atomically.

    ``corpus_sha256`` (see :func:`corpus_digest`) records the data, so that resuming on other data
    can be refused."""
    from safetensors.torch import save_file

    _check_model(model)
    for name, value, kind in (
        ("optimizer", optimizer, torch.optim.Optimizer),
        ("scheduler", scheduler, torch.optim.lr_scheduler.LRScheduler),
        ("loader", loader, BatchLoader),
        ("cfg", cfg, TrainConfig),
        ("metrics", metrics, dict),
    ):
        if not isinstance(value, kind):
            raise TypeError(f"{name} is a {type(value).__name__}: save_checkpoint needs a {kind.__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} is not allowed: it must be an integer >= 0 (the steps done)")
    tensors: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous().clone()
    opt_state = optimizer.state_dict()
    for pid, st in opt_state["state"].items():
        for key, val in st.items():
            t = val if isinstance(val, Tensor) else torch.tensor(val)
            tensors[f"optim.{pid}.{key}"] = t.detach().cpu().contiguous().clone()
    loader_state = loader.state_dict()
    tensors["rng.torch"] = _rng_tensor(torch.get_rng_state())
    tensors["rng.loader"] = _rng_tensor(loader_state["generator"])
    if torch.cuda.is_available():
        tensors["rng.cuda"] = _rng_tensor(torch.cuda.get_rng_state())
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "train_config": json.dumps(cfg.to_dict()),
        "model_config": json.dumps(model.config.to_dict()),
        "optim_param_groups": json.dumps(opt_state["param_groups"]),
        "scheduler": json.dumps(scheduler.state_dict()),
        "metrics": json.dumps(metrics),
        "loader_calls": str(loader_state["calls"]),
    }
    if corpus_sha256 is not None:
        meta["corpus_sha256"] = corpus_sha256
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint; ValueError if it is missing, corrupt or not ours."""
    from safetensors import safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint={path!r} is not allowed: it must be a file path (str or os.PathLike)")
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"checkpoint={str(path)!r} is a directory, not a checkpoint file: pass the file, e.g. "
            f"{str(path / CHECKPOINT_NAME)!r}"
        )
    if not path.is_file():
        raise ValueError(f"checkpoint={str(path)!r} does not exist: pass a file written by glm4moe_lib.train")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for broken files
        raise ValueError(
            f"checkpoint={str(path)!r} is corrupt or not a safetensors file ({type(exc).__name__}: {exc})"
        ) from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint={str(path)!r} is not a glm4moe_lib.train checkpoint (format="
            f"{meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    missing = [k for k in CHECKPOINT_META_KEYS if k not in meta]
    missing_tensors = [k for k in CHECKPOINT_RNG_KEYS if k not in tensors]
    if missing or missing_tensors:
        raise ValueError(
            f"checkpoint={str(path)!r} is incomplete: it lacks metadata {missing} and tensors "
            f"{missing_tensors} (a checkpoint written by glm4moe_lib.train has metadata "
            f"{list(CHECKPOINT_META_KEYS)} and tensors {list(CHECKPOINT_RNG_KEYS)})"
        )
    for key in CHECKPOINT_META_KEYS:
        try:
            int(meta[key]) if key == "step" else json.loads(meta[key])
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(
                f"checkpoint={str(path)!r} is corrupt: its metadata {key!r} does not parse ({exc})"
            ) from None
    return tensors, meta


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> GLMMoEModel:
    """The model stored in a checkpoint (weights and config), ready for evaluation or sampling."""
    device = _resolve_device(device)
    tensors, meta = load_checkpoint(path)
    try:
        config = ModelConfig.from_dict(json.loads(meta["model_config"]))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"checkpoint={str(path)!r} stores a model config that is not valid: {exc}") from None
    model = GLMMoEModel(config)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint={str(path)!r} holds weights that do not match its stored model config: {exc}"
        ) from None
    return model.to(device)


# ---- training ------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: GLMMoEModel
    metrics: dict[str, Any]  # what metrics.json holds
    config: TrainConfig
    checkpoint: Path | None  # the last checkpoint this call wrote (None if it wrote none, e.g. no out_dir)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _check_out_dir(out_dir: Path) -> None:
    """Fail before training, not after it, if ``out_dir`` cannot hold the run's files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(
            f"out_dir={str(out_dir)!r} is not allowed: it is an existing file, not a folder "
            "(pass a folder, or a path that does not exist yet)"
        )
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"out_dir={str(out_dir)!r} is not allowed: {str(parent)!r} on its path is a file, not a folder"
        )


def _existing_run(out_dir: Path) -> str | None:
    """What an earlier run left in ``out_dir`` ("a run at step 7", ...), or None if nothing."""
    ckpt = out_dir / CHECKPOINT_NAME
    if ckpt.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(ckpt), framework="pt") as f:
                step = int((f.metadata() or {})["step"])
        except Exception:  # unreadable, but still somebody's file
            return f"a checkpoint ({CHECKPOINT_NAME}) that does not load"
        return f"a run at step {step}"
    if (out_dir / METRICS_NAME).exists():
        return f"the metrics of an earlier run ({METRICS_NAME})"
    return None


def corpus_digest(corpus: Corpus) -> str:
    """SHA-256 of a split corpus (domain names, tokens of both splits): which data a run trained on."""
    h = hashlib.sha256()
    for split in (corpus.train, corpus.val):
        for domain, ids in split.items():
            h.update(json.dumps([domain, len(ids)]).encode())
            h.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _restore_checkpoint(
    path: Path,
    cfg: TrainConfig,
    model: GLMMoEModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: BatchLoader,
    device: torch.device,
    corpus_sha256: str,
    corpus_from: str,
) -> tuple[int, dict[str, Any]]:
    """Check the checkpoint at ``path`` against this run, then load it into the model, optimizer,
    scheduler, loader and RNGs; returns (its step, its metrics). Everything is checked before the
    RNGs are touched: a checkpoint that does not fit or is corrupt is a ValueError naming what."""
    tensors, meta = load_checkpoint(path)
    where = f"resume={str(path)!r}"

    def corrupt(what: str) -> ValueError:
        return ValueError(f"{where} is corrupt: {what}")

    saved_step = int(meta["step"])
    if saved_step < 0:
        raise corrupt(f"its step is {saved_step}, but a step count is an integer >= 0")
    saved_cfg = json.loads(meta["train_config"])
    if not isinstance(saved_cfg, dict):
        raise corrupt(f"its train_config is a {type(saved_cfg).__name__}, not a dict of TrainConfig fields")
    now = json.loads(json.dumps(cfg.to_dict()))  # compare as stored (tuples become lists, ...)
    differ = [
        k for k in now if k in saved_cfg and k not in TrainConfig.RESUME_MAY_CHANGE and saved_cfg[k] != now[k]
    ]
    if differ:
        both = ", ".join(f"its {k}={saved_cfg[k]!r} but the config has {k}={now[k]!r}" for k in differ)
        raise ValueError(
            f"{where} does not fit this run: {both}. Resuming continues the saved run, "
            f"so only {list(TrainConfig.RESUME_MAY_CHANGE)} may change: pass the same values, or "
            "start a new run (no resume, another out_dir)"
        )
    if cfg.steps < saved_step:
        raise ValueError(
            f"steps={cfg.steps} is not allowed: {where} is already at step {saved_step}; "
            f"pass steps >= {saved_step} to continue it"
        )
    saved_corpus = meta.get("corpus_sha256")
    if saved_corpus is None:
        warnings.warn(
            f"{where} does not record which corpus it was trained on (written by an older version): "
            f"resuming on {corpus_from} without checking that it is the same data",
            stacklevel=3,
        )
    elif saved_corpus != corpus_sha256:
        raise ValueError(
            f"{where} was trained on other data: its corpus has sha256 {saved_corpus[:16]}..., this run's "
            f"({corpus_from}) {corpus_sha256[:16]}...; resume with the data it was trained on (data_dir "
            "or corpus), or start a new run (no resume, another out_dir)"
        )
    metrics = json.loads(meta["metrics"])
    if not isinstance(metrics, dict) or not all(isinstance(metrics.get(k), list) for k in ("train", "eval")):
        raise corrupt("its metrics lack the 'train' and 'eval' lists of a run's history")
    if len(metrics["train"]) != saved_step:
        raise corrupt(
            f"its step is {saved_step} but its metrics record {len(metrics['train'])} training steps"
        )

    # weights: names and shapes are checked by load_state_dict, dtypes here (it would cast silently)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    for k, v in state.items():
        if k in own and v.dtype != own[k].dtype:
            raise corrupt(f"its weight {k!r} is {v.dtype}, but the model's is {own[k].dtype}")

    # optimizer: the same parameter groups, and for each parameter AdamW's three entries of its shape
    groups = json.loads(meta["optim_param_groups"])
    own_groups = optimizer.state_dict()["param_groups"]
    layout = f"{len(own_groups)} groups of {[len(g['params']) for g in own_groups]} parameters"
    if (
        not isinstance(groups, list)
        or len(groups) != len(own_groups)
        or any(not isinstance(g, dict) or g.get("params") != o["params"] for g, o in zip(groups, own_groups))
    ):
        raise corrupt(f"its optimizer parameter groups do not fit this model's {layout}")
    for i, g in enumerate(groups):
        for key in ("lr", "weight_decay", "eps"):
            v = g.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise corrupt(f"its optimizer parameter group {i} has {key}={v!r}: expected a finite number")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    entries = ("exp_avg", "exp_avg_sq", "step")
    opt_state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = (k.split(".", 2) + ["", ""])[:3]
            if not pid.isdigit() or int(pid) >= len(params) or key not in entries:
                raise corrupt(
                    f"it holds the optimizer tensor {k!r}, which fits no parameter of this model (expected "
                    f"optim.<0..{len(params) - 1}>.<{'|'.join(entries)}>)"
                )
            opt_state.setdefault(int(pid), {})[key] = v
    lacking = [i for i in range(len(params)) if i not in opt_state]
    if saved_step > 0 and lacking:
        raise corrupt(
            f"it lacks the optimizer state of parameter(s) {lacking[:8]} (after step {saved_step} every "
            "parameter has one)"
        )
    for pid, st in sorted(opt_state.items()):
        if sorted(st) != sorted(entries):
            raise corrupt(
                f"the optimizer state of parameter {pid} has {sorted(st)}: expected {sorted(entries)}"
            )
        p = params[pid]
        for key in ("exp_avg", "exp_avg_sq"):
            if st[key].shape != p.shape or st[key].dtype != p.dtype:
                raise corrupt(
                    f"optim.{pid}.{key} is {st[key].dtype} {tuple(st[key].shape)}, but its parameter is "
                    f"{p.dtype} {tuple(p.shape)}"
                )
        if st["step"].numel() != 1 or not 0 <= float(st["step"]) < math.inf:
            raise corrupt(f"optim.{pid}.step is {st['step'].tolist()}: expected one count >= 0")

    sched = json.loads(meta["scheduler"])
    base_lrs = sched.get("base_lrs") if isinstance(sched, dict) else None
    if (
        not isinstance(sched, dict)
        or sched.get("last_epoch") != saved_step
        or not isinstance(base_lrs, list)
        or len(base_lrs) != len(own_groups)
    ):
        raise corrupt(
            f"its scheduler state does not belong to step {saved_step} (expected a dict with "
            f"last_epoch={saved_step} and {len(own_groups)} base_lrs)"
        )

    def check_rng(key: str, on: str = "cpu") -> None:
        try:
            torch.Generator(device=on).set_state(tensors[key])
        except (TypeError, RuntimeError) as exc:
            raise corrupt(f"its {key} is not a random generator state ({exc})") from None

    check_rng("rng.torch")
    check_rng("rng.loader")
    cuda_rng = "rng.cuda" in tensors and torch.cuda.is_available()
    if cuda_rng:
        check_rng("rng.cuda", "cuda")
    try:
        calls = int(meta.get("loader_calls", saved_step))  # older checkpoints: one batch per step
    except ValueError:
        calls = -1
    if calls < 0:
        raise corrupt(f"its loader_calls={meta.get('loader_calls')!r} is not an integer >= 0")

    # everything fits: load it
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{where} holds weights of another model: {exc}") from None
    on_device = {
        pid: {k: v if k == "step" else v.to(device) for k, v in st.items()} for pid, st in opt_state.items()
    }
    try:
        optimizer.load_state_dict({"state": on_device, "param_groups": groups})
        scheduler.load_state_dict(sched)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise corrupt(
            f"its optimizer or scheduler state does not load ({type(exc).__name__}: {exc})"
        ) from None
    torch.set_rng_state(tensors["rng.torch"])
    loader.load_state_dict({"generator": tensors["rng.loader"], "calls": calls})
    if cuda_rng:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return saved_step, metrics


class _DeferredSigint:
    """Inside ``with``: the first Ctrl-C (SIGINT) only sets ``requested`` (the run finishes its step,
    checkpoints it and stops); a second one interrupts at once. Python allows signal handlers only
    in the main thread; elsewhere, or when SIGINT is ignored, nothing changes."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.requested = enabled, False
        self._previous: Any = None

    def __enter__(self) -> _DeferredSigint:
        if self.enabled and threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):  # Python's default_int_handler or a program's own
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            signal.signal(signal.SIGINT, self._previous)
            self._previous(signum, frame)
        self.requested = True

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def train(
    cfg: TrainConfig,
    resume: str | os.PathLike | bool | None = None,
    corpus: Corpus | None = None,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train the model of ``cfg``; return it with its metrics.

    ``resume``: a checkpoint path, or True for ``out_dir/checkpoint.safetensors``. ``corpus``: a
    pre-split corpus (default: load and split ``data_dir``). ``stop_after``: stop (and checkpoint)
    after this many steps in total, as if interrupted; used to test resuming. ``overwrite``: replace
    the run that ``out_dir`` holds (otherwise such an out_dir is refused unless resuming its run).

    With ``out_dir``, Ctrl-C (SIGINT) lets the current step finish, checkpoints it and raises
    KeyboardInterrupt naming the checkpoint (also as its ``last_checkpoint``); a second Ctrl-C stops
    at once. An interrupt that cannot wait checkpoints the last completed step unless the weights
    are half-updated, and otherwise names the last good checkpoint.
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg={type(cfg).__name__} is not allowed: pass a TrainConfig (see train_preset)")
    cfg.validate()
    if resume is not None and not isinstance(resume, (str, os.PathLike, bool)):
        raise TypeError(
            f"resume={resume!r} is not allowed: pass a checkpoint path (str or os.PathLike), True for "
            "out_dir's checkpoint, or None"
        )
    if isinstance(resume, str) and not resume.strip():
        raise ValueError(
            "resume='' is not allowed: pass a checkpoint path, True for out_dir's checkpoint, or None"
        )
    if corpus is not None and not isinstance(corpus, Corpus):
        raise TypeError(
            f"corpus of type {type(corpus).__name__} is not allowed: pass a Corpus "
            "(glm4moe_lib.data.split_corpus(load_corpus(...))) or None to load data_dir"
        )
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite={overwrite!r} is not allowed: it must be True or False")
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1
    ):
        raise ValueError(f"stop_after={stop_after!r} is not allowed: it must be a positive integer or None")
    device = _resolve_device(cfg.device)
    if device.type == "cpu":  # reuse freed gradient buffers instead of page-faulting new ones
        keep_freed_cpu_memory()
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    if out_dir is not None:
        _check_out_dir(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir else None
    if resume is True:
        if ckpt_path is None:
            raise ValueError("resume=True is not allowed without out_dir: pass the checkpoint path instead")
        if overwrite:
            raise ValueError(
                "resume=True continues the run in out_dir and overwrite=True replaces it: pass one of them"
            )
        resume = ckpt_path
    resume_path = Path(resume) if resume else None
    resumes_out_dir = (
        resume_path is not None and ckpt_path is not None and resume_path.resolve() == ckpt_path.resolve()
    )
    if out_dir is not None and not overwrite and not resumes_out_dir:
        held = _existing_run(out_dir)
        if held is not None:
            how = "resume=True to continue it, " if ckpt_path.exists() else ""
            raise ValueError(
                f"out_dir={str(out_dir)!r} already holds {held}: pass {how}overwrite=True to replace it, "
                "or another out_dir"
            )
    if corpus is None:
        corpus = split_corpus(load_corpus(cfg.data_dir))
        corpus_from = f"data_dir={cfg.data_dir!r}" if cfg.data_dir else "the default corpus (data_dir=None)"
    else:
        corpus_from = "the corpus passed in"
    corpus_sha256 = corpus_digest(corpus)
    domains = corpus.domains

    model = build_model(cfg)
    loader = BatchLoader(corpus.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    held_out = eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    metrics: dict[str, Any] = {
        "train_config": cfg.to_dict(),
        "model_config": model.config.to_dict(),
        "domains": domains,
        "num_parameters": model.num_parameters(),
        "train": [],
        "eval": [],
    }
    start = 0
    model.to(device)
    optimizer = _make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.lr)
    last_good: Path | None = None  # the newest good checkpoint of this run (also one resumed from)
    last_good_step = 0
    written: Path | None = None  # the newest checkpoint this call wrote
    if resume_path is not None:
        start, metrics = _restore_checkpoint(
            resume_path, cfg, model, optimizer, scheduler, loader, device, corpus_sha256, corpus_from
        )
        metrics["train_config"] = cfg.to_dict()  # the config this run goes on with (steps may grow)
        last_good, last_good_step = resume_path, start
    saved_step = start  # the state after this step is on disk (or is the fresh start): nothing to save

    moe_layers = model.moe_layers()
    top_k = moe_layers[0].config.num_experts_per_tok if moe_layers else 0
    n_experts = moe_layers[0].config.n_routed_experts if moe_layers else 0
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)

    def checkpoint(step: int) -> None:
        nonlocal last_good, last_good_step, written, saved_step
        if ckpt_path is not None:
            written = save_checkpoint(
                ckpt_path, model, optimizer, scheduler, loader, step, cfg, metrics, corpus_sha256
            )
            last_good, last_good_step, saved_step = written, step, step
            _write_metrics(out_dir / METRICS_NAME, metrics)

    # Where the current step stands, for an interrupt: "clean" (the state is that after `completed`
    # steps), "drawn" (only the loader and the RNG moved: `snapshot` undoes that) or "update" (the
    # weights, optimizer and metrics are changing: not a state to save).
    phase, completed = "clean", start
    snapshot: tuple[dict[str, Any], Tensor] | None = None

    def interrupted() -> KeyboardInterrupt:
        """Checkpoint the last completed step if the state allows it; the KeyboardInterrupt to raise
        (its ``last_checkpoint``: the last good checkpoint, or None)."""
        exc = KeyboardInterrupt(why_interrupted())
        exc.last_checkpoint = last_good
        return exc

    def why_interrupted() -> str:
        head = f"training interrupted after step {completed} of {cfg.steps}"
        if ckpt_path is None:
            return f"{head}; nothing was saved (no out_dir)"
        problem = ""
        if phase == "update":
            problem = f" (step {completed + 1} was stopped halfway through its update, which is not saved)"
        elif completed > saved_step:
            if phase == "drawn" and snapshot is not None:  # put back the batch this step drew
                loader.load_state_dict(snapshot[0])
                torch.set_rng_state(snapshot[1])
            try:
                checkpoint(completed)
            except (Exception, KeyboardInterrupt) as exc:  # (another Ctrl-C: stop trying)
                problem = f" (saving step {completed} failed: {type(exc).__name__}: {exc})"
        if last_good is not None and last_good_step == completed:
            how = "resume=True (--resume)" if last_good == ckpt_path else f"resume={str(last_good)!r}"
            return f"{head}: checkpoint {str(last_good)!r} holds step {completed}; continue with {how}"
        good = f"{str(last_good)!r} (step {last_good_step})" if last_good is not None else "none was written"
        return f"{head}{problem}; last good checkpoint: {good}"

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", leave=False)
    t0 = time.perf_counter()
    step = start
    with _DeferredSigint(enabled=ckpt_path is not None) as sigint:
        try:
            model.train()
            for step in range(start, end):
                snapshot = (loader.state_dict(), torch.get_rng_state())
                phase = "drawn"
                batch = loader.next()
                x, y = batch.x.to(device), batch.y.to(device)
                with _autocast(device):
                    out = model(x, labels=y, return_routing=True)
                lm_loss = out.loss
                routing = [r for r in out.routing if r is not None]
                loss = lm_loss
                if cfg.balance == "aux_loss" and routing:
                    aux = load_balancing_loss([r.logits for r in routing], top_k)
                    loss = loss + cfg.aux_loss_coef * aux
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss is {float(loss.detach())} at step {step + 1}")
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                phase = "update"
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                loads = [expert_load(r.topk_indices, n_experts) for r in routing]
                if cfg.balance == "aux_loss_free":
                    for moe, load in zip(moe_layers, loads):
                        update_bias(moe.gate.e_score_correction_bias, load.to(device), cfg.bias_update_rate)
                metrics["train"].append(
                    {
                        "step": step + 1,
                        "loss": _round(float(lm_loss.detach())),
                        "total_loss": _round(float(loss.detach())),
                        "lr": _round(lr),
                        "max_vio": [_round(max_violation(load)) for load in loads],
                    }
                )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(lm_loss.detach()):.3f}")
                done = step + 1
                if (cfg.eval_interval and done % cfg.eval_interval == 0) or done == cfg.steps:
                    ev = evaluate(model, held_out, domains)
                    ev["step"] = done
                    metrics["eval"].append(ev)
                completed, phase = done, "clean"
                if (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0) or done == end:
                    checkpoint(done)
                if sigint.requested:
                    break
        except KeyboardInterrupt as exc:
            if bar is not None:
                bar.close()
            raise interrupted() from exc
        except Exception as exc:
            if bar is not None:
                bar.close()
            where = f"{last_good}" if last_good is not None else "none was written"
            raise TrainingError(
                f"training failed at step {step + 1} ({type(exc).__name__}: {exc}); last good checkpoint: {where}",
                last_good,
            ) from exc
        if bar is not None:
            bar.close()
        if sigint.requested:
            raise interrupted()
    metrics["train_seconds"] = metrics.get("train_seconds", 0.0) + round(time.perf_counter() - t0, 2)
    if out_dir is not None:
        _write_metrics(out_dir / METRICS_NAME, metrics)
    return TrainResult(model, metrics, cfg, written)


def _write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    text = json.dumps(metrics, separators=(",", ":"))

    def write(tmp: Path) -> None:
        tmp.write_text(text + "\n")

    atomic_write(path, write)


# ---- sampling ------------------------------------------------------------------------------------


def generate(
    model: GLMMoEModel,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 20,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` with ``max_new_tokens`` sampled bytes; returns only the new text."""
    _check_model(model)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r} is not allowed: it must be an integer in [0, 2**64)")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt={prompt!r} is not allowed: it must be a non-empty string")
    tok = ByteTokenizer()
    device = next(model.parameters()).device
    ids = tok.encode(prompt)[None].to(device)  # [1, S]
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    with _autocast(device):
        out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    model.train(was_training)
    return tok.decode(out[0, ids.shape[1] :])


#: One prompt per corpus domain, for samples.
DOMAIN_PROMPTS = {
    "prose": "The old ",
    "math": "17 + 25 = ",
    "code": "def total_3(xs, n):\n",
    "records": '{"id": ',
}


def domain_samples(model: GLMMoEModel, max_new_tokens: int = 120, seed: int = 0) -> dict[str, str]:
    """A seeded continuation of each domain's prompt (prompt included)."""
    return {d: p + generate(model, p, max_new_tokens, seed=seed) for d, p in DOMAIN_PROMPTS.items()}


@torch.no_grad()
def route_text(model: GLMMoEModel, text: str) -> tuple[list[str], list[RouterOutput | None]]:
    """Route every byte of ``text``: its printable tokens, and per layer the RouterOutput with one
    row per token (None for dense layers). A text longer than the context is cut into windows of
    ``max_position_embeddings`` bytes, each run on its own."""
    _check_model(model)
    tok = ByteTokenizer()
    ids = tok.encode(text)  # [T]
    if len(ids) == 0:
        raise ValueError("text='' is not allowed: give at least one character")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks: list[list[RouterOutput | None]] = []
    for window in ids.split(model.config.max_position_embeddings):
        with _autocast(device):
            chunks.append(model(window[None].to(device), return_routing=True).routing)
    model.train(was_training)
    routing: list[RouterOutput | None] = []
    for layer in zip(*chunks):
        if layer[0] is None:
            routing.append(None)
        else:
            routing.append(RouterOutput(*(torch.cat(parts) for parts in zip(*layer))))
    return [tok.token_str(i) for i in ids.tolist()], routing


# ---- command line --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m glm4moe_lib.train",
        description="Train the tiny GLM-4-style MoE language model on the course corpus.",
    )
    p.add_argument("--preset", default="tiny", help=f"model and training preset: {sorted(TRAIN_PRESETS)}")
    p.add_argument("--steps", type=int_at_least(1), help="training steps (default: the preset's)")
    p.add_argument("--batch-size", type=int_at_least(1))
    p.add_argument("--seq-len", type=int_at_least(1))
    p.add_argument("--lr", type=float)
    p.add_argument("--balance", choices=BALANCE_MODES, help="load balancing (default aux_loss_free)")
    p.add_argument("--aux-loss-coef", type=float)
    p.add_argument("--bias-update-rate", type=float)
    p.add_argument("--dense", action="store_true", help="train the dense twin with equal active parameters")
    p.add_argument("--eval-interval", type=int_at_least(0))
    p.add_argument("--checkpoint-interval", type=int_at_least(0))
    p.add_argument("--seed", type=int_at_least(0))
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    p.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (fixed for reproducible runs)")
    p.add_argument("--data-dir", help="corpus folder (default data/corpus)")
    p.add_argument("--out", help="folder for metrics.json and checkpoint.safetensors")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    again.add_argument(
        "--overwrite", action="store_true", help="replace the run OUT holds (default: refuse to touch it)"
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--samples", type=int_at_least(0), default=120, help="bytes sampled per domain prompt at the end"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "lr",
        "balance",
        "aux_loss_coef",
        "bias_update_rate",
        "eval_interval",
        "checkpoint_interval",
        "seed",
        "device",
        "data_dir",
    ):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = v
    if args.dense:
        overrides["dense"] = True
    overrides["out_dir"] = args.out
    overrides["progress"] = not args.no_progress
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        cfg = train_preset(args.preset, **overrides)
        if cfg.out_dir and not args.resume and not args.overwrite:
            held = _existing_run(Path(cfg.out_dir))
            if held is not None:
                how = "--resume to continue it, " if (Path(cfg.out_dir) / CHECKPOINT_NAME).exists() else ""
                raise ValueError(
                    f"--out {cfg.out_dir} already holds {held}: pass {how}--overwrite to replace it, or "
                    "another --out"
                )
        result = train(cfg, resume=True if args.resume else None, overwrite=args.overwrite)
    except (ValueError, TypeError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 130
    last = result.metrics["eval"][-1]
    print(f"steps {cfg.steps}  val loss {last['val_loss']:.4f}  MaxVio per MoE layer {last['max_vio']}")
    for domain, loss in last["val_loss_per_domain"].items():
        print(f"  {domain:8s} val loss {loss:.4f}")
    print(f"trained in {result.metrics['train_seconds']:.1f} s")
    if args.samples > 0:
        result.metrics["samples"] = domain_samples(result.model, args.samples)
        for domain, text in result.metrics["samples"].items():
            print(f"--- sample ({domain}) ---\n{text}")
    if cfg.out_dir:
        _write_metrics(Path(cfg.out_dir) / METRICS_NAME, result.metrics)
        print(f"metrics: {Path(cfg.out_dir) / METRICS_NAME}  checkpoint: {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
