"""``CoreProcess``: the one launcher of an engine-core process, for one API client or several (vLLM v1's
``client_index`` / ``client_count`` shape).

The launcher makes one pair of ipc endpoints per client (client ``i`` binds ``client_addrs[i]``; the core connects
to all of them) plus a control endpoint of its own, spawns ``run_engine_core`` (``spawn``: CUDA-safe), waits for
its start-up message on a pipe (``wait_ready``: the core's ``EngineCoreInfo``, or its load error), and stops it
(``SHUTDOWN`` on the control endpoint, then terminate, then kill). ``MPCoreClient`` launches one for itself
(``client_count=1``); ``--api-server-count N`` launches one in the supervising parent for N ``SharedCoreClient``s.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import zmq

from slicelm.engine.core_messages import SHUTDOWN, EngineCoreInfo
from slicelm.engine.core_proc import run_engine_core

if TYPE_CHECKING:
    from slicelm.config import EngineArgs

logger = logging.getLogger(__name__)


class EngineStartupError(RuntimeError):
    """The engine core failed to start (a load error that was not a ``ValueError``)."""


class CoreProcess:
    """The engine-core process of ``client_count`` clients and their endpoints (see the module docstring)."""

    def __init__(self, args: EngineArgs, client_count: int = 1) -> None:
        assert client_count >= 1
        self.client_count = client_count
        self.dir = tempfile.mkdtemp(prefix="slicelm-core-")
        self.client_addrs = [(f"ipc://{self.dir}/in-{i}", f"ipc://{self.dir}/out-{i}") for i in range(client_count)]
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
        logger.info("engine core process started (pid %d) for %d API client(s)", self.proc.pid, client_count)

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def wait_ready(self, timeout: float | None = None) -> EngineCoreInfo:
        """Blocks until the core has loaded (once; later calls return the same info); raises its load error (a
        ``ValueError`` stays one) after stopping the process."""
        if self._info is None:
            try:
                self._info = wait_core_ready(self._ready, self.proc, timeout)
            except BaseException:
                self.shutdown()
                raise
        return self._info

    def death_reason(self) -> str | None:
        """The parent's view: why the process is gone, or None while it runs."""
        if self.proc.is_alive():
            return None
        return f"the engine core process died (exit code {self.proc.exitcode})"

    def shutdown(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.ctl.send_multipart([SHUTDOWN], flags=zmq.NOBLOCK)
        stop_process(self.proc, timeout)
        self.ctl.close(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_core_ready(ready: Connection, proc: BaseProcess, timeout: float | None) -> EngineCoreInfo:
    """Waits for the core process's start-up message on the pipe ``ready``; raises its load error."""
    found = wait_connections([ready, proc.sentinel], timeout)
    if ready in found:
        with contextlib.suppress(EOFError):
            msg = ready.recv()
            if msg[0] == "ready":
                return msg[1]
            _, name, text, is_value_error, tb = msg
            logger.debug("engine core start-up failed:\n%s", tb)
            raise (ValueError if is_value_error else EngineStartupError)(
                text if is_value_error else f"engine core failed to start: {name}: {text}")
    if not found:
        raise EngineStartupError(f"engine core did not start within {timeout} s")
    proc.join(5)
    raise EngineStartupError(f"engine core process exited with code {proc.exitcode} while starting")


def stop_process(proc: BaseProcess, timeout: float) -> None:
    """Waits ``timeout`` s for ``proc`` (already asked to stop), then terminates it, then kills it."""
    for step in (None, proc.terminate, proc.kill):
        if not proc.is_alive():
            return
        if step is not None:
            step()
        proc.join(timeout)
