"""The nbclient kernel manager of the learner test: replies are polled for in short slices."""

import asyncio
import sys
import time
from queue import Empty

import pytest
from kernel_client import POLL_SLICE_S, KernelManager, SlicedPollChannel, SlicedPollClient


class _Socket:
    """A socket whose poll never signals (a lost wake-up) until ``ready_after`` polls."""

    def __init__(self, ready_after: int | None) -> None:
        self.ready_after, self.timeouts_ms = ready_after, []

    async def poll(self, timeout_ms: int) -> int:
        self.timeouts_ms.append(timeout_ms)
        if self.ready_after is not None and len(self.timeouts_ms) > self.ready_after:
            return 1
        await asyncio.sleep(timeout_ms / 1000)
        return 0


def _channel(socket: _Socket) -> SlicedPollChannel:
    channel = SlicedPollChannel.__new__(SlicedPollChannel)  # no real zmq socket needed
    channel.socket = socket

    async def recv():
        return {"msg_type": "execute_reply"}

    channel._recv = recv
    return channel


def test_a_message_is_found_within_a_slice_not_at_the_timeout():
    socket = _Socket(ready_after=2)
    start = time.monotonic()
    msg = asyncio.run(_channel(socket).get_msg(timeout=300))
    assert msg == {"msg_type": "execute_reply"}
    assert time.monotonic() - start < 3 * POLL_SLICE_S + 1
    assert socket.timeouts_ms[:2] == [int(POLL_SLICE_S * 1000)] * 2


def test_timeout_still_raises_empty_on_time():
    socket = _Socket(ready_after=None)
    start = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(_channel(socket).get_msg(timeout=1.2))
    elapsed = time.monotonic() - start
    assert 1.2 <= elapsed < 2.5
    assert max(socket.timeouts_ms) <= POLL_SLICE_S * 1000 and len(socket.timeouts_ms) >= 3


def test_manager_hands_out_the_sliced_client_over_unix_sockets():
    km = KernelManager(kernel_name="python3")
    assert km.client_factory is SlicedPollClient
    if sys.platform != "win32":
        assert km.transport == "ipc" and km.ip.endswith("-ipc") and km.ip.startswith("/")
        assert KernelManager().ip != km.ip  # each kernel its own socket paths
