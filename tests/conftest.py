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


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module's tests, restored afterwards: tiny matrices run
    fastest that way on a shared CPU, and the runs stay reproducible. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
