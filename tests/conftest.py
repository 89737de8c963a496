"""Shared fixtures: every device test runs on CPU and, where present, CUDA and MPS; the kernel's
scheduling hook for the take-over tests."""

from contextlib import contextmanager

import matplotlib
import pytest
import torch

from glm4moe_lib import available_devices

matplotlib.use("Agg")

DEVICES = [str(d) for d in available_devices()]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn (CPU always; CUDA/MPS when this machine has them)."""
    return torch.device(request.param)


@pytest.fixture
def idle_thread():
    """``with idle_thread(owner) as taken_over:`` runs the C kernel's parallel calls with thread
    ``owner`` claiming none of its own experts, so the others must take all of them over (as when a
    thread runs slow); ``taken_over()`` says how many experts ran outside their own thread's range."""
    from glm4moe_lib import cpu_kernel

    @contextmanager
    def idle(owner: int):
        lib = cpu_kernel._lib
        lib.moe_taken_over()  # (from zero)
        lib.moe_schedule_test(owner)
        try:
            yield lib.moe_taken_over
        finally:
            lib.moe_schedule_test(-1)

    return idle
