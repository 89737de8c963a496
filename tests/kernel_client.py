"""A kernel manager for nbclient whose channels never sleep through a message that has arrived.

nbclient waits for a cell's reply with one ``zmq.asyncio`` poll as long as the cell's timeout. That
poll waits on zmq's edge-triggered file descriptor, and now and then (about one widget cell in
thirty here, more on a busy machine) the wake-up for a message that has already arrived is lost:
the poll then sleeps until the timeout, finds the message at its final check, and the cell
"succeeds" after 300 s. That cost CI five minutes in about half the runs (see
jupyter/nbclient#312, zeromq/pyzmq#2173). Polling in short slices bounds the loss to one slice.

The manager below also talks to the kernel over unix sockets instead of TCP ports (no port race
between kernels started at the same time).

Use: ``NotebookClient(nb, kernel_manager_class=KernelManager)``, or for nbconvert
``--ExecutePreprocessor.kernel_manager_class=kernel_client.KernelManager`` with ``tests`` on
``PYTHONPATH``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from queue import Empty
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from traitlets import Type, default

#: the longest a message that has arrived can wait unnoticed (seconds)
POLL_SLICE_S = 0.5


class SlicedPollChannel(AsyncZMQSocketChannel):
    """``get_msg`` that polls again every ``POLL_SLICE_S`` until its timeout (None: forever)."""

    async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE_S if deadline is None else min(POLL_SLICE_S, deadline - time.monotonic())
            if await self.socket.poll(int(max(left, 0.0) * 1000)):
                return await self._recv()
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty


class SlicedPollClient(AsyncKernelClient):
    shell_channel_class = Type(SlicedPollChannel)
    iopub_channel_class = Type(SlicedPollChannel)
    stdin_channel_class = Type(SlicedPollChannel)
    control_channel_class = Type(SlicedPollChannel)


class KernelManager(AsyncKernelManager):
    """nbclient's default kernel manager, handing out :class:`SlicedPollClient` clients, and
    talking to the kernel over unix sockets where there are any: kernels started side by side
    (pytest-xdist) then cannot pick the same free TCP port (seen here: "Address already in use",
    then "Kernel died before replying to kernel_info")."""

    @default("transport")
    def _default_transport(self) -> str:
        return "tcp" if sys.platform == "win32" else "ipc"

    @default("ip")
    def _default_ip(self) -> str:  # ipc: a unique absolute path prefix, not "kernel-ipc" in the cwd
        if self.transport != "ipc":
            return "127.0.0.1"
        return os.path.join(tempfile.gettempdir(), f"kernel-{uuid.uuid4().hex}-ipc")

    @default("client_factory")
    def _default_client_factory(self) -> type:
        return SlicedPollClient
