"""The one place the course chooses a device."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_ALLOWED = ("auto", "cpu", "cuda", "mps")


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the device every lesson uses: CUDA if present, else Apple MPS, else CPU.

    ``prefer`` (or the ``GLM4MOE_DEVICE`` environment variable) forces one of
    "auto", "cpu", "cuda" (or "cuda:N") or "mps", or a ``torch.device``; asking for a device that is
    not available is an error rather than a silent fallback.
    """
    if isinstance(prefer, torch.device):
        prefer = str(prefer)
    if prefer is not None and (not isinstance(prefer, str) or not prefer.strip()):
        raise ValueError(
            f"device={prefer!r} is not allowed: use one of {_ALLOWED}, 'cuda:N' or a torch.device"
        )
    from_env = prefer is None and bool(os.environ.get("GLM4MOE_DEVICE", "").strip())
    choice = (prefer or os.environ.get("GLM4MOE_DEVICE") or "auto").strip().lower()
    name = "GLM4MOE_DEVICE" if from_env else "device"  # where the value came from, for the errors
    if choice in ("cpu:0", "mps:0"):  # (torch.device("cpu", 0)): the one CPU, the one MPS device
        choice = choice[:-2]
    if choice.startswith("cuda:"):
        index = choice[5:]
        if not index.isdigit():
            raise ValueError(f"{name}={choice!r} is not allowed: 'cuda:N' needs a GPU number N")
        if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"{name}={choice!r} was asked for, but torch finds {torch.cuda.device_count()} CUDA GPU(s) here"
            )
        return torch.device(choice)
    if choice not in _ALLOWED:
        raise ValueError(f"{name}={choice!r} is not allowed: use one of {_ALLOWED} or 'cuda:N'")
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}='cuda' was asked for, but torch finds no CUDA GPU here")
    if choice == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError(f"{name}='mps' was asked for, but torch finds no Apple MPS device here")
    return torch.device(choice)


def available_devices() -> list[torch.device]:
    """Every device this machine can run the course on (CPU first); tests parametrize over it."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(torch.device("mps"))
    return devices


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_kept_cpu_memory: int | None = None


def keep_freed_cpu_memory(max_block_bytes: int = 1 << 30) -> bool:
    """Let the C allocator reuse freed big CPU buffers instead of giving them back to the OS.

    PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above 32 MB with ``mmap`` and
    unmaps them on ``free``, so the next tensor of that size page-faults every 4 KB page again: a
    backward pass that allocates a dense gradient for every expert (100 MB at the benchmark size)
    spends more time in those faults than in zero-filling and in the math (measured: 45 ms -> 4.6
    ms to allocate and zero the bench layer's expert gradients, 1 CPU thread). This raises glibc's
    mmap and trim thresholds to ``max_block_bytes``, so blocks up to that size come from the heap
    and freed ones stay there for the next step (the process keeps its peak memory).

    Process-wide, so the library never does it on import: the benchmark calls it (for every
    contender alike), training on a CPU calls it, and you may. Returns True where it took effect
    (Linux with glibc); False elsewhere (macOS, Windows, musl), where it changes nothing.
    """
    global _kept_cpu_memory
    if isinstance(max_block_bytes, bool) or not isinstance(max_block_bytes, int) or max_block_bytes <= 0:
        raise ValueError(f"max_block_bytes={max_block_bytes!r} is not allowed: it must be a positive integer")
    if _kept_cpu_memory is not None and _kept_cpu_memory >= max_block_bytes:
        return True
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    value = min(max_block_bytes, 2**31 - 1)
    ok = mallopt(_M_MMAP_THRESHOLD, value) == 1 and mallopt(_M_TRIM_THRESHOLD, value) == 1
    if ok:
        _kept_cpu_memory = value
    return ok


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch on ``n`` intra-op threads inside the block (None: as it is), the count it had before
    after it: timings and thread-dependent choices, made reproducible without changing the session."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
