"""Shared fixtures: every device test runs on CPU and, where present, CUDA and MPS."""

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
