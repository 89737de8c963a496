"""Benchmark one MoE layer against its physical limit and against transformers' ``Glm4MoeMoE``.

``python -m glm4moe_lib.bench`` (full run, a few minutes on a 2-core CPU) or ``--quick`` (seconds)
times one layer call, forward (under ``torch.no_grad``) and forward+backward (gradients of the
input and all weights), for T tokens, balanced and skewed routing, fp32 on CPU and bf16 on CUDA,
side by side in one process and interleaved round by round (so a noisy machine slows every
contender alike). It prints a table and writes JSON (and a markdown table) with each time and its
ratio to the limit. The contenders:

* this library's :class:`~glm4moe_lib.moe.MoE` with each dispatch strategy (``lib:<strategy>``),
* transformers' ``Glm4MoeMoE`` with ``experts_implementation`` "eager" and "grouped_mm"
  (``hf:<impl>``), loaded with the same weights,
* the library's layer through ``torch.compile`` (``lib:auto+compile``, forward); on a GPU, also
  its forward and transformers' ``grouped_mm`` one replayed from a CUDA graph (``+graph``),
* the limit: the larger of (a) the layer's active FLOPs run as plain dense GEMMs of the same total
  sizes (router, shared expert, and the routed experts as one [T·K, H] GEMM each way) and (b)
  reading the weights of every touched expert once (router + shared expert + each routed expert
  that got a token), timed as a plain read of that many bytes two ways, the faster counting: a
  fresh buffer, and the library layer's own weights (see :func:`layer_read_step`). For
  forward+backward, (a) adds the two backward GEMMs of each GEMM and (b) also writes each touched
  weight's gradient once.

The ``decode`` mode is the forward of one token (a decoding step) with its weights coming from
memory, as in a model whose layers together are far larger than the CPU's caches: each call runs
the next of ``DECODE_COPIES`` copies of every contender on the next of ``DECODE_TOKENS`` tokens, so
between two calls on one copy the other copies push its weights out of the caches; the limit's
GEMMs and read rotate over as many copies of their operands. The ``forward`` row at T=1 calls one
layer on one token again and again: its 8 experts' weights stay in cache there.

Forward rows on a CPU also time ``floor:expert_gemms``: each touched expert's two GEMMs on its
rows with the inputs ready, i.e. what the BLAS needs for these shapes before any dispatch work.
Forward+backward rows also time ``floor:dense_grads``: allocating and zero-filling one dense
gradient per parameter (all E experts), which every PyTorch backward pays and the limit does not
count. On a CPU the run first lets glibc keep freed big buffers (``--malloc keep``, the default):
with glibc's default every backward page-faults its gradient memory afresh, ten times the cost of
the zero-fill itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import numbers
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import PRESETS, MoEConfig, check_int, int_at_least
from .cpu_kernel import unsupported
from .device import keep_freed_cpu_memory, pick_device, torch_threads
from .dispatch import STRATEGIES, choose_strategy, dispatch_combine
from .moe import MoE

FULL_TOKENS = (1, 16, 64, 256, 1024, 4096)
QUICK_TOKENS = (1, 16, 256)
ROUTINGS = ("balanced", "skewed")
MODES = ("forward", "fwd+bwd", "decode")
#: decode rows: one token per call, this many copies of each contender (and of the limit's operands)
#: called in turn: at T=1 the bench layer reads about 7 MB per call, so 6 copies stream 44 MB between
#: two calls on one copy, more than this CPU's 32 MB L3 (a GPU's L2 is smaller still)
DECODE_COPIES = 6
#: decode rows: the tokens cycled through (prime to DECODE_COPIES: each copy sees every token)
DECODE_TOKENS = 61
HF_IMPLS = ("eager", "grouped_mm")
#: the library strategies timed by default ("dense" is O(T·E) work: only up to DENSE_MAX_TOKENS)
LIB_STRATEGIES = ("auto", "loop", "sorted", "gather_bmm", "padded", "grouped_mm", "fused_cpu", "dense")
DENSE_MAX_TOKENS = 64
#: gather_bmm copies T·K experts' weights: timed only while T·K <= GATHER_MAX_PAIRS * E
GATHER_MAX_PAIRS = 2
#: the per-expert Python loops pay one full-size zero gradient per touched expert in backward
#: (``weight[e]``'s backward): their forward+backward is timed up to this T only (hf:eager always)
LOOPS_BWD_MAX_TOKENS = 1
#: skewed routing: selection bias SKEW_BIAS * exp(-e / SKEW_DECAY) on expert e (a few hot experts)
SKEW_BIAS = 0.5
SKEW_DECAY = 8.0
RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench"
#: the device types the benchmark runs on
DEVICE_TYPES = ("cpu", "cuda")


# ---- argument checks -----------------------------------------------------------------------------
def _check_seconds(name: str, value: Any, allow_zero: bool = False) -> float:
    """``value`` as a float if it is a finite number of seconds > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} is not allowed: it must be a number of seconds")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number of seconds {bound}")
    return float(value)


def _check_choices(name: str, values: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    """``values`` (a list or tuple of names) as a tuple, each one of ``allowed``."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise TypeError(
            f"{name}={values!r} is not allowed: it must be a list or tuple of names from {tuple(allowed)}"
        )
    for v in values:
        if v not in allowed:
            raise ValueError(f"{name} contains {v!r}: use one of {tuple(allowed)}")
    return tuple(values)


def parse_device(device: str | torch.device | None) -> torch.device:
    """The benchmark's device: :func:`~glm4moe_lib.device.pick_device`'s (the course's one place,
    which names what is allowed or missing), on a CPU or a CUDA GPU; None: CUDA if present, else CPU."""
    dev = pick_device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type not in DEVICE_TYPES:
        raise ValueError(
            f"device={str(device)!r} is not allowed: the benchmark runs on one of {DEVICE_TYPES}"
        )
    return dev


# ---- the contenders ------------------------------------------------------------------------------
def build_layers(config: MoEConfig, device: torch.device, dtype: torch.dtype, hf_impls: Sequence[str]):
    """The library layer (seeded init) and transformers' layers loaded with the same weights."""
    torch.manual_seed(0)
    lib = MoE(config).to(device=device, dtype=dtype)
    hf_layers: dict[str, torch.nn.Module] = {}
    if hf_impls:
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

        for impl in hf_impls:
            hf_cfg = config.to_hf()
            hf_cfg._experts_implementation = impl
            layer = Glm4MoeMoE(hf_cfg).to(device=device, dtype=dtype)
            layer.load_state_dict(lib.state_dict())
            hf_layers[impl] = layer
    return lib, hf_layers


def set_routing(layers: Sequence[torch.nn.Module], routing: str) -> None:
    """Balanced: zero selection bias (random init spreads tokens evenly); skewed: a few hot experts."""
    for layer in layers:
        bias = layer.gate.e_score_correction_bias
        if routing == "balanced":
            bias.zero_()
        elif routing == "skewed":
            e = torch.arange(bias.numel(), device=bias.device, dtype=torch.float32)
            bias.copy_(SKEW_BIAS * torch.exp(-e / SKEW_DECAY))
        else:
            raise ValueError(f"routing={routing!r} is not allowed: use one of {ROUTINGS}")


def _layer_step(layer: torch.nn.Module, x: Tensor, mode: str, grad_out: Tensor) -> Callable[[], None]:
    if mode == "forward":

        def step() -> None:
            with torch.no_grad():
                layer(x)

    else:
        params = [p for p in layer.parameters() if p.requires_grad]

        def step() -> None:
            xg = x.detach().requires_grad_(True)
            layer(xg).backward(grad_out)
            for p in params:  # as optimizer.zero_grad(set_to_none=True)
                p.grad = None

    return step


def capture_cuda_graph(layer: torch.nn.Module, x: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
    """The layer's forward on ``x`` captured once in a CUDA graph: ``(graph, static_x, static_out)``.

    ``graph.replay()`` reruns the same kernels on whatever ``static_x`` holds, into
    ``static_out``, without the Python and launch overhead of each op (which dominates a small
    layer on a GPU). Capture fails if the forward waits for the device (a host sync).
    """
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs recommends
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = layer(static_x)
    return graph, static_x, static_out


def _graphed_step(layer: torch.nn.Module, x: Tensor) -> Callable[[], None]:
    """The layer's forward replayed from a CUDA graph (see :func:`capture_cuda_graph`)."""
    return capture_cuda_graph(layer, x)[0].replay


def _compiled_step(compiled: torch.nn.Module, x: Tensor) -> Callable[[], None]:
    """The layer's forward through ``torch.compile`` (compiled on the first call, which the
    calibration makes untimed)."""

    def step() -> None:
        with torch.no_grad():
            compiled(x)

    step()  # compile now: a missing C++ compiler fails here, not inside the timing loop
    return step


#: contenders also timed as a replayed CUDA graph (forward, on CUDA): "<name>+graph"
GRAPHED = ("lib:auto", "hf:grouped_mm")


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_config(config: Any) -> None:
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, not {type(config).__name__}")


def layer_flops(config: MoEConfig, tokens: int, backward: bool = False) -> int:
    """The active FLOPs of one layer call on ``tokens`` tokens, as dense GEMMs.

    Router [T, H]x[H, E], the shared expert (three [H, I_shared] matrices per token) and the T·K
    routed rows through their expert's three [H, I] matrices; 2 FLOPs per multiply-add. With
    ``backward`` each GEMM also runs its two backward GEMMs (input and weight gradients): x3.
    """
    _check_config(config)
    tokens = check_int("tokens", tokens, 0)
    h, i = config.hidden_size, config.moe_intermediate_size
    e, k = config.n_routed_experts, config.num_experts_per_tok
    forward = 2 * tokens * (h * e + 3 * h * config.shared_intermediate_size + k * 3 * h * i)
    return 3 * forward if backward else forward


def layer_bytes(config: MoEConfig, touched: int, elem_size: int, backward: bool = False) -> int:
    """The bytes of weights one layer call must read: the router, the shared expert and each of
    the ``touched`` routed experts (those that got at least one token) once. With ``backward``
    each of those weights' gradients is also written once: x2."""
    _check_config(config)
    touched = check_int("touched", touched, 0, config.n_routed_experts, " (experts with a token, at most E)")
    elem_size = check_int("elem_size", elem_size, 1, what=" (bytes per weight, e.g. 4 for fp32)")
    h, i = config.hidden_size, config.moe_intermediate_size
    weights = config.n_routed_experts * h + 3 * h * config.shared_intermediate_size + touched * 3 * h * i
    return weights * elem_size * (2 if backward else 1)


def layer_weights(layer: torch.nn.Module) -> list[Tensor]:
    """The layer's weights in the order :func:`limit_steps` reads them: the routed experts'
    ``gate_up_proj`` and ``down_proj`` first, then the rest (router, shared expert)."""
    experts = [layer.experts.gate_up_proj, layer.experts.down_proj]
    return experts + [p for p in layer.parameters() if all(p is not e for e in experts)]


def _first_elements(tensors: Sequence[Tensor], count: int, device, dtype) -> list[Tensor] | None:
    """Flat views of the first ``count`` elements of ``tensors``, one tensor after the other; None
    if they hold fewer, or one is not a contiguous ``dtype`` tensor on ``device``."""
    views: list[Tensor] = []
    left = count
    for t in tensors:
        if left == 0:
            break
        if t.device != torch.device(device) or t.dtype != dtype or not t.is_contiguous():
            return None
        take = min(left, t.numel())
        views.append(t.detach().view(-1)[:take])
        left -= take
    return views if left == 0 else None


def _read_step(src: list[Tensor], backward: bool) -> Callable[[], None]:
    """Read ``src`` once; with ``backward`` also write as many elements (the gradients) to fresh memory."""
    dst = [torch.empty_like(v) for v in src] if backward else None

    def step() -> None:
        if dst is None:
            for v in src:
                v.sum()  # read once
        else:
            for d, v in zip(dst, src):
                d.copy_(v)  # read the weights once, write their gradients once

    return step


def layer_read_step(
    config: MoEConfig, touched: int, mode: str, weights: Sequence[Tensor], device, dtype
) -> Callable[[], None] | None:
    """:func:`limit_steps`' read, of the layer's own memory: as many elements of ``weights``
    (:func:`layer_weights`) as the touched weights hold, the first experts' first (one op at T=1,
    two at T=16-64 here). None if ``weights`` hold fewer, or are not contiguous ``dtype`` on ``device``.

    Why a second read: on this VM where a buffer lands decides how fast it reads. The bench layer's
    100 MB of expert weights read in 3.7 ms in one process where a fresh buffer of that size took
    3.1 ms, and in 3.6-3.8 ms in another where the fresh one took 4.2-4.7 ms. The limit takes the
    faster of the two, so neither buffer's luck makes it easier to reach.
    """
    src = _first_elements(weights, layer_bytes(config, touched, elem_size=1), device, dtype)
    return None if src is None else _read_step(src, backward=mode != "forward")


def limit_steps(config: MoEConfig, tokens: int, touched: int, mode: str, device, dtype):
    """Two callables: (a) the active FLOPs as dense GEMMs, (b) the touched weights' bytes, read
    from a fresh buffer (:func:`layer_read_step` reads the layer's own memory).

    Returns ``(flops_step, bytes_step, flops, nbytes)``.
    """
    h, i, e, k = (
        config.hidden_size,
        config.moe_intermediate_size,
        config.n_routed_experts,
        config.num_experts_per_tok,
    )
    i_s = config.shared_intermediate_size
    # (M, K, N) of every forward GEMM: router, shared gate_up + down, routed gate_up + down
    shapes = [(tokens, h, e)]
    if i_s:
        shapes += [(tokens, h, 2 * i_s), (tokens, i_s, h)]
    shapes += [(tokens * k, h, 2 * i), (tokens * k, i, h)]
    shapes = [s for s in shapes if s[0] > 0]
    gen = torch.Generator(device="cpu").manual_seed(1)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    gemms: list[tuple[Tensor, Tensor, Tensor]] = []  # (a, b, out) with out = a @ b
    for m, kk, n in shapes:
        a, b, g = rand(m, kk), rand(kk, n), rand(m, n)
        gemms.append((a, b, torch.empty(m, n, device=device, dtype=dtype)))
        if mode != "forward":  # dA = G @ B^T, dB = A^T @ G
            gemms.append((g, b.t(), torch.empty(m, kk, device=device, dtype=dtype)))
            gemms.append((a.t(), g, torch.empty(kk, n, device=device, dtype=dtype)))
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b, _ in gemms)

    def flops_step() -> None:
        for a, b, out in gemms:
            torch.mm(a, b, out=out)

    nbytes = layer_bytes(config, touched, _elem(dtype), backward=mode != "forward")
    src = rand(layer_bytes(config, touched, elem_size=1))  # the weights (one element per weight)
    return flops_step, _read_step([src], backward=mode != "forward"), flops, nbytes


def _dense_grads_step(layer: torch.nn.Module) -> Callable[[], None]:
    """Allocate and zero one gradient per parameter, as any dense ``.grad`` costs at least.

    PyTorch gives every parameter a dense gradient, so backward writes all E experts' gradients
    (zeros for the untouched ones) whatever the dispatch: a floor above the limit at small T.
    """
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            torch.zeros_like(p)

    return step


def _in_turn(steps: Sequence[Callable[[], None]]) -> Callable[[], None]:
    """One call of the next of ``steps`` per call, round-robin (decode rows: cold weights)."""
    turn = itertools.count()

    def step() -> None:
        steps[next(turn) % len(steps)]()

    return step


def _decode_steps(layers: Sequence[torch.nn.Module], xs: Tensor) -> Callable[[], None]:
    """Forward of one token per call: copy ``k % len(layers)`` on token ``k % len(xs)``."""
    count = len(layers) * len(xs)
    return _in_turn(
        [
            _layer_step(layers[k % len(layers)], xs[k % len(xs)][None], "forward", xs[0][None])
            for k in range(count)
        ]
    )


def _contender_step(
    pick: Callable[[MoE, dict[str, torch.nn.Module]], torch.nn.Module],
    copies: Sequence[tuple[MoE, dict[str, torch.nn.Module]]],
    mode: str,
    x: Tensor,
    xs: Tensor | None,
    grad_out: Tensor,
) -> Callable[[], None]:
    """The timed step of one contender, ``pick(lib, hf_layers)`` of the first copy; in decode rows,
    of every copy in turn on the tokens ``xs``."""
    if mode == "decode":
        return _decode_steps([pick(c, h) for c, h in copies], xs)
    return _layer_step(pick(*copies[0]), x, mode, grad_out)


def measure_peaks(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """A GPU's two ceilings, measured once: dense GEMM FLOP/s and device-memory bytes/s.

    On a GPU a small GEMM or copy is bounded by its launch, not by the chip, so there the limit is
    computed from these ceilings (flops / peak FLOP/s, bytes / peak bytes/s) instead of timing the
    limit's own small GEMMs: the physical limit, not one more launch-bound kernel.
    """
    size = 8192
    gen = torch.Generator(device="cpu").manual_seed(2)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    src = torch.randn(1 << 28, device=device, dtype=dtype)  # 512 MB in bf16
    dst = torch.empty_like(src)
    gemm = time_interleaved({"gemm": lambda: torch.mm(a, b)}, device, 5, 0.05)["gemm"]["min_s"]
    copy = time_interleaved({"copy": lambda: dst.copy_(src)}, device, 5, 0.05)["copy"]["min_s"]
    return {
        "gemm_flops_per_s": 2 * size**3 / gemm,
        "bytes_per_s": 2 * src.numel() * src.element_size() / copy,  # read + write
    }


def _expert_gemms_step(lib: MoE, counts: Tensor) -> Callable[[], None]:
    """Each touched expert's two GEMMs on its rows, inputs ready (forward): what the BLAS itself
    needs for the routed experts, without routing, gather, activation or combine. The gap between
    this and the limit is the BLAS on these shapes; the gap between a strategy and this, dispatch."""
    gu = lib.experts.gate_up_proj.detach().unbind(0)  # [2I, H] each
    dn = lib.experts.down_proj.detach().unbind(0)  # [H, I] each
    gen = torch.Generator(device="cpu").manual_seed(3)
    work = []
    for e, n in enumerate(counts.tolist()):
        if n:
            x = torch.randn(n, gu[e].shape[1], generator=gen).to(gu[e])  # [n, H]
            a = torch.randn(n, dn[e].shape[1], generator=gen).to(dn[e])  # [n, I]
            work.append((x, gu[e], a, dn[e]))

    def step() -> None:
        for x, g, a, d in work:
            torch.mm(x, g.t())
            torch.mm(a, d.t())

    return step


# ---- timing --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: "wall": time.perf_counter. "cpu": time.process_time, the CPU time of this process: on a machine
#: shared with other jobs it is not inflated by waiting for a core (use it with --threads 1).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _calibrate(step: Callable[[], None], device, min_sample_s: float, clock=time.perf_counter):
    """(calls per timed sample so that one lasts at least ``min_sample_s``, one warm call's time)."""
    step()
    _sync(device)
    t0 = clock()
    step()
    _sync(device)
    dt = max(clock() - t0, 1e-7)
    return max(1, min(1000, math.ceil(min_sample_s / dt))), dt


#: a call slower than this is sampled at most SLOW_SAMPLES times (its calibration call included):
#: with 3, one disturbed sample on a shared machine decided a T=4096 backward row (1.42x against
#: 1.23x for the same kernel under another name in the same run)
SLOW_CALL_S = 0.25
SLOW_SAMPLES = 5


def time_interleaved(
    steps: dict[str, Callable[[], None]], device, repeats: int, min_sample_s: float, clock: str = "wall"
) -> dict[str, dict[str, float]]:
    """Time every step ``repeats`` times, round-robin; per-call min and median in seconds.

    Each sample follows one untimed call of the same step, so no contender pays for the cache
    misses of the one before it (the layers do not share weights with each other); the round
    starts with a different contender each time. That holds for a step of one call per sample too
    (say a 10 ms backward), which once went without: measured (bench layer, 1 thread, T=16-64), the
    library's call right after transformers' layer took up to 11% longer (median 0-9%) than right
    after itself, while the limit, faster and so sampled several calls at a time, always got its
    warm-up. Only steps slower than ``SLOW_CALL_S`` per call (whose own misses are small next to
    the call) skip it and get ``SLOW_SAMPLES`` samples (their calibration call included), which
    keeps the full run short.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r} is not allowed: use one of {sorted(CLOCKS)}")
    if not isinstance(steps, dict) or not steps:
        raise ValueError(f"steps={steps!r} is not allowed: it must be a non-empty dict of name -> callable")
    for name, step in steps.items():
        if not callable(step):
            raise TypeError(
                f"steps[{name!r}] is not allowed: it must be a callable, not {type(step).__name__}"
            )
    repeats = check_int("repeats", repeats, 1)
    min_sample_s = _check_seconds("min_sample_s", min_sample_s, allow_zero=True)
    device = torch.device(device)
    if clock == "cpu" and device.type != "cpu":
        raise ValueError("clock='cpu' is not allowed on an accelerator: GPU time is not CPU time")
    now = CLOCKS[clock]
    calls: dict[str, int] = {}
    samples: dict[str, list[float]] = {}
    slow: dict[str, bool] = {}
    for name, step in steps.items():
        calls[name], first = _calibrate(step, device, min_sample_s, now)
        slow[name] = first >= SLOW_CALL_S
        # a slow call is its own warm-up: its calibration run counts as a sample
        samples[name] = [first] if slow[name] else []
    names = list(steps)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # a different one starts each round
            if slow[name] and len(samples[name]) >= SLOW_SAMPLES:
                continue  # slow contenders (the loops' backward): a few samples are enough
            step = steps[name]
            if not slow[name]:
                step()  # untimed: the contender starts warm, whatever ran before it
            _sync(device)
            t0 = now()
            for _ in range(calls[name]):
                step()
            _sync(device)
            samples[name].append((now() - t0) / calls[name])
    return {
        name: {"min_s": min(s), "median_s": statistics.median(s), "calls_per_sample": calls[name]}
        for name, s in samples.items()
    }


# ---- reading and computing: do they overlap? ----------------------------------------------------
def even_routing(tokens: int, experts: int, top_k: int) -> Tensor:
    """[tokens, top_k] expert ids, distinct within each token, that give every expert the same
    number of (token, slot) pairs: token t takes experts t·K, t·K+1, ..., t·K+K-1 (mod E). Every
    expert then gets exactly tokens·K / E pairs (the caller makes E divide tokens·K)."""
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k={top_k} is not allowed: it must lie in [1, experts={experts}]")
    if tokens < 0 or (tokens * top_k) % experts:
        raise ValueError(
            f"tokens={tokens} is not allowed: tokens * top_k ({tokens} * {top_k}) must be a non-negative "
            f"multiple of experts={experts}, so that every expert gets the same number of pairs"
        )
    pairs = torch.arange(tokens * top_k, dtype=torch.int64).reshape(tokens, top_k)  # [T, K]
    return pairs % experts


def overlap_probe(
    gate_up: Tensor,
    down: Tensor,
    top_k: int,
    tokens_per_expert: Sequence[int] = (1, 2, 4, 8),
    hot_experts: int | None = None,
    repeats: int = 5,
    min_sample_s: float = 0.02,
    strategy: str = "auto",
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Do the routed experts' weight reads and their multiply-adds overlap? Three times per row.

    For each n in ``tokens_per_expert``, every one of the E experts gets exactly n of the T = E·n/K
    tokens (:func:`even_routing`), and three steps are timed, interleaved:

    * ``call_s``: the routed experts on those T tokens (``dispatch_combine`` with ``strategy``),
      their weights coming from memory (E experts' weights, far more than the caches);
    * ``read_s``: a plain read of as many bytes (``Tensor.sum``): the memory side alone;
    * ``compute_s``: the same work per expert on ``hot_experts`` experts (default K: 8 experts are
      6 MB at the benchmark's size) whose weights stay in cache, times E / hot_experts: the work
      alone, with (almost) no wait on memory.

    The limit assumes the two overlap perfectly: ``max(read_s, compute_s)``; one after the other
    they take ``read_s + compute_s``. Runs on ``threads`` of torch's threads (default: as many as
    now; set back afterwards); ``gate_up`` [E, 2I, H] and
    ``down`` [E, H, I] as in :class:`~glm4moe_lib.experts.Experts`. Returns one dict per n:
    ``tokens_per_expert``, ``tokens``, ``call_s``, ``read_s``, ``compute_s`` (minimum per call).
    """
    if gate_up.dim() != 3 or down.dim() != 3 or down.shape[0] != gate_up.shape[0]:
        raise ValueError(
            f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} must be [E, 2I, H] and [E, H, I]"
        )
    experts = gate_up.shape[0]
    top_k = check_int("top_k", top_k, 1, experts, f" (experts per token, at most experts={experts})")
    if hot_experts is not None:
        check_int("hot_experts", hot_experts, 1)
    hot = top_k if hot_experts is None else hot_experts
    if not top_k <= hot <= experts:
        raise ValueError(
            f"hot_experts={hot} is not allowed: it must lie in [top_k={top_k}, experts={experts}]"
        )
    for n in tokens_per_expert:
        if not (
            isinstance(n, int)
            and not isinstance(n, bool)
            and n >= 1
            and (experts * n) % top_k == 0
            and (hot * n) % top_k == 0
        ):
            raise ValueError(
                f"tokens_per_expert has {n!r}: each must be a positive int n with experts * n ({experts} * n) "
                f"and hot_experts * n ({hot} * n) multiples of top_k={top_k}"
            )
    repeats = check_int("repeats", repeats, 1)
    min_sample_s = _check_seconds("min_sample_s", min_sample_s, allow_zero=True)
    if threads is not None:
        check_int("threads", threads, 1, what=" (or None: torch's current count)")
    with torch_threads(threads):
        return _overlap_rows(gate_up, down, top_k, tokens_per_expert, hot, repeats, min_sample_s, strategy)


def _overlap_rows(gate_up, down, top_k, tokens_per_expert, hot, repeats, min_sample_s, strategy):
    experts, hidden = gate_up.shape[0], gate_up.shape[2]
    device, dtype = gate_up.device, gate_up.dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    hot_gate_up, hot_down = gate_up[:hot].detach().clone(), down[:hot].detach().clone()
    weights = torch.cat([gate_up.detach().reshape(-1), down.detach().reshape(-1)])  # what the call reads
    rows = []
    for n in tokens_per_expert:
        steps = {}
        for name, (e, gu, dn) in {
            "call": (experts, gate_up, down),
            "hot": (hot, hot_gate_up, hot_down),
        }.items():
            tokens = e * n // top_k
            x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)  # [T, H]
            ids = even_routing(tokens, e, top_k).to(device)  # [T, K]
            w = torch.rand(tokens, top_k, generator=gen).to(device=device, dtype=dtype)  # [T, K]
            steps[name] = lambda x=x, ids=ids, w=w, gu=gu, dn=dn: dispatch_combine(
                x, ids, w, gu, dn, strategy=strategy
            )
        steps["read"] = weights.sum
        with torch.no_grad():
            times = time_interleaved(steps, device, repeats, min_sample_s)
        rows.append(
            {
                "tokens_per_expert": n,
                "tokens": experts * n // top_k,
                "call_s": times["call"]["min_s"],
                "read_s": times["read"]["min_s"],
                "compute_s": times["hot"]["min_s"] * experts / hot,
            }
        )
    return rows


# ---- one run -------------------------------------------------------------------------------------
def run(
    tokens: Sequence[int] = FULL_TOKENS,
    routings: Sequence[str] = ROUTINGS,
    modes: Sequence[str] | None = None,
    config: MoEConfig | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    strategies: Sequence[str] = LIB_STRATEGIES,
    hf_impls: Sequence[str] = HF_IMPLS,
    repeats: int = 5,
    min_sample_s: float = 0.02,
    seed: int = 0,
    clock: str = "wall",
    verbose: bool = True,
    keep_cpu_memory: bool = True,
    compile_layer: bool = True,
) -> dict[str, Any]:
    """Run the benchmark and return the results as a JSON-ready dict (see the module docstring).

    ``keep_cpu_memory``: on a CPU, first let glibc keep freed big buffers for reuse
    (:func:`~glm4moe_lib.device.keep_freed_cpu_memory`), so no contender's backward is timed
    page-faulting fresh gradient memory; process-wide, so every contender runs alike.
    ``compile_layer``: also time the forward through ``torch.compile`` (``lib:auto+compile``).
    ``modes``: default all of MODES on a CPU; on a GPU not ``decode``, whose copies of every
    contender would take DECODE_COPIES times the memory (ask for it by name).
    """
    # every argument is checked before anything is built or timed
    config = config or PRESETS["bench"]
    _check_config(config)
    device = parse_device(device)
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise TypeError(
            f"tokens={tokens!r} is not allowed: it must be a list or tuple of token counts (ints >= 0)"
        )
    tokens = tuple(check_int("tokens", t, 0, what=" (a token count)") for t in tokens)
    routings = _check_choices("routings", routings, ROUTINGS)
    if modes is not None:
        modes = _check_choices("modes", modes, MODES)
    strategies = _check_choices("strategies", strategies, ("auto", *STRATEGIES))
    hf_impls = _check_choices("hf_impls", hf_impls, HF_IMPLS)
    repeats = check_int("repeats", repeats, 1)
    min_sample_s = _check_seconds("min_sample_s", min_sample_s)
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r} is not allowed: use one of {sorted(CLOCKS)}")
    if clock == "cpu" and device.type != "cpu":
        raise ValueError("clock='cpu' is not allowed on an accelerator: GPU time is not CPU time")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r} is not allowed: it must be a floating torch.dtype (or None)")
    malloc = "default"
    if device.type == "cpu" and keep_cpu_memory and keep_freed_cpu_memory():
        malloc = "keep freed blocks (glibc mallopt)"
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if modes is None:
        modes = MODES if device.type == "cpu" else tuple(m for m in MODES if m != "decode")
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:  # the benchmark still runs, without the transformers contenders
        hf_version, hf_impls = None, ()
    lib, hf_layers = build_layers(config, device, dtype, hf_impls)
    # CPU: the limit is timed (its GEMMs and its read run as plain ops on this machine). GPU: the
    # limit is flops / peak and bytes / peak bandwidth, both ceilings measured once here.
    peaks = measure_peaks(device, dtype) if device.type == "cuda" else None
    # forward: also the layer through torch.compile (on a CPU Inductor fuses the small-T gather path)
    compiled = torch.compile(lib, dynamic=False) if compile_layer else None
    # decode rows: more copies of every contender, called in turn (their weights come from memory)
    copies = [(lib, hf_layers)]
    if "decode" in modes and 1 in tokens:
        copies += [build_layers(config, device, dtype, hf_impls) for _ in range(DECODE_COPIES - 1)]
    rows: list[dict[str, Any]] = []
    started = time.time()
    for routing in routings:
        set_routing([layer for c, h in copies for layer in (c, *h.values())], routing)
        for t in tokens:
            gen = torch.Generator(device="cpu").manual_seed(seed + t)
            x = torch.randn(t, config.hidden_size, generator=gen).to(device=device, dtype=dtype)
            grad_out = torch.randn(t, config.hidden_size, generator=gen).to(device=device, dtype=dtype)
            with torch.no_grad():
                ref, routing_out = lib(x, return_routing=True)
                counts = torch.bincount(routing_out.topk_indices.flatten(), minlength=config.n_routed_experts)
                hf_err = {
                    impl: float((layer(x) - ref).abs().max()) if t else 0.0
                    for impl, layer in hf_layers.items()
                }
            touched = int((counts > 0).sum())
            xs = None  # decode rows (T=1): DECODE_TOKENS tokens in turn, x the first
            if t == 1:
                xs = torch.cat([x, torch.randn(DECODE_TOKENS - 1, config.hidden_size, generator=gen).to(x)])
            for mode in modes:
                if mode == "decode" and t != 1:
                    continue  # one token per call; with more most experts' weights come from memory anyway
                with torch.set_grad_enabled(mode == "fwd+bwd"):  # as the timed calls run
                    auto = choose_strategy(
                        x, routing_out.topk_indices, config.n_routed_experts, lib.experts.act_fn
                    )
                steps: dict[str, Callable[[], None]] = {}
                skipped: dict[str, str] = {}
                for s in strategies:
                    if s == "fused_cpu":  # a C kernel for float32 on a CPU (it may not build here)
                        why = unsupported(
                            x, lib.experts.gate_up_proj, lib.experts.down_proj, lib.experts.act_fn
                        )
                        if why is not None:
                            skipped["lib:fused_cpu"] = why
                            continue
                    if s == "dense" and t > DENSE_MAX_TOKENS:
                        continue
                    if (
                        s in ("gather_bmm", "sorted_gather")
                        and t * config.num_experts_per_tok > GATHER_MAX_PAIRS * config.n_routed_experts
                    ):
                        continue
                    if s in ("loop", "sorted") and mode == "fwd+bwd" and t > LOOPS_BWD_MAX_TOKENS:
                        continue
                    pick = (lambda c, h: c) if s == "auto" else (lambda c, h, s=s: _with_strategy(c, s))
                    steps[f"lib:{s}"] = _contender_step(pick, copies, mode, x, xs, grad_out)
                for impl in hf_layers:
                    steps[f"hf:{impl}"] = _contender_step(
                        lambda c, h, i=impl: h[i], copies, mode, x, xs, grad_out
                    )
                if compiled is not None and mode == "forward" and t > 0 and "lib:auto" in steps:
                    try:
                        steps["lib:auto+compile"] = _compiled_step(compiled, x)
                    except Exception as exc:  # e.g. no C++ compiler for Inductor on this machine
                        skipped["lib:auto+compile"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                if device.type == "cuda" and mode == "forward" and t > 0:
                    layers = {"lib:auto": lib, **{f"hf:{k}": v for k, v in hf_layers.items()}}
                    for name in GRAPHED:
                        if name in steps and name in layers:
                            try:
                                steps[f"{name}+graph"] = _graphed_step(layers[name], x)
                            except RuntimeError as exc:  # a host sync inside: not capturable
                                skipped[name] = str(exc).splitlines()[0][:200]
                limit_mode = "forward" if mode == "decode" else mode
                flops_step, bytes_step, flops, nbytes = limit_steps(
                    config, t, touched, limit_mode, device, dtype
                )
                if mode == "decode" and peaks is None:  # as many copies of the limit's operands, in turn
                    more = [limit_steps(config, t, touched, limit_mode, device, dtype) for _ in copies[1:]]
                    flops_step = _in_turn([flops_step, *(m[0] for m in more)])
                    bytes_step = _in_turn([bytes_step, *(m[1] for m in more)])
                if peaks is None:
                    steps["limit:flops"] = flops_step
                    steps["limit:bytes"] = bytes_step
                    # the same read of the layer's own weights (decode: each copy's, in turn)
                    reads = [
                        layer_read_step(config, touched, limit_mode, layer_weights(c), device, dtype)
                        for c, _ in (copies if mode == "decode" else copies[:1])
                    ]
                    if all(r is not None for r in reads):
                        steps["limit:bytes_layer"] = _in_turn(reads) if mode == "decode" else reads[0]
                if mode == "fwd+bwd":  # not part of the limit: what a dense .grad costs by itself
                    steps["floor:dense_grads"] = _dense_grads_step(lib)
                elif mode == "forward" and device.type == "cpu" and t > 0:  # (on a GPU: kernel launches)
                    steps["floor:expert_gemms"] = _expert_gemms_step(lib, counts)
                timings = time_interleaved(steps, device, repeats, min_sample_s, clock)
                if peaks is not None:
                    for name, sec in (
                        ("limit:flops", flops / peaks["gemm_flops_per_s"]),
                        ("limit:bytes", nbytes / peaks["bytes_per_s"]),
                    ):
                        timings[name] = {"min_s": sec, "median_s": sec, "calls_per_sample": 0}
                read_s = min(
                    timings[n]["min_s"] for n in ("limit:bytes", "limit:bytes_layer") if n in timings
                )
                limit = max(timings["limit:flops"]["min_s"], read_s)
                for v in timings.values():
                    v["ratio"] = v["min_s"] / limit
                row = {
                    "tokens": t,
                    "routing": routing,
                    "mode": mode,
                    "auto_strategy": auto,
                    "touched_experts": touched,
                    "max_load": int(counts.max()) if t else 0,
                    "mean_load": t * config.num_experts_per_tok / config.n_routed_experts,
                    "limit_s": limit,
                    "limit_flops": flops,
                    "limit_bytes": nbytes,
                    "limit_bound": "flops" if timings["limit:flops"]["min_s"] >= read_s else "bytes",
                    "hf_max_abs_diff": hf_err,
                    "skipped": skipped,  # contenders that could not run here, and why
                    "timings": timings,
                }
                rows.append(row)
                if verbose:
                    print(_row_line(row), flush=True)
    return {
        "meta": {
            "torch": torch.__version__,
            "transformers": hf_version,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor(),
            "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "config": config.to_dict(),
            "repeats": repeats,
            "min_sample_s": min_sample_s,
            "clock": clock,
            "malloc": malloc,
            "limit": "timed on this machine" if peaks is None else "roofline from measured peaks",
            "peaks": peaks,
            "statistic": "min over repeats of the mean per call within a sample",
            "skew": f"selection bias {SKEW_BIAS} * exp(-e / {SKEW_DECAY})",
            "seconds": round(time.time() - started, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "results": rows,
    }


def _with_strategy(lib: MoE, strategy: str) -> torch.nn.Module:
    """A view of ``lib`` whose experts use ``strategy`` (same weights, nothing copied)."""

    class _Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = lib

        def forward(self, x: Tensor) -> Tensor:
            m = self.inner
            r = m.gate(x)
            out = m.experts(x, r.topk_indices, r.topk_weights, strategy=strategy, check_ids=False)
            return out + m.shared_experts(x) if m.shared_experts is not None else out

    return _Layer()


# ---- reporting -----------------------------------------------------------------------------------
def _row_line(row: dict[str, Any]) -> str:
    tm = row["timings"]
    parts = [
        f"T={row['tokens']:>5} {row['routing']:<8} {row['mode']:<7} limit {row['limit_s'] * 1e3:8.3f} ms"
    ]
    for name in tm:
        if not name.startswith(("limit", "floor")):
            parts.append(f"{name}={tm[name]['ratio']:.2f}x")
    return "  ".join(parts)


def markdown_table(results: dict[str, Any], names: Sequence[str] | None = None) -> str:
    """One markdown table: rows (routing, mode, T), columns the contenders' ratio to the limit."""
    if not isinstance(results, dict) or not {"results", "meta"} <= results.keys():
        got = sorted(results) if isinstance(results, dict) else type(results).__name__
        raise ValueError(
            f"results is not allowed: it must be what run() returns, a dict with 'results' and 'meta' (got {got})"
        )
    rows = results["results"]
    if names is None:
        names = []
        for r in rows:
            names += [n for n in r["timings"] if not n.startswith("limit") and n not in names]
    head = ["routing", "mode", "T", "limit (ms)", "bound", "auto picks", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["routing"],
            r["mode"],
            str(r["tokens"]),
            f"{r['limit_s'] * 1e3:.3f}",
            r["limit_bound"],
            r["auto_strategy"],
        ]
        for n in names:
            tm = r["timings"].get(n)
            cells.append(f"{tm['ratio']:.2f}x" if tm else "–")
        lines.append("| " + " | ".join(cells) + " |")
    meta = results["meta"]
    note = (
        f"x = time / limit (min of {meta['repeats']} interleaved samples, {meta['clock']} clock). {meta['device']} "
        f"({meta['device_name']}), {meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['date']}."
    )
    peaks = meta.get("peaks")
    if peaks:
        note += (
            f" Limit: roofline from this GPU's measured peaks ({peaks['gemm_flops_per_s'] / 1e12:.0f} "
            f"TFLOP/s dense GEMM, {peaks['bytes_per_s'] / 1e12:.2f} TB/s copy); '+graph': the forward "
            "replayed from a CUDA graph (no per-op launch overhead)."
        )
    return "\n".join(lines) + "\n\n" + note + "\n"


def _arg_seconds(text: str) -> float:
    """An argparse ``type``: a finite number of seconds > 0."""
    try:
        return _check_seconds("seconds", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed: it must be a finite number of seconds > 0"
        ) from None


def _arg_device(text: str) -> torch.device:
    """An argparse ``type``: a device the benchmark can run on (see :func:`parse_device`)."""
    try:
        return parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m glm4moe_lib.bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help=f"T in {QUICK_TOKENS}, fewer repeats, no decode rows (seconds)"
    )
    p.add_argument("--tokens", type=int_at_least(0), nargs="+", help="token counts (default: all or quick)")
    p.add_argument("--routing", nargs="+", choices=ROUTINGS, default=None)
    p.add_argument("--modes", nargs="+", choices=MODES, default=None)
    p.add_argument(
        "--strategies",
        nargs="+",
        choices=("auto", *sorted(STRATEGIES)),
        default=None,
        help="library strategies to time",
    )
    p.add_argument(
        "--hf", nargs="*", choices=HF_IMPLS, default=None, help="transformers implementations (none: skip)"
    )
    p.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    p.add_argument("--device", type=_arg_device, default=None, help=f"one of {DEVICE_TYPES} (or cuda:N)")
    p.add_argument("--repeats", type=int_at_least(1), default=None)
    p.add_argument(
        "--threads", type=int_at_least(1), default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall or process CPU time")
    p.add_argument("--min-sample", type=_arg_seconds, default=None, help="seconds per timed sample (> 0)")
    p.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="CPU: keep freed big buffers for reuse (default) or glibc's default (unmap them)",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results_<device>.json)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    args = p.parse_args(argv)
    quick = args.quick
    if not args.no_save:  # before the run: a place the results cannot be written fails now, not after
        folder = (args.out or RESULTS_DIR / "results.json").parent
        for f in (folder, *folder.parents):
            if f.exists() and not f.is_dir():
                p.error(f"--out {str(args.out)!r} is not allowed: {str(f)!r} is a file, not a folder")
        if args.out is not None and args.out.is_dir():
            p.error(f"--out {str(args.out)!r} is not allowed: it is a folder; name the JSON file to write")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            p.error(f"--out {str(args.out)!r} is not allowed: cannot create {str(folder)!r} ({exc.strerror})")
        if not os.access(folder, os.W_OK):
            p.error(f"--out {str(args.out)!r} is not allowed: the folder {str(folder)!r} is not writable")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run(
        tokens=args.tokens or (QUICK_TOKENS if quick else FULL_TOKENS),
        routings=args.routing or (("balanced",) if quick else ROUTINGS),
        modes=args.modes or (("forward", "fwd+bwd") if quick else None),
        config=PRESETS[args.preset],
        device=args.device,
        strategies=args.strategies
        or (("auto", "loop", "sorted", "gather_bmm", "padded") if quick else LIB_STRATEGIES),
        hf_impls=HF_IMPLS if args.hf is None else args.hf,
        repeats=args.repeats if args.repeats is not None else (3 if quick else 5),
        clock=args.clock,
        min_sample_s=args.min_sample if args.min_sample is not None else (0.005 if quick else 0.01),
        keep_cpu_memory=args.malloc == "keep",
        compile_layer=not args.no_compile,
    )
    results["meta"]["quick"] = quick
    table = markdown_table(results)
    print()
    print(table)
    if not args.no_save:
        out = args.out or RESULTS_DIR / (
            f"results_{results['meta']['device'].split(':')[0]}{'_quick' if quick else ''}.json"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
