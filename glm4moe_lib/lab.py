"""The load-balancing lab (lesson 06): train a small MoE on CPU and watch its routing.

The task is built so that routing *collapses* without balancing:

* every token carries a large shared offset ``m`` (skewed inputs) plus its cluster's centre, and
  the target is a cluster-specific linear map of the token, so experts that specialise on clusters
  do best;
* the router starts rich-get-richer: its weight row for expert e has ``skew * (1 - 2e/(E-1))``
  times the offset direction, so at step 0 almost every token picks the first experts;
* with ``norm_topk_prob`` an expert that is never picked gets no gradient at all, so nothing pulls
  the starved experts back: they stay starved unless a balancing method intervenes.

:func:`run_balancing_experiment` trains one MoE layer with one method and records, per step, the
load of every expert, MaxVio and the task loss. It is deterministic on CPU for a given seed.

Methods (``coef`` is the loss coefficient alpha, or the bias update rate u for ``"bias"``):

* ``"none"``  — task loss only.
* ``"aux"``   — Switch / transformers auxiliary loss ``E * sum_e f_e P_e`` (all K picks counted).
* ``"zloss"`` — ST-MoE router z-loss ``mean(logsumexp(logits)^2)``.
* ``"bias"``  — auxiliary-loss-free selection-bias update (Wang et al. 2024; GLM-4.5, DeepSeek-V3).
* ``"seq"``   — DeepSeek-V3's sequence-wise balance loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .balance import (
    expert_load,
    load_balancing_loss,
    max_violation,
    router_z_loss,
    sequence_balance_loss,
    update_bias,
)
from .config import MoEConfig, check_real
from .device import torch_threads
from .moe import MoE

__all__ = [
    "LabResult",
    "LabTask",
    "METHODS",
    "METHOD_NAMES",
    "make_lab_moe",
    "make_task",
    "run_balancing_experiment",
    "run_sweep",
]

#: The balancing methods the lab knows, and the default coefficient of each.
METHODS: dict[str, float] = {"none": 0.0, "aux": 1e-2, "zloss": 1e-3, "bias": 1e-2, "seq": 1e-2}

#: Readable names for legends.
METHOD_NAMES: dict[str, str] = {
    "none": "no balancing",
    "aux": "aux loss (Switch)",
    "zloss": "z-loss",
    "bias": "bias update (loss-free)",
    "seq": "sequence-wise loss",
}


@dataclass
class LabTask:
    """A synthetic regression task: clusters of tokens, one linear teacher map per cluster."""

    offset: Tensor  # [H] shared offset every token carries (the skew)
    centers: Tensor  # [C, H] cluster centres
    maps: Tensor  # [C, H, H] teacher map of each cluster
    noise: float

    @property
    def hidden_size(self) -> int:
        return self.offset.shape[0]

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Tokens x [B, S, H] and targets y [B, S, H]; each sequence mixes two clusters."""
        n_clusters, h = self.centers.shape
        pair = torch.randint(n_clusters, (batch_size, 2), generator=generator)  # [B, 2]
        which = torch.randint(2, (batch_size, seq_len), generator=generator)  # [B, S]
        cluster = pair.gather(1, which)  # [B, S]
        eps = torch.randn(batch_size, seq_len, h, generator=generator) * self.noise
        x = self.offset + self.centers[cluster] + eps  # [B, S, H]
        y = torch.einsum("bsh,bsoh->bso", x - self.offset, self.maps[cluster])  # [B, S, H]
        return x, y


def make_task(
    hidden_size: int = 16, n_clusters: int = 8, offset_scale: float = 3.0, noise: float = 0.5, seed: int = 0
) -> LabTask:
    """The lab's task (fixed by ``seed``, independent of the training seed's data stream)."""
    check_real("offset_scale", offset_scale, 0)
    check_real("noise", noise, 0)
    g = torch.Generator().manual_seed(10_000 + seed)
    direction = torch.randn(hidden_size, generator=g)
    offset = offset_scale * direction / direction.norm()
    centers = torch.randn(n_clusters, hidden_size, generator=g)
    maps = torch.randn(n_clusters, hidden_size, hidden_size, generator=g) / math.sqrt(hidden_size)
    return LabTask(offset, centers, maps, noise)


@dataclass
class LabResult:
    """What one training run recorded (steps S, experts E)."""

    method: str
    coef: float
    seed: int
    top_k: int
    loads: Tensor  # [S, E] (token, slot) picks per expert at each step
    max_vio: list[float]  # [S] MaxVio of each training batch
    task_loss: list[float]  # [S] task (MSE) loss of each batch
    balance_loss: list[float]  # [S] the unscaled balancing loss (0 for "none" and "bias")
    bias: Tensor  # [S, E] the selection bias after each step (all zero except for "bias")
    eval_load: Tensor  # [E] load on held-out tokens after training
    eval_max_vio: float  # MaxVio_global: on held-out tokens after training
    eval_task_loss: float  # task loss on held-out tokens after training
    config: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.max_vio)

    @property
    def num_experts(self) -> int:
        return self.loads.shape[1]

    @property
    def label(self) -> str:
        return _run_label(self.method, self.coef)

    @property
    def mean_max_vio(self) -> float:
        """MaxVio_batch: MaxVio averaged over the training batches (Wang et al. 2024)."""
        return sum(self.max_vio) / len(self.max_vio)

    @property
    def final_task_loss(self) -> float:
        """Task loss averaged over the last 20 training steps (a single batch is noisy)."""
        tail = self.task_loss[-20:]
        return sum(tail) / len(tail)

    def summary(self, digits: int = 2) -> dict[str, float | str]:
        """Rounded numbers for a table (rounded so printouts are stable across machines)."""
        return {
            "method": self.label,
            "MaxVio_batch": round(self.mean_max_vio, digits),
            "MaxVio_global": round(self.eval_max_vio, digits),
            "task loss (last 20 steps)": round(self.final_task_loss, digits),
            "held-out task loss": round(self.eval_task_loss, digits),
        }


def _run_label(method: str, coef: float) -> str:
    """The label of a run (its key in :func:`run_sweep`'s dict), e.g. ``"aux loss (Switch), α=0.01"``."""
    name = METHOD_NAMES[method]
    if method == "none":
        return name
    sym = "u" if method == "bias" else "α"
    return f"{name}, {sym}={coef:g}"


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} is not allowed: it must be an integer")


def _check_offset(offset: Tensor | None, hidden_size: int, skew: float) -> None:
    if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not math.isfinite(skew):
        raise ValueError(f"skew={skew!r} is not allowed: it must be a finite number")
    if offset is None:
        return
    if not isinstance(offset, Tensor):
        raise TypeError(f"offset is a {type(offset).__name__}: pass a [hidden_size] tensor or None")
    if offset.shape != (hidden_size,):
        raise ValueError(f"offset has shape {tuple(offset.shape)}: expected [hidden_size] = [{hidden_size}]")
    if not offset.is_floating_point():
        raise TypeError(f"offset has dtype {offset.dtype}: a floating-point tensor is required")
    if not bool(torch.isfinite(offset).all()):
        raise ValueError("offset holds NaN or infinite values: every entry must be finite")
    if skew != 0 and float(offset.norm()) == 0.0:
        raise ValueError(
            "offset is all zeros: it sets the direction the router is tilted along, so it must be "
            "nonzero (pass offset=None, or skew=0, for no tilt)"
        )


def make_lab_moe(
    num_experts: int = 8,
    top_k: int = 2,
    hidden_size: int = 16,
    expert_size: int = 8,
    skew: float = 1.5,
    scoring_func: str = "sigmoid",
    offset: Tensor | None = None,
    seed: int = 0,
) -> MoE:
    """A MoE layer (no shared expert) whose router starts rich-get-richer along ``offset``.

    ``offset`` is a nonzero, finite [hidden_size] direction (None: no tilt); ``skew`` a finite number.
    """
    _check_offset(offset, hidden_size, skew)
    _check_seed(seed)
    config = MoEConfig(
        hidden_size=hidden_size,
        moe_intermediate_size=expert_size,
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        n_shared_experts=0,
        scoring_func=scoring_func,
        norm_topk_prob=True,
        dispatch="sorted",
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG stream is left as it was
        torch.random.default_generator.manual_seed(seed)
        moe = MoE(config)
    if offset is not None and skew != 0:
        unit = offset / offset.norm()
        tilt = torch.linspace(1.0, -1.0, num_experts) * skew  # [E]: expert 0 richest
        with torch.no_grad():
            moe.gate.weight.add_(tilt[:, None] * unit[None, :])
    return moe


def _check_method(method: str, coef: float | None) -> float:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed: use one of {list(METHODS)}")
    if coef is None:
        return METHODS[method]
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0 or math.isinf(coef):
        raise ValueError(f"coef={coef!r} is not allowed: it must be a finite number >= 0")
    return float(coef)


def run_balancing_experiment(
    method: str = "none",
    coef: float | None = None,
    steps: int = 200,
    seed: int = 0,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    hidden_size: int = 16,
    expert_size: int = 8,
    batch_size: int = 8,
    seq_len: int = 32,
    lr: float = 1e-2,
    skew: float = 1.5,
    scoring_func: str = "sigmoid",
    noise: float = 0.5,
    eval_tokens: int = 1024,
) -> LabResult:
    """Train one MoE layer on the lab task with one balancing ``method``; record the routing.

    ``coef`` is the loss coefficient (aux, zloss, seq) or the bias update rate u (bias); None uses
    :data:`METHODS`' default. Runs single-threaded on CPU, so the same seed gives the same numbers.
    """
    coef = _check_method(method, coef)
    _check_seed(seed)
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("eval_tokens", eval_tokens),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")
    check_real("lr", lr, 0, above=True)
    check_real("noise", noise, 0)
    with torch_threads(1):
        task = make_task(hidden_size, n_clusters=num_experts, noise=noise, seed=0)
        moe = make_lab_moe(
            num_experts, top_k, hidden_size, expert_size, skew, scoring_func, task.offset, seed
        )
        opt = torch.optim.Adam(moe.parameters(), lr=lr)
        data_gen = torch.Generator().manual_seed(seed)
        bias = moe.gate.e_score_correction_bias  # [E] float32 buffer
        loads, max_vio, task_losses, bal_losses, biases = [], [], [], [], []
        for _ in range(steps):
            x, y = task.sample(batch_size, seq_len, data_gen)  # [B, S, H] each
            out, routing = moe(x, return_routing=True)
            task_loss = F.mse_loss(out, y)
            if method == "aux":
                bal = load_balancing_loss(routing.logits, top_k)
            elif method == "zloss":
                bal = router_z_loss(routing.logits)
            elif method == "seq":
                bal = sequence_balance_loss(routing.scores, routing.topk_indices, batch_size)
            else:
                bal = torch.zeros(())
            loss = task_loss + coef * bal
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            load = expert_load(routing.topk_indices, num_experts)  # [E]
            if method == "bias":
                update_bias(bias, load, coef)
            loads.append(load)
            max_vio.append(max_violation(load))
            task_losses.append(float(task_loss.detach()))
            bal_losses.append(float(bal.detach()))
            biases.append(bias.detach().clone())
        with torch.no_grad():
            eval_gen = torch.Generator().manual_seed(123_456)
            n_seq = max(1, eval_tokens // seq_len)
            x, y = task.sample(n_seq, seq_len, eval_gen)
            out, routing = moe(x, return_routing=True)
            eval_load = expert_load(routing.topk_indices, num_experts)
            eval_loss = float(F.mse_loss(out, y))
    return LabResult(
        method=method,
        coef=coef,
        seed=seed,
        top_k=top_k,
        loads=torch.stack(loads),
        max_vio=max_vio,
        task_loss=task_losses,
        balance_loss=bal_losses,
        bias=torch.stack(biases),
        eval_load=eval_load,
        eval_max_vio=max_violation(eval_load),
        eval_task_loss=eval_loss,
        config={
            "num_experts": num_experts,
            "top_k": top_k,
            "hidden_size": hidden_size,
            "expert_size": expert_size,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "lr": lr,
            "skew": skew,
            "scoring_func": scoring_func,
            "noise": noise,
            "steps": steps,
        },
    )


def run_sweep(runs: list[tuple[str, float | None]], **kwargs) -> dict[str, LabResult]:
    """Several experiments with the same settings, keyed by their labels (in the given order).

    ``runs`` holds ``(method, coef)`` pairs (coef None: the method's default, :data:`METHODS`); two
    runs with the same label (e.g. ``("aux", None)`` and ``("aux", 1e-2)``) are rejected, not dropped.
    """
    if isinstance(runs, (str, bytes)) or not isinstance(runs, (list, tuple)):
        raise TypeError(f"runs={runs!r:.60} is not allowed: pass a list of (method, coef) pairs")
    labels: dict[str, tuple] = {}
    for run in runs:
        if not isinstance(run, (list, tuple)) or len(run) != 2:
            raise ValueError(
                f"runs holds {run!r:.60}: every run must be a (method, coef) pair, e.g. ('aux', 1e-2)"
            )
        label = _run_label(run[0], _check_method(*run))
        if label in labels:
            default = (
                f" (coef None means the method's default, {METHODS[run[0]]:g})"
                if None in (*labels[label], *run)
                else ""
            )
            raise ValueError(
                f"runs {tuple(labels[label])!r} and {tuple(run)!r} both give the label {label!r}{default}: "
                "each run is one key of the result, so list it once or give distinct coefficients"
            )
        labels[label] = run
    results: dict[str, LabResult] = {}
    for method, coef in runs:
        result = run_balancing_experiment(method, coef, **kwargs)
        results[result.label] = result
    return results
