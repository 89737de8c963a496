"""The one place the course chooses a device."""

from __future__ import annotations

import os

import torch

_ALLOWED = ("auto", "cpu", "cuda", "mps")


def pick_device(prefer: str | None = None) -> torch.device:
    """Return the device every lesson uses: CUDA if present, else Apple MPS, else CPU.

    ``prefer`` (or the ``GLM4MOE_DEVICE`` environment variable) forces one of
    "auto", "cpu", "cuda" or "mps"; asking for a device that is not available is an error rather
    than a silent fallback.
    """
    choice = (prefer or os.environ.get("GLM4MOE_DEVICE") or "auto").lower()
    if choice not in _ALLOWED:
        raise ValueError(f"device={choice!r} is not allowed: use one of {_ALLOWED}")
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch finds no CUDA GPU here")
    if choice == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError("device='mps' was asked for, but torch finds no Apple MPS device here")
    return torch.device(choice)


def available_devices() -> list[torch.device]:
    """Every device this machine can run the course on (CPU first); tests parametrize over it."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(torch.device("mps"))
    return devices
