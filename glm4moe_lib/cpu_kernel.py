"""A fused CPU kernel for the routed experts: one pass over the touched experts' weights.

At a few tokens a CPU layer call should cost about one read of the K chosen experts' weights,
yet a chain of torch ops pays per op (tens of µs each at T=1) and the BLAS runs its 1-to-4-row
GEMMs far below memory speed. ``csrc/moe_cpu.c`` (a few hundred lines of plain C) does the routed
experts in one call: a counting sort of the (token, slot) pairs by expert, then for each expert
one pass over its rows of weights that serves up to eight of its tokens at once (four without
AVX-512), the SwiGLU in between, and the weighted sum of the K slots. Where the hardware prefetcher
falls behind (several tokens per pass), software prefetches keep the weights coming from memory
while it computes; so in the bench layer (H=512) it stays ahead of the BLAS at every T measured, for
inference (wider layers: see ``dispatch.FUSED_CPU_MAX_PAIRS_PER_EXPERT``).

It is built with the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) on first
use, for this CPU (``-march=native``), and cached under ``~/.cache/glm4moe_lib`` (or
``$GLM4MOE_CACHE_DIR``); the build takes well under a second. Where there is no compiler, or
``GLM4MOE_CPU_KERNEL=0``, it is simply not available: ``"auto"`` then uses the torch strategies,
and asking for ``strategy="fused_cpu"`` says why it cannot run. float32 and SiLU only.

With gradients the forward also keeps each pair's gate and up pre-activations, and the backward
(``moe_experts_bwd``) makes one more pass over each touched expert's weights: the input, routing
weight and weight gradients, each expert's gradient written once (zeros for untouched experts,
as PyTorch's dense ``.grad`` needs) with streaming stores, which skip reading each line first.

For inference ``MoE.forward`` goes further with :func:`layer_forward`: the router (logits,
sigmoid, selection bias, group-limited top-k, weights), the routed experts, the shared expert and
the combine in C, in one call on one thread. At one token the twenty-odd torch ops it replaces
cost more than reading the weights. A tie among a token's best choices goes back to torch, so
the experts chosen are always the ones torch's ``topk`` would choose. With gradients (and no
routing asked back, whose logits a loss may use) :func:`layer_train_call` does the same forward,
keeping what the backward needs, and the backward is one C call as well: the experts' pass above,
the shared expert's, and the router's (the routing weights' gradient through the normalisation
and the sigmoid to the chosen experts' logits, then to the router weight and the input).

Threads: where torch runs its ops on GNU OpenMP (Linux) the kernel is built with ``-fopenmp`` and
shares torch's ``libgomp.so.1``, so its parallel calls run on torch's own threads
(:func:`on_torch_threads`): the experts in ranges of about equal cost, each thread then taking
over what the others have left (a thread slowed by other work on its core), and the one-call
layer with each thread routing some tokens, running the shared expert on them and some experts.
The results are the same bits as on one thread. Elsewhere (or in a forked child, where libgomp's threads
would hang) a Python pool runs the experts the same way (each thread its range, then what is left), and
the one-call layer stays on one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

SOURCE = Path(__file__).resolve().parent / "csrc" / "moe_cpu.c"
#: set to "0" to turn the kernel off (``"auto"`` then never picks it)
ENV_SWITCH = "GLM4MOE_CPU_KERNEL"
#: where the built library is cached (default: $XDG_CACHE_HOME or ~/.cache, then glm4moe_lib)
ENV_CACHE = "GLM4MOE_CACHE_DIR"
#: tried in order: the first that builds is used (a compiler without -march=native gets plain -O3);
#: -ffp-contract=fast lets a multiply and an add become one fused multiply-add
FLAG_SETS = (["-O3", "-march=native", "-ffp-contract=fast"], ["-O3", "-ffp-contract=fast"])
#: RB_MAX in csrc/moe_cpu.c: the most tokens that share one pass over an expert's weights (RB is 8
#: with AVX-512, else 4); it sizes the kernel's scratch
_ROWS_PER_PASS = 8
#: with more than one torch thread, at least this many (token, slot) pairs per extra thread
MIN_PAIRS_PER_THREAD = 64
#: the same where the kernel runs on torch's OpenMP threads (:func:`_openmp_threads`), which start
#: in microseconds. Measured (2 threads, bench layer, the one-call layer against one thread): 0.69x
#: the time at T=1 (8 pairs), 0.58-0.64x at T=2-8; with the weights coming from memory (decoding,
#: six copies in turn) 0.74x at T=1 and 0.80-0.84x at T=2-8
MIN_PAIRS_PER_OPENMP_THREAD = 4

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why_not: str | None = None  # why the kernel is not available, once a load was tried
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0  # the process that made _pool
_openmp = False  # whether _lib's parallel calls run on torch's OpenMP threads (see load_kernel)
_openmp_pid = os.getpid()  # only in this process: libgomp's threads do not survive a fork


# os.environ's own dict of encoded names and values (CPython's os._Environ keeps one): reading it
# directly costs about 60 ns where os.environ.get costs about 750 (an unset name goes through a
# KeyError inside Mapping.get), and readable() asks on every call (about 1% of a one-token call).
# setenv, monkeypatch and os.environ[...] = ... all write through it; elsewhere os.environ.get.
_environ_data = getattr(os.environ, "_data", None)
try:
    _env_switch_key = os.environ.encodekey(ENV_SWITCH)  # type: ignore[attr-defined]
except AttributeError:
    _environ_data = None


def _switched_off() -> bool:
    if _environ_data is not None:
        raw = _environ_data.get(_env_switch_key)
        if raw is None:
            return False
        value = os.environ.decodevalue(raw)  # type: ignore[attr-defined]
    else:
        value = os.environ.get(ENV_SWITCH, "")
    return value.strip() == "0"


def _cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glm4moe_lib"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    text = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            text += "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return f"{sys.platform}-{platform.machine()}-{text}"


def _build(compiler: str, target: Path, extra: Sequence[str] = ()) -> str | None:
    """Compile SOURCE into ``target`` atomically (with ``extra`` flags after each flag set);
    returns None, or the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    complaint = ""
    for flags in FLAG_SETS:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
        os.close(fd)
        cmd = [compiler, *flags, *extra, "-std=c11", "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)  # a reader never sees a half-written library
                return None
            complaint = (done.stderr or done.stdout).strip()[-800:]
        except (OSError, subprocess.SubprocessError) as err:
            complaint = str(err)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return f"{compiler} could not build {SOURCE.name}: {complaint}"


def _gomp_paths() -> set[str]:
    """The GNU OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            fields = (line.split(None, 5) for line in f if "libgomp" in line)
            return {parts[5].strip() for parts in fields if len(parts) == 6}
    except OSError:
        return set()


def _openmp_build_applies() -> bool:
    """Whether to build the kernel with -fopenmp: on Linux, where torch runs its ops on GNU OpenMP
    (its libgomp.so.1 is mapped), so the kernel's libgomp.so.1 is that same library."""
    return (
        sys.platform.startswith("linux")
        and bool(getattr(torch._C, "has_openmp", False))
        and bool(_gomp_paths())
    )


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moe_sort.argtypes, lib.moe_sort.restype = [p, i64, i64, p, p], i64
    lib.moe_experts.argtypes, lib.moe_experts.restype = (
        [p, p, p, i64, i64, i64, p, p, i64, i64, p, p, p],
        None,
    )
    lib.moe_experts_bwd.argtypes = [p, p, p, i64, i64, i64, p, p, p, p, p, i64, i64, p, p, p, p, p]
    lib.moe_experts_bwd.restype = None
    lib.moe_combine.argtypes, lib.moe_combine.restype = [p, p, i64, i64, i64, p, p], None
    lib.moe_layer.argtypes = [p, i64, i64, p, p, i64, i64, i64, i64, ctypes.c_int, ctypes.c_float, p, p, i64]
    lib.moe_layer.argtypes += [p, p, p, i64, p, p, p, p, p, p, i64]
    lib.moe_layer.restype = i64
    lib.moe_layer_train.argtypes = lib.moe_layer.argtypes[:-3] + [p, p, p, p, p, p, i64]
    lib.moe_layer_train.restype = i64
    # x, T, H, router_w, E, K, norm, scale, gate_up, down, I, the shared expert's 3 weights and Is, then 16 pointers
    lib.moe_layer_bwd.argtypes = [p, i64, i64, p, i64, i64, ctypes.c_int, ctypes.c_float, p, p, i64, p, p, p, i64]  # fmt: skip
    lib.moe_layer_bwd.argtypes += [p] * 16 + [i64]
    lib.moe_layer_bwd.restype = None
    lib.mlp_forward.argtypes, lib.mlp_forward.restype = [p, i64, p, p, p, i64, i64, p, p], None
    lib.moe_openmp.argtypes, lib.moe_openmp.restype = [], i64
    lib.moe_expert_range.argtypes, lib.moe_expert_range.restype = [p, i64, i64, i64, i64, p], None
    # for tests: a thread that claims none of its own experts (the others take them over), and the count
    lib.moe_schedule_test.argtypes, lib.moe_schedule_test.restype = [i64], None
    lib.moe_taken_over.argtypes, lib.moe_taken_over.restype = [], i64
    # the experts on Python's threads: the list and queue, then each thread's share
    lib.moe_share_out.argtypes, lib.moe_share_out.restype = [p, i64, i64, i64, p, p], i64
    lib.moe_experts_claimed.argtypes = [p, p, p, p, p, i64, i64, i64, p, p, i64, i64, p, p, p]
    lib.moe_experts_claimed.restype = None
    lib.moe_experts_bwd_claimed.argtypes = [p] * 5 + [i64] * 3 + [p] * 5 + [i64] * 2 + [p] * 5
    lib.moe_experts_bwd_claimed.restype = None
    # moe_experts' arguments with e0, e1 replaced by E, then scratch_floats and hsave, threads
    lib.moe_experts_parallel.argtypes = [p, p, p, i64, i64, p, p, i64, i64, p, p, i64, p, i64]
    lib.moe_experts_parallel.restype = None
    # moe_experts_bwd's arguments with e0, e1 replaced by E, then scratch_floats, threads
    lib.moe_experts_bwd_parallel.argtypes = [p, p, p, i64, i64, p, p, p, p, p, i64, i64, p, p, p, p, p, i64, i64]  # fmt: skip
    lib.moe_experts_bwd_parallel.restype = None
    return lib


def _load(compiler: str, extra: Sequence[str]) -> tuple[ctypes.CDLL | None, str | None]:
    """The library built with ``extra`` flags (building it if it is not cached), or why not."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + repr((compiler, FLAG_SETS, tuple(extra), _cpu_id())).encode()
    ).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else ".so"
    target = _cache_dir() / f"moe_cpu-{key}{suffix}"
    failed = target.with_suffix(".failed")  # an optional build (extra flags) that failed: not tried again
    if extra and failed.exists():
        return None, failed.read_text()
    if not target.exists():
        try:
            why = _build(compiler, target, extra)
        except OSError as err:  # e.g. a read-only cache directory
            why = f"could not write the kernel to {target.parent}: {err}"
        if why is not None:
            if extra:
                try:
                    failed.write_text(why)
                except OSError:
                    pass
            return None, why
    try:
        return _declare(ctypes.CDLL(str(target))), None
    except OSError as err:
        return None, f"could not load {target}: {err}"


def load_kernel() -> ctypes.CDLL | None:
    """The built kernel (building it the first time), or None where it is not available.

    Where torch runs on GNU OpenMP (Linux) it is built with -fopenmp, so that its parallel calls
    run on torch's own threads (see :func:`_parallel`); if that build fails, or loads a second
    OpenMP runtime beside torch's, the kernel still works, with Python threads for its ranges."""
    global _lib, _why_not, _openmp
    if _switched_off():
        return None
    if _lib is not None or _why_not is not None:
        return _lib
    with _lock:
        if _lib is not None or _why_not is not None:
            return _lib
        compiler = _compiler()
        if compiler is None:
            _why_not = "no C compiler found (set CC, or install gcc or clang)"
            return None
        lib = None
        if _openmp_build_applies():
            runtimes = _gomp_paths()
            lib, _ = _load(compiler, ["-fopenmp"])
            _openmp = lib is not None and bool(lib.moe_openmp()) and _gomp_paths() == runtimes
        if lib is None:
            lib, _why_not = _load(compiler, [])
        _lib = lib
        return _lib


def on_torch_threads() -> bool:
    """Whether the kernel's parallel calls run on torch's own OpenMP threads in this process (see
    :func:`load_kernel`); else, with several threads, Python's pool runs its expert ranges and the
    whole-layer calls stay on one thread."""
    return load_kernel() is not None and _openmp and os.getpid() == _openmp_pid


def kernel_status() -> str:
    """One line: where the kernel is loaded from, or why it is not available."""
    if _switched_off():
        return f"off ({ENV_SWITCH}=0)"
    lib = load_kernel()
    return f"ready: {lib._name}" if lib is not None else f"not available: {_why_not}"


_PLAIN = (Tensor, torch.nn.Parameter)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def readable(*tensors: Tensor, contiguous: bool = True) -> bool:
    """Whether the kernel can read ``tensors`` and nothing is watching: each a plain (no subclass,
    no functorch wrapper) float32 CPU tensor, contiguous unless ``contiguous=False`` (the caller
    copies), no TorchDispatchMode and no CPU autocast on, the kernel built and switched on. One
    pass, cheap: it runs on every call (:func:`unsupported` says which condition failed)."""
    for t in tensors:
        if not (
            type(t) in _PLAIN
            and t.is_cpu
            and t.dtype is torch.float32
            and (t.is_contiguous() or not contiguous)
            and not _is_wrapped(t)
        ):
            return False
    if _get_current_dispatch_mode() is not None or torch.is_autocast_enabled("cpu") or _switched_off():
        return False
    return _lib is not None or load_kernel() is not None  # (built on first use: only for tensors it can take)


def _tensor_unsupported(name: str, t: Tensor) -> str | None:
    """Why the kernel cannot read tensor ``t`` (named ``name``) as it is, or None."""
    if type(t) not in _PLAIN or _is_wrapped(t):
        return f"{name} is a {type(t).__name__} under a transform or subclass: the fused kernel needs plain tensors"
    if not t.is_cpu:
        return f"{name} is on {t.device}: the fused kernel runs on the CPU only"
    if t.dtype is not torch.float32:
        return f"{name} has dtype {t.dtype}: the fused kernel is float32 only"
    return None


def unsupported(hidden_states: Tensor, gate_up_proj: Tensor, down_proj: Tensor, act_fn=F.silu) -> str | None:
    """Why the kernel cannot run these inputs (None if it can): CPU, float32, SiLU, a compiler,
    plain tensors, and no TorchDispatchMode watching (a FLOP counter or an op counter would not
    see inside the C call, so under one the torch strategies run). Cheap: it runs on every call."""
    tensors = (hidden_states, gate_up_proj, down_proj)
    if act_fn is F.silu and readable(*tensors, contiguous=False):
        return None  # the common case, checked in one pass; below, which condition failed
    if _get_current_dispatch_mode() is not None:
        return (
            f"{type(_get_current_dispatch_mode()).__name__} is active and could not see inside the C kernel"
        )
    for name, t in zip(("hidden_states", "gate_up_proj", "down_proj"), tensors):
        reason = _tensor_unsupported(name, t)
        if reason is not None:
            return reason
    if act_fn is not F.silu:
        return f"act_fn={getattr(act_fn, '__name__', act_fn)!r}: the fused kernel implements SiLU only"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on: the fused kernel computes in float32 only"
    return f"the fused CPU kernel is {kernel_status()}"


def check_kernel_tensors(*named: tuple[str, Tensor | None]) -> None:
    """Clear errors for tensors the C kernel cannot read as they are (it reads raw float32 CPU memory:
    any other dtype would be read wrongly, or past its end), and build the kernel if it is not yet.
    For the public entry points that call the C code directly; ``None`` entries are skipped."""
    tensors = []
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        reason = _tensor_unsupported(name, t)
        if reason is not None:
            raise ValueError(reason)
        tensors.append(t)
    reason = unsupported(*(tensors[:1] * 3)) if tensors else None  # the global conditions, and the build
    if reason is not None:
        raise ValueError(f"the fused CPU kernel cannot run here: {reason}")


def check_shapes(*named: tuple[str, Tensor | None, tuple[int, ...]], fit: Callable[[], str]) -> None:
    """Raise ValueError for the first ``(name, tensor, expected shape)`` whose shape differs.

    The C code reads every tensor by the sizes it is told, so weights that no longer fit together
    (say, one replaced through ``.data`` by a smaller one) would be read past their end: a crash or
    garbage instead of an error. ``fit()`` says what the expected shapes were derived from (called
    only for the message: this runs on every call).
    """
    for name, t, shape in named:
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: it must be {shape} to fit {fit()}")


def check_expert_shapes(hidden_states: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> None:
    """Clear errors for expert weights that do not fit each other or the tokens: gate_up_proj
    [E, 2I, H], down_proj [E, H, I], hidden_states [T, H]."""
    gu, dn = gate_up_proj.shape, down_proj.shape
    if len(gu) != 3 or len(dn) != 3 or gu[1] % 2 or dn != (gu[0], gu[2], gu[1] // 2):
        raise ValueError(
            f"gate_up_proj {tuple(gu)} and down_proj {tuple(dn)} do not fit together: they must be "
            "[E, 2I, H] and [E, H, I] with the same E, H and I"
        )
    if hidden_states.dim() != 2 or hidden_states.shape[1] != gu[2]:
        raise ValueError(
            f"hidden_states has shape {tuple(hidden_states.shape)}: it must be [tokens, H={gu[2]}] to fit "
            f"the experts' weights (gate_up_proj {tuple(gu)})"
        )


def check_routing_params(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """Clear errors for routing parameters the C router cannot take (it would read past its arrays):
    1 <= top_k <= topk_group * num_experts / n_group, n_group dividing num_experts, 1 <= topk_group <=
    n_group (the rules of :meth:`MoEConfig.validate`)."""
    for name, value in (("top_k", top_k), ("n_group", n_group), ("topk_group", topk_group)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")
    if num_experts % n_group or (n_group > 1 and num_experts // n_group < 2):
        raise ValueError(
            f"n_group={n_group} is not allowed with {num_experts} experts: it must divide them into groups "
            "of at least 2"
        )
    if topk_group > n_group:
        raise ValueError(
            f"topk_group={topk_group} is not allowed: it must be between 1 and n_group={n_group}"
        )
    if top_k > topk_group * (num_experts // n_group):
        raise ValueError(
            f"top_k={top_k} is not allowed: a token can choose from at most topk_group * experts / n_group = "
            f"{topk_group * (num_experts // n_group)} experts"
        )


def check_mlp_shapes(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> None:
    """Clear errors for a SwiGLU MLP whose weights do not fit each other or the tokens: gate and up
    [I, H], down [H, I] (``nn.Linear`` weights), x [..., H]."""
    if gate.dim() != 2:
        raise ValueError(f"gate has shape {tuple(gate.shape)}: it must be [I, H]")
    inter, hidden = gate.shape

    def fit() -> str:
        return f"gate {tuple(gate.shape)} (I={inter}, H={hidden})"

    check_shapes(("up", up, (inter, hidden)), ("down", down, (hidden, inter)), fit=fit)
    if x.dim() == 0 or x.shape[-1] != hidden:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must be {hidden} to fit {fit()}")


def _chunks(offsets: Tensor, parts: int, backward: bool = False) -> list[tuple[int, int]]:
    """Split the experts into ``parts`` ranges of about equal cost, as the kernel's OpenMP calls
    split them (``expert_range`` in moe_cpu.c: an expert's pairs plus the reading of its weights;
    in the backward an untouched expert's zero gradient too); the empty ones left out."""
    offsets = offsets.to(torch.int64).contiguous()  # [E+1]: where each expert's pairs start, then all pairs
    num_experts = offsets.numel() - 1
    bounds = torch.empty(2, dtype=torch.int64)
    ranges = []
    for part in range(parts):
        _lib.moe_expert_range(offsets.data_ptr(), num_experts, int(backward), part, parts, bounds.data_ptr())
        e0, e1 = bounds.tolist()
        if e1 > e0:
            ranges.append((e0, e1))
    return ranges


def _threads(pairs: int, openmp: bool = False) -> int:
    """How many threads :func:`_parallel` (or, with ``openmp``, the kernel's OpenMP calls) uses for
    ``pairs`` (token, expert) pairs."""
    least = MIN_PAIRS_PER_OPENMP_THREAD if openmp else MIN_PAIRS_PER_THREAD
    return min(torch.get_num_threads(), max(1, pairs // least))


def _openmp_threads(pairs: int) -> int:
    """Threads (more than one) for the kernel's own parallel calls on torch's OpenMP threads, or 0:
    one thread's worth of pairs, or no OpenMP calls here (not built with them, or a forked child)."""
    if not (_openmp and os.getpid() == _openmp_pid):
        return 0
    threads = _threads(pairs, openmp=True)
    return threads if threads > 1 else 0


def _parallel(one, claimed, offsets: Tensor, pairs: int, num_experts: int, backward: bool = False) -> None:
    """Run all experts: ``one(0, E)`` in one call (no queue to fill: 4 µs of a 100 µs call at T=1),
    or on torch's thread count of Python threads (ctypes releases the GIL, so the C code runs in
    parallel), each ``claimed(lst, queue, parts, part)``:
    thread ``part`` runs its range of about equal cost (:func:`_chunks`), then takes over what the
    others have left (``moe_share_out`` fills the expert list and the queue; the same queue as the
    kernel's OpenMP calls).

    Where the kernel shares torch's OpenMP runtime the callers use its parallel calls instead
    (:func:`_openmp_threads`): Python threads then compete with torch's OpenMP workers, which keep
    spinning for a while after each torch op (on two cores: 10.5 against 7.1 ms at T=256)."""
    global _pool, _pool_pid
    threads = _threads(pairs)
    if threads > 1:
        with _lock:
            if _pool is None or _pool_pid != os.getpid():  # a forked child has none of the threads
                _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="glm4moe")
                _pool_pid = os.getpid()
            pool = _pool
        lst = torch.empty(num_experts, dtype=torch.int64)  # the experts with work, in order
        queue = torch.empty(1 + 2 * threads, dtype=torch.int64)  # a lock, then each thread's [lo, hi) of lst
        _lib.moe_share_out(
            offsets.data_ptr(), num_experts, int(backward), threads, lst.data_ptr(), queue.data_ptr()
        )
        list(pool.map(lambda part: claimed(lst, queue, threads, part), range(threads)))
    else:
        one(0, num_experts)


def _run(x: Tensor, ids: Tensor, w: Tensor, gate_up: Tensor, down: Tensor, save: bool = False):
    """The kernel on contiguous float32 x [T, H], int64 ids [T, K], float32 w [T, K] -> [T, H].

    With ``save`` also returns what the backward needs: (order, offsets, hsave [T*K, 2I]).
    """
    lib = _lib  # loaded: the caller checked unsupported()
    tokens, hidden = x.shape
    top_k, num_experts, inter = ids.shape[1], gate_up.shape[0], down.shape[2]
    pairs = tokens * top_k
    offsets = torch.empty(num_experts + 1, dtype=torch.int64)
    order = torch.empty(pairs, dtype=torch.int64)
    bad = lib.moe_sort(ids.data_ptr(), pairs, num_experts, offsets.data_ptr(), order.data_ptr())
    if bad:
        p = -1 - bad
        raise ValueError(
            f"top_k_index holds expert id {int(ids.view(-1)[p])} (token {p // top_k}): ids must lie in "
            f"[0, {num_experts})"
        )
    y = torch.empty(pairs, hidden, dtype=torch.float32)  # [T*K, H] unweighted, (token, slot) order
    hsave = torch.empty(pairs, 2 * inter, dtype=torch.float32) if save else None  # [T*K, 2I]
    out = torch.empty(tokens, hidden, dtype=torch.float32)

    def experts(e0: int, e1: int) -> None:
        scratch = torch.empty(_ROWS_PER_PASS * 3 * inter, dtype=torch.float32)
        lib.moe_experts(
            x.data_ptr(), order.data_ptr(), offsets.data_ptr(), e0, e1, top_k,
            gate_up.data_ptr(), down.data_ptr(), hidden, inter, y.data_ptr(), scratch.data_ptr(),
            hsave.data_ptr() if save else None,
        )  # fmt: skip

    def claimed(lst: Tensor, queue: Tensor, parts: int, part: int) -> None:
        scratch = torch.empty(_ROWS_PER_PASS * 3 * inter, dtype=torch.float32)
        lib.moe_experts_claimed(
            x.data_ptr(), order.data_ptr(), offsets.data_ptr(), lst.data_ptr(), queue.data_ptr(), parts, part,
            top_k, gate_up.data_ptr(), down.data_ptr(), hidden, inter, y.data_ptr(), scratch.data_ptr(),
            hsave.data_ptr() if save else None,
        )  # fmt: skip

    threads = _openmp_threads(pairs)
    if threads:
        per_thread = _ROWS_PER_PASS * 3 * inter
        scratch = torch.empty(threads * per_thread, dtype=torch.float32)
        lib.moe_experts_parallel(
            x.data_ptr(), order.data_ptr(), offsets.data_ptr(), num_experts, top_k,
            gate_up.data_ptr(), down.data_ptr(), hidden, inter, y.data_ptr(), scratch.data_ptr(), per_thread,
            hsave.data_ptr() if save else None, threads,
        )  # fmt: skip
    else:
        _parallel(experts, claimed, offsets, pairs, num_experts)
    lib.moe_combine(y.data_ptr(), w.data_ptr(), tokens, top_k, hidden, None, out.data_ptr())
    return (out, (order, offsets, hsave)) if save else out


def _run_backward(grad_out, x, ids, w, gate_up, down, order, offsets, hsave):
    """Gradients of :func:`_run`'s output for x, w, gate_up and down (every expert's, zeros where
    an expert got no token), in one more pass over each touched expert's weights."""
    tokens, hidden = x.shape
    top_k, num_experts, inter = ids.shape[1], gate_up.shape[0], down.shape[2]
    pairs = tokens * top_k
    grad_out = grad_out.to(torch.float32).contiguous()
    dx_slots = torch.empty(pairs, hidden, dtype=torch.float32)  # [T*K, H]
    dw = torch.empty(tokens, top_k, dtype=torch.float32)
    d_gate_up, d_down = torch.empty_like(gate_up), torch.empty_like(down)  # written whole by the kernel

    def experts(e0: int, e1: int) -> None:
        scratch = torch.empty(_ROWS_PER_PASS * 4 * inter, dtype=torch.float32)
        _lib.moe_experts_bwd(
            x.data_ptr(), order.data_ptr(), offsets.data_ptr(), e0, e1, top_k, w.data_ptr(),
            grad_out.data_ptr(), gate_up.data_ptr(), down.data_ptr(), hsave.data_ptr(), hidden, inter,
            dx_slots.data_ptr(), dw.data_ptr(), d_gate_up.data_ptr(), d_down.data_ptr(), scratch.data_ptr(),
        )  # fmt: skip

    def claimed(lst: Tensor, queue: Tensor, parts: int, part: int) -> None:
        scratch = torch.empty(_ROWS_PER_PASS * 4 * inter, dtype=torch.float32)
        _lib.moe_experts_bwd_claimed(
            x.data_ptr(), order.data_ptr(), offsets.data_ptr(), lst.data_ptr(), queue.data_ptr(), parts, part,
            top_k, w.data_ptr(), grad_out.data_ptr(), gate_up.data_ptr(), down.data_ptr(), hsave.data_ptr(),
            hidden, inter, dx_slots.data_ptr(), dw.data_ptr(), d_gate_up.data_ptr(), d_down.data_ptr(),
            scratch.data_ptr(),
        )  # fmt: skip

    threads = _openmp_threads(pairs)
    if threads:
        per_thread = _ROWS_PER_PASS * 4 * inter
        scratch = torch.empty(threads * per_thread, dtype=torch.float32)
        _lib.moe_experts_bwd_parallel(
            x.data_ptr(), order.data_ptr(), offsets.data_ptr(), num_experts, top_k, w.data_ptr(),
            grad_out.data_ptr(), gate_up.data_ptr(), down.data_ptr(), hsave.data_ptr(), hidden, inter,
            dx_slots.data_ptr(), dw.data_ptr(), d_gate_up.data_ptr(), d_down.data_ptr(), scratch.data_ptr(),
            per_thread, threads,
        )  # fmt: skip
    else:
        _parallel(experts, claimed, offsets, pairs, num_experts, backward=True)
    return dx_slots.view(tokens, top_k, hidden).sum(dim=1), dw, d_gate_up, d_down


#: a SwiGLU MLP (the shared expert) runs through the kernel up to this many tokens (inference):
#: measured at H=512, I=128, 1 thread: 21 µs vs torch's 39 µs at T=1, even at T=8
MLP_MAX_TOKENS = 4


def mlp_applies(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, act_fn) -> bool:
    """Whether :func:`swiglu_mlp` should run this MLP call: a few tokens, float32 CPU inference."""
    return (
        x.dim() >= 1
        and x.numel() <= MLP_MAX_TOKENS * x.shape[-1]
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, up, down)))
        and not torch.compiler.is_compiling()
        and unsupported(x, gate, down, act_fn) is None
        and up.dtype == torch.float32
    )


def swiglu_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """down @ (silu(gate @ x) * (up @ x)) for x [..., H] through the kernel (no autograd).

    gate, up [I, H] and down [H, I] as ``nn.Linear`` weights; float32 on the CPU (checked: a
    ValueError names what the kernel cannot take).
    """
    check_kernel_tensors(("x", x), ("gate", gate), ("up", up), ("down", down))
    check_mlp_shapes(x, gate, up, down)
    return mlp_call(x, gate, up, down)


def mlp_call(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """:func:`swiglu_mlp` without its checks, for a caller that made them (``MLP.forward``, through
    :func:`mlp_applies` and the shapes)."""
    shape = x.shape
    inter = gate.shape[0]
    rows = x.reshape(-1, shape[-1]).contiguous()  # [T, H]
    gate, up, down = gate.contiguous(), up.contiguous(), down.contiguous()
    y = torch.empty(rows.shape[0], down.shape[0], dtype=torch.float32)  # [T, H]
    scratch = torch.empty(_ROWS_PER_PASS * 3 * inter, dtype=torch.float32)
    _lib.mlp_forward(
        rows.data_ptr(), rows.shape[0], gate.data_ptr(), up.data_ptr(), down.data_ptr(),
        rows.shape[1], inter, y.data_ptr(), scratch.data_ptr(),
    )  # fmt: skip
    return y.reshape(*shape[:-1], down.shape[0])


#: ``MoE.forward`` runs the whole layer in one C call up to this many tokens (see
#: :func:`layer_threads`). Measured at the bench size, 1 thread, in the layer's real setting (each call
#: streams tens of MB of expert weights, which evicts the router's and the shared expert's weights and
#: torch's code from the caches): one C call 7-16% faster than the modules at T=12-32, about 7% at
#: T=40-64 (1-13% over three runs, once passes of 5+ tokens read two rows at once), 2-4% at T=96,
#: level at T=128-256; for the small presets, whose weights stay in cache, 1.4-3.5x faster at T=48-64.
#: Hot and alone, the C shared expert is 1.2-1.4x slower than the BLAS at T=64 for H=512-5120: small
#: next to the routed experts, which the kernel runs in either case.
LAYER_MAX_TOKENS = 64
#: the same on several of torch's OpenMP threads, where the modules' experts take the kernel anyway.
#: Measured (2 threads, bench layer, against the modules with the experts' kernel on the same
#: threads): 0.80x the time at T=16, 0.88x at T=32, 0.93x at T=64, 0.87-0.91x at T=96-256, 0.97x
#: at T=512, level at T=2048 and 1.06x at T=4096 (the BLAS's router and shared expert pull ahead)
LAYER_MAX_TOKENS_THREADED = 256


def _call_threads(tokens: int, top_k: int, inference: bool, experts_on_kernel) -> int:
    """layer_threads (``inference``) and layer_train_threads, with their token limits."""
    most, most_threaded = (
        (LAYER_MAX_TOKENS, LAYER_MAX_TOKENS_THREADED)
        if inference
        else (TRAIN_MAX_TOKENS, TRAIN_MAX_TOKENS_THREADED)
    )
    if tokens <= most and torch.get_num_threads() == 1:  # (the common case first: one token)
        return 1
    pairs = tokens * top_k
    if tokens > most:
        threads = _openmp_threads(pairs) if tokens <= most_threaded else 0
        return (
            threads
            if threads and experts_on_kernel is not None and experts_on_kernel(pairs, inference)
            else 0
        )
    return _openmp_threads(pairs) or (1 if _threads(pairs) == 1 else 0)


def layer_threads(
    tokens: int, top_k: int, experts_on_kernel: Callable[[int, bool], bool] | None = None
) -> int:
    """On how many threads :func:`layer_call` should run a call on ``tokens`` tokens (inference),
    or 0 where the modules should: more than ``LAYER_MAX_TOKENS`` tokens (on torch's OpenMP threads
    ``LAYER_MAX_TOKENS_THREADED``, if ``experts_on_kernel(pairs, inference)`` says the modules'
    experts would run the kernel too), or pairs enough for several threads where the kernel cannot
    run them on torch's own (:func:`_openmp_threads`)."""
    return _call_threads(tokens, top_k, True, experts_on_kernel)


def layer_train_threads(
    tokens: int, top_k: int, experts_on_kernel: Callable[[int, bool], bool] | None = None
) -> int:
    """:func:`layer_threads` for :func:`layer_train_call` (forward and backward), with
    ``TRAIN_MAX_TOKENS`` and ``TRAIN_MAX_TOKENS_THREADED``; ``experts_on_kernel`` is then asked for
    training (the experts' kernel has its own thresholds with gradients)."""
    return _call_threads(tokens, top_k, False, experts_on_kernel)


def layer_forward(
    x: Tensor,
    router_weight: Tensor,
    bias: Tensor | None,
    gate_up: Tensor,
    down: Tensor,
    shared: tuple[Tensor, Tensor, Tensor] | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """A whole GLM-4.5 MoE layer (sigmoid router, routed experts, shared expert) for inference.

    x [T, H] float32 on the CPU; router_weight [E, H]; bias [E] or None (selection only);
    gate_up [E, 2I, H]; down [E, H, I]; shared: None or the shared expert's (gate [I_s, H],
    up [I_s, H], down [H, I_s]). Returns ``(out [T, H], logits [T, E], scores [T, E],
    topk_weights [T, K], topk_indices [T, K])``, the same as ``MoE.forward`` and its router, from
    one C call on one thread instead of some twenty torch ops (at one token those ops cost more
    than reading the weights). Returns None when two of a token's K+1 best choices tie (or one is
    not finite): torch's topk decides ties its own way, so then the caller routes with torch.
    Checks what the C code would read wrongly (dtypes, devices, shapes, routing parameters: a
    ValueError names it); :func:`layer_threads` says whether it pays. One thread.
    """
    shared_named = () if shared is None else tuple(zip(("shared gate", "shared up", "shared down"), shared))
    check_kernel_tensors(
        ("x", x), ("router_weight", router_weight), ("gate_up", gate_up), ("down", down), *shared_named
    )
    if bias is not None and not (isinstance(bias, Tensor) and bias.is_cpu and bias.is_floating_point()):
        raise ValueError(f"bias must be a floating-point CPU tensor or None, got {bias!r:.80}")
    check_expert_shapes(x, gate_up, down)
    num_experts, hidden, _ = down.shape
    check_routing_params(num_experts, top_k, n_group, topk_group)
    check_shapes(
        ("the router weight (gate.weight)", router_weight, (num_experts, hidden)),
        ("the router bias (e_score_correction_bias)", bias, (num_experts,)),
        fit=lambda: f"the experts (E={num_experts}, H={hidden})",
    )
    if shared is not None:
        check_mlp_shapes(x, *shared)
    return layer_call(
        x.contiguous(),
        router_weight.contiguous(),
        None if bias is None else bias.to(torch.float32).contiguous(),
        gate_up.contiguous(),
        down.contiguous(),
        None if shared is None else tuple(t.contiguous() for t in shared),
        top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
    )  # fmt: skip


def layer_call(
    x: Tensor,
    router_weight: Tensor,
    bias: Tensor | None,
    gate_up: Tensor,
    down: Tensor,
    shared: tuple[Tensor, Tensor, Tensor] | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    routing: bool = True,
    threads: int = 1,
):
    """:func:`layer_forward` without its checks: the C call and its buffers, nothing else.

    Every tensor must already be contiguous float32 on the CPU with the shapes layer_forward
    names (x may be [..., H]: its tokens are its rows): the C code reads them by those sizes, so
    anything else reads the wrong memory. ``MoE.forward`` calls it after one cheap check of all
    of that (:func:`readable` and the shapes), since at one token every microsecond of Python is
    a percent of the call. With ``routing=False`` the router's outputs stay in the scratch and only
    ``out`` (x's shape) is returned; else ``(out, logits, scores, topk_weights, topk_indices)``.
    None for a tie (see layer_forward). ``threads`` > 1 only where :func:`layer_threads` says so
    (torch's OpenMP threads): each computes some tokens' routing and shared expert and some
    experts, the same bits as one thread.
    """
    num_experts, hidden, inter = down.shape
    tokens = x.numel() // hidden
    pairs = tokens * top_k
    inter_shared = 0 if shared is None else shared[0].shape[0]
    out = torch.empty_like(x)  # [..., H] (x is contiguous: so is out)
    # the C scratch: offsets, order (int64), the [T*K, H] slots, the shared output, the rows' scratch
    scratch = 2 * (num_experts + 1) + 2 * pairs + pairs * hidden + tokens * hidden
    scratch += threads * _ROWS_PER_PASS * 3 * max(inter, inter_shared)
    if routing:
        logits = torch.empty(tokens, num_experts, dtype=torch.float32)  # [T, E]
        scores = torch.empty(tokens, num_experts, dtype=torch.float32)  # [T, E]
        ids = torch.empty(tokens, top_k, dtype=torch.int64)  # [T, K]
        w = torch.empty(tokens, top_k, dtype=torch.float32)  # [T, K]
        work = torch.empty(scratch, dtype=torch.float32)
        at = (logits.data_ptr(), scores.data_ptr(), ids.data_ptr(), w.data_ptr(), work.data_ptr())
    else:  # ids [T, K] int64, logits and scores [T, E], w [T, K], then the scratch (8-byte aligned)
        routed = 2 * pairs + 2 * tokens * num_experts + pairs + pairs % 2
        work = torch.empty(routed + scratch, dtype=torch.float32)
        ids_at = work.data_ptr()
        logits_at = ids_at + 8 * pairs
        scores_at = logits_at + 4 * tokens * num_experts
        at = (logits_at, scores_at, ids_at, scores_at + 4 * tokens * num_experts, ids_at + 4 * routed)
    tie = _lib.moe_layer(
        x.data_ptr(), tokens, hidden, router_weight.data_ptr(), None if bias is None else bias.data_ptr(),
        num_experts, top_k, n_group, topk_group, int(norm_topk_prob), routed_scaling_factor,
        gate_up.data_ptr(), down.data_ptr(), inter,
        *((None, None, None) if shared is None else (shared[0].data_ptr(), shared[1].data_ptr(), shared[2].data_ptr())),
        inter_shared, *at[:4], out.data_ptr(), at[4], threads,
    )  # fmt: skip
    if tie:
        return None
    return (out, logits, scores, w, ids) if routing else out


#: ``MoE.forward`` with gradients runs the whole layer through :class:`_FusedLayer` (forward and
#: backward each one C call) up to this many tokens (:func:`layer_train_threads`). Measured
#: at the bench size, 1 thread, forward + backward against the modules (torch router and shared
#: expert around the experts' own kernel, under autograd): 0.66x the time at T=1, 0.82x at T=4,
#: 0.91x at T=16-32, 0.94x at T=64 (skewed routing: 0.87x at T=16, 0.92x at T=64); 0.97-0.99x at
#: T=96-256, where the BLAS runs the router and the shared expert faster and the gain is noise.
TRAIN_MAX_TOKENS = 64
#: the same on several of torch's OpenMP threads, where the modules' experts train through the
#: kernel anyway. Measured (2 threads, bench layer, fwd+bwd against the modules with the experts'
#: kernel on the same threads): 0.86x the time at T=16, 0.91x at T=64, 0.85-0.94x at T=96-256
#: (skewed 0.96x at T=256)
TRAIN_MAX_TOKENS_THREADED = 256


def layer_train_call(
    x: Tensor,
    router_weight: Tensor,
    bias: Tensor | None,
    gate_up: Tensor,
    down: Tensor,
    shared: tuple[Tensor, Tensor, Tensor] | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    threads: int = 1,
) -> Tensor | None:
    """:func:`layer_call` with autograd: the layer's output [..., H], whose backward is one more C
    call (the gradients of x, the router weight, the experts and the shared expert). None for a
    tie, as layer_call. The same preconditions as layer_call (the caller checked them all);
    ``threads`` as there (:func:`layer_train_threads`), for the forward and the backward."""
    num_experts, hidden, inter = down.shape
    tokens = x.numel() // hidden
    pairs = tokens * top_k
    inter_shared = 0 if shared is None else shared[0].shape[0]
    out = torch.empty_like(x)  # [..., H]
    scores = torch.empty(tokens, num_experts, dtype=torch.float32)  # [T, E]
    ids = torch.empty(tokens, top_k, dtype=torch.int64)  # [T, K]
    w = torch.empty(tokens, top_k, dtype=torch.float32)  # [T, K]
    offsets = torch.empty(num_experts + 1, dtype=torch.int64)
    order = torch.empty(pairs, dtype=torch.int64)
    hsave = torch.empty(pairs, 2 * inter, dtype=torch.float32)  # [T*K, 2I]
    sh_hsave = torch.empty(tokens, 2 * inter_shared, dtype=torch.float32)  # [T, 2I_s]
    # the C scratch: logits [T, E], the [T*K, H] slots, the shared output [T, H], the rows' scratch
    scratch = (
        tokens * num_experts
        + pairs * hidden
        + tokens * hidden
        + threads * _ROWS_PER_PASS * 3 * max(inter, inter_shared)
    )
    work = torch.empty(scratch, dtype=torch.float32)
    tie = _lib.moe_layer_train(
        x.data_ptr(), tokens, hidden, router_weight.data_ptr(), None if bias is None else bias.data_ptr(),
        num_experts, top_k, n_group, topk_group, int(norm_topk_prob), routed_scaling_factor,
        gate_up.data_ptr(), down.data_ptr(), inter,
        *((None, None, None) if shared is None else (shared[0].data_ptr(), shared[1].data_ptr(), shared[2].data_ptr())),
        inter_shared, work.data_ptr(), scores.data_ptr(), ids.data_ptr(), w.data_ptr(), offsets.data_ptr(), order.data_ptr(),
        hsave.data_ptr(), sh_hsave.data_ptr(), out.data_ptr(), work[tokens * num_experts :].data_ptr(), threads,
    )  # fmt: skip
    if tie:
        return None
    saved = (scores, ids, w, offsets, order, hsave, sh_hsave)
    config = (top_k, norm_topk_prob, routed_scaling_factor, threads)
    return _FusedLayer.apply(
        x, router_weight, gate_up, down, *(shared or (None, None, None)), out, saved, config
    )


class _FusedLayer(torch.autograd.Function):
    """The whole layer for training: ``layer_train_call`` ran the forward in C (its output comes in
    as ``out``, with what the backward needs); the backward is one C call (``moe_layer_bwd``)."""

    @staticmethod
    def forward(ctx, x, router_weight, gate_up, down, sh_gate, sh_up, sh_down, out, saved, config):
        ctx.save_for_backward(x, router_weight, gate_up, down, sh_gate, sh_up, sh_down, *saved)
        ctx.config = config
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, router_weight, gate_up, down, *rest = ctx.saved_tensors
        shared, (scores, ids, w, offsets, order, hsave, sh_hsave) = rest[:3], rest[3:]
        top_k, norm, scale, threads = ctx.config
        num_experts, hidden, inter = down.shape
        tokens, pairs = x.numel() // hidden, x.numel() // hidden * top_k
        inter_shared = 0 if shared[0] is None else shared[0].shape[0]
        grad_out = grad_out.to(torch.float32).contiguous()
        dx, d_router = torch.empty_like(x), torch.empty_like(router_weight)
        d_gate_up, d_down = torch.empty_like(gate_up), torch.empty_like(down)  # written whole by the kernel
        d_shared = [None if t is None else torch.empty_like(t) for t in shared]
        # the C scratch: each pair's d x [T*K, H] and d w [T*K], the shared expert's d x [T, H], the rows'
        scratch = (
            pairs * hidden + pairs + tokens * hidden + threads * _ROWS_PER_PASS * 4 * max(inter, inter_shared)
        )
        work = torch.empty(scratch, dtype=torch.float32)
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        _lib.moe_layer_bwd(
            x.data_ptr(), tokens, hidden, router_weight.data_ptr(), num_experts, top_k, int(norm), scale,
            gate_up.data_ptr(), down.data_ptr(), inter, *map(ptr, shared), inter_shared,
            scores.data_ptr(), ids.data_ptr(), w.data_ptr(), offsets.data_ptr(), order.data_ptr(),
            hsave.data_ptr(), sh_hsave.data_ptr(), grad_out.data_ptr(), dx.data_ptr(), d_router.data_ptr(),
            d_gate_up.data_ptr(), d_down.data_ptr(), *map(ptr, d_shared), work.data_ptr(), threads,
        )  # fmt: skip
        needs = ctx.needs_input_grad
        grads = (dx, d_router, d_gate_up, d_down, *d_shared)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)


class _FusedExperts(torch.autograd.Function):
    """The kernel forward (keeping each pair's gate and up pre-activations) and its C backward."""

    @staticmethod
    def forward(ctx, x: Tensor, ids: Tensor, w: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        out, (order, offsets, hsave) = _run(x, ids, w, gate_up, down, save=True)
        ctx.save_for_backward(x, ids, w, gate_up, down, order, offsets, hsave)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        dx, dw, d_gate_up, d_down = _run_backward(grad_out, *ctx.saved_tensors)
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            None,
            dw if needs[2] else None,
            d_gate_up if needs[3] else None,
            d_down if needs[4] else None,
        )


def fused_cpu_dispatch(
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn=F.silu,
) -> Tensor:
    """The routed experts through the fused CPU kernel: [T, H] -> [T, H] (float32, SiLU).

    Same result as ``sorted_dispatch`` up to float32 rounding. Raises ValueError naming what it
    cannot take (a GPU tensor, bf16, another activation, no compiler).
    """
    reason = unsupported(hidden_states, gate_up_proj, down_proj, act_fn)
    if reason is not None:
        raise ValueError(f"strategy='fused_cpu' cannot run here: {reason}")
    check_expert_shapes(hidden_states, gate_up_proj, down_proj)
    tokens = hidden_states.shape[0]
    if not (isinstance(top_k_index, Tensor) and top_k_index.dtype in (torch.int64, torch.int32)):
        raise ValueError(
            f"top_k_index has dtype {getattr(top_k_index, 'dtype', type(top_k_index).__name__)}: an integer "
            "(int64) tensor of expert ids is required"
        )
    if top_k_index.dim() != 2 or top_k_index.shape[0] != tokens or top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} must "
            f"both be [tokens={tokens}, top_k]"
        )
    args = (
        hidden_states.contiguous(),
        top_k_index.to(torch.int64).contiguous(),
        top_k_weights.to(torch.float32).contiguous(),
        gate_up_proj.contiguous(),
        down_proj.contiguous(),
    )
    if hidden_states.shape[0] == 0:
        return torch.zeros_like(hidden_states)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        return _FusedExperts.apply(*args)
    return _run(*args)
