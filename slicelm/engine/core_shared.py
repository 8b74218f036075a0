"""One engine core shared by several API server processes (``--api-server-count N``, as vLLM v1).

The supervising parent launches the core with ``core_launcher.CoreProcess(args, client_count=N)`` (one pair of ipc
endpoints per API server plus its control endpoint). ``SharedCoreClient`` (in API server ``i``) binds pair ``i``
exactly as ``MPCoreClient`` binds its own, tags its adds with ``i`` so the core sends it back only its own
sequences' outputs, and watches the core process through a pidfd (it is not the core's parent). Its ``wait_ready``
returns the ``EngineCoreInfo`` the parent received (the parent waits for the core before it starts any API server).
It never shuts the core down: only the parent does, after every API server has stopped.
"""

from __future__ import annotations

import logging
import os
import select

import zmq

from slicelm.engine.core_client import _SocketCoreClient
from slicelm.engine.core_messages import ADD, EngineCoreInfo, EngineCoreRequest

logger = logging.getLogger(__name__)


class SharedCoreClient(_SocketCoreClient):
    """API server side: client ``client_index`` of a core that another process started (see module doc)."""

    def __init__(self, client_index: int, in_addr: str, out_addr: str, core_pid: int, info: EngineCoreInfo) -> None:
        super().__init__(zmq.Context.instance(), in_addr, out_addr)
        self.info = info
        self.client_index = client_index
        self.core_pid = core_pid
        self._tag = [client_index.to_bytes(2, "little")] if client_index else []
        try:
            self._pidfd: int | None = os.pidfd_open(core_pid)
        except ProcessLookupError:
            self._pidfd = None

    @property
    def pid(self) -> int:
        return self.core_pid

    def add_requests(self, reqs: list[EngineCoreRequest]) -> None:
        with self._send_lock:
            for req in reqs:
                self._send([ADD, self.encoder.encode(req), *self._tag])

    def wait_ready(self, timeout: float | None = None) -> EngineCoreInfo:  # the parent waited for it
        return self.info

    def death_reason(self) -> str | None:
        fd = self._pidfd
        if fd is not None and not select.select([fd], [], [], 0)[0]:
            return None
        return f"the engine core process (pid {self.core_pid}) died"

    def shutdown(self, timeout: float = 5.0) -> None:
        self._closing = True  # no SHUTDOWN: the core serves the other API servers until the parent stops it
        self._destroy()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
