"""One engine core shared by several API server processes (``--api-server-count N``, as vLLM v1).

``SharedCoreProcess`` (in the supervising parent) spawns the core with one pair of ipc endpoints per
API server plus a control endpoint of its own (to send ``SHUTDOWN``). ``SharedCoreClient`` (in API
server ``i``) binds pair ``i`` exactly as ``MPCoreClient`` binds its own, tags its adds with ``i`` so the
core sends it back only its own sequences' outputs, and watches the core process through a pidfd (it
is not the core's parent). It never shuts the core down: only the parent does, after every API server
has stopped.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import shutil
import tempfile
from typing import TYPE_CHECKING

import zmq

from slicelm.engine.core_client import _SocketCoreClient, stop_process, wait_core_ready
from slicelm.engine.core_messages import ADD, SHUTDOWN, EngineCoreInfo, EngineCoreRequest
from slicelm.engine.core_proc import run_engine_core

if TYPE_CHECKING:
    from slicelm.config import EngineArgs

logger = logging.getLogger(__name__)


class SharedCoreProcess:
    """Parent side: the engine-core process and the endpoints of its ``num_clients`` clients."""

    def __init__(self, args: EngineArgs, num_clients: int) -> None:
        assert num_clients >= 1
        self.dir = tempfile.mkdtemp(prefix="slicelm-core-")
        self.client_addrs = [(f"ipc://{self.dir}/in-{i}", f"ipc://{self.dir}/out-{i}") for i in range(num_clients)]
        ctl_addr = f"ipc://{self.dir}/ctl"
        self.ctl = zmq.Context.instance().socket(zmq.PUSH)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.bind(ctl_addr)
        mp = multiprocessing.get_context("spawn")
        reader, writer = mp.Pipe(duplex=False)
        self._ready = reader
        self._info: EngineCoreInfo | None = None
        in_addrs = [ctl_addr, *(a for a, _ in self.client_addrs)]
        self.proc = mp.Process(target=run_engine_core, name="slicelm-engine-core", daemon=True,
                               args=(args, in_addrs, [b for _, b in self.client_addrs], writer, os.getpid()))
        self.proc.start()
        writer.close()
        logger.info("engine core process started (pid %d) for %d API servers", self.proc.pid, num_clients)

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def wait_ready(self, timeout: float | None = None) -> EngineCoreInfo:
        if self._info is None:
            try:
                self._info = wait_core_ready(self._ready, self.proc, timeout)
            except BaseException:
                self.shutdown()
                raise
        return self._info

    def shutdown(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.ctl.send_multipart([SHUTDOWN], flags=zmq.NOBLOCK)
        stop_process(self.proc, timeout)
        self.ctl.close(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)


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
