"""device.py: the allocator setting the benchmark and CPU training use."""

import platform

import pytest
import torch

from glm4moe_lib import device as dev


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1G"])
def test_keep_freed_cpu_memory_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="max_block_bytes="):
        dev.keep_freed_cpu_memory(bad)


def test_keep_freed_cpu_memory_takes_effect_on_glibc(monkeypatch):
    monkeypatch.setattr(dev, "_kept_cpu_memory", None)  # as in a fresh process
    applied = dev.keep_freed_cpu_memory(64 << 20)
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert applied is on_glibc
    if on_glibc:
        assert dev._kept_cpu_memory == 64 << 20
        assert dev.keep_freed_cpu_memory(32 << 20) is True  # already at least that: nothing to do
        assert dev._kept_cpu_memory == 64 << 20
    # big tensors still allocate, free and come back zeroed
    for _ in range(3):
        t = torch.zeros(40 << 18)  # 40 MB, above glibc's largest default mmap threshold
        assert float(t.abs().sum()) == 0.0
        t.fill_(1.0)
        del t


def test_keep_freed_cpu_memory_is_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(dev, "_kept_cpu_memory", None)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert dev.keep_freed_cpu_memory() is False
    assert dev._kept_cpu_memory is None


def test_torch_threads_sets_the_count_inside_and_restores_it_after():
    from glm4moe_lib import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), torch_threads(1):
        raise RuntimeError("inside")  # restored on an error too
    assert torch.get_num_threads() == before
    with torch_threads(None):  # None: unchanged
        assert torch.get_num_threads() == before
