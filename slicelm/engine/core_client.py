"""Clients of an engine core: the ``CoreClient`` protocol ``AsyncLLM`` uses, ``MPCoreClient`` (its own
process, the server's default), ``ThreadCoreClient`` (the same loop in a thread of this process:
``--no-engine-process``, tests, fakes) and ``core_shared.SharedCoreClient`` (one of several API servers of one
core process, ``--api-server-count``).

All talk to ``CoreLoop`` through a zmq PUSH socket (adds / aborts, msgpack) and a PULL socket (one
``EngineCoreOutputs`` per step). A reader thread receives, counts and decodes the outputs and hands
each message to the owner's event loop with one ``call_soon_threadsafe``; it also watches the core and
reports its death (process exit, thread end, or a ``dead_error`` message) within about a second.
Sending never blocks for good: a PUSH socket whose core is gone has no peer and would wait forever (on the
event loop: the server could not even exit), so a send that cannot go out checks that the core still lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import zmq

from slicelm.engine.core_messages import (
    ABORT,
    ADD,
    SHUTDOWN,
    UTILITY,
    WARMUP_DONE,
    EngineCoreInfo,
    EngineCoreOutputs,
    EngineCoreRequest,
    UtilityCall,
    make_encoder,
    outputs_decoder,
)
from slicelm.engine.core_proc import CoreLoop, run_engine_core
from slicelm.engine.protocol import EngineDeadError

if TYPE_CHECKING:
    from slicelm.config import EngineArgs
    from slicelm.engine.core import EngineCore

logger = logging.getLogger(__name__)
READ_POLL_MS = 500
SEND_RETRY_S = 0.01  # a send the core cannot take yet is retried this often while the core lives

OutputCallback = Callable[[EngineCoreOutputs | EngineDeadError], None]


class EngineStartupError(RuntimeError):
    """The engine core failed to start (a load error that was not a ``ValueError``)."""


@runtime_checkable
class CoreClient(Protocol):
    """What ``AsyncLLM`` needs from a client of an engine core; every core client implements all of it."""

    @property
    def pid(self) -> int | None:
        """The engine-core process (None: the core runs in a thread of this process)."""
        ...

    def wait_ready(self, timeout: float | None = None) -> EngineCoreInfo:
        """Blocks until the core has loaded and returns what it resolved; raises its load error."""
        ...

    def add_requests(self, reqs: list[EngineCoreRequest]) -> None: ...

    def abort_requests(self, request_ids: list[str]) -> None: ...

    def end_warmup(self) -> None:
        """The API server's warm-up requests are over: the core empties its prefix cache (once idle)."""
        ...

    def call_utility(self, call_id: int, method: str, args: list[Any]) -> None:
        """Asks the core to run ``method``; the reply comes in a later message's ``utility``."""
        ...

    def start_reader(self, loop: asyncio.AbstractEventLoop, callback: OutputCallback) -> None:
        """Hands every output message (or the core's death) to ``callback`` on ``loop`` from now on."""
        ...

    def death_reason(self) -> str | None:
        """Why the core is gone, or None while it runs."""
        ...

    def shutdown(self, timeout: float = 5.0) -> None: ...


class _SocketCoreClient:
    """Sockets, encoding and the reader thread shared by both clients."""

    def __init__(self, ctx: zmq.Context, in_addr: str, out_addr: str) -> None:
        # ctx is the process-wide zmq.Context.instance(): never terminated, so no garbage-collected
        # context can block on a socket another thread still holds; sockets are closed by shutdown().
        self.ctx = ctx
        self.in_sock = ctx.socket(zmq.PUSH)
        self.in_sock.setsockopt(zmq.LINGER, 0)
        self.in_sock.bind(in_addr)
        self.out_sock = ctx.socket(zmq.PULL)
        self.out_sock.setsockopt(zmq.LINGER, 0)
        self.out_sock.bind(out_addr)
        self.encoder = make_encoder()
        self.decoder = outputs_decoder()
        self.bytes_received = 0  # bytes of output messages taken from the core (O(length) checks)
        self.messages_received = 0
        self.max_message_bytes = 0
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._target: tuple[asyncio.AbstractEventLoop, OutputCallback] | None = None
        self._closing = False
        self._tag: list[bytes] = []  # a shared core's client index (SharedCoreClient)

    # ----------------------------------------------------------------- requests in
    def add_requests(self, reqs: list[EngineCoreRequest]) -> None:
        with self._send_lock:
            for req in reqs:
                self._send([ADD, self.encoder.encode(req)])

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            with self._send_lock, contextlib.suppress(EngineDeadError):  # a dead core runs nothing to abort
                self._send([ABORT, self.encoder.encode(request_ids)])

    def _send(self, frames: list[bytes]) -> None:
        """Sends one message (hold ``_send_lock``); raises ``EngineDeadError`` once the core is gone."""
        while True:
            try:
                self.in_sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                reason = self.death_reason()
                if reason is not None:
                    raise EngineDeadError(reason) from None
                time.sleep(SEND_RETRY_S)

    def end_warmup(self) -> None:
        """The API server's warm-up requests are over: the core empties its prefix cache (once idle)."""
        with self._send_lock:
            self.in_sock.send_multipart([WARMUP_DONE], copy=False)

    def call_utility(self, call_id: int, method: str, args: list[Any]) -> None:
        """Asks the core to run ``method`` (sleep, wake_up, is_sleeping); the reply comes in ``utility``."""
        with self._send_lock:
            self.in_sock.send_multipart([UTILITY, self.encoder.encode(UtilityCall(call_id, method, args)),
                                         *self._tag], copy=False)

    # ----------------------------------------------------------------- outputs out
    def start_reader(self, loop: asyncio.AbstractEventLoop, callback: OutputCallback) -> None:
        """Hands output messages (or the core's death) to ``callback`` on ``loop`` from now on (a later
        call moves delivery to another loop, e.g. after the first one was closed)."""
        self._target = (loop, callback)
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="slicelm-core-reader", daemon=True)
            self._reader.start()

    def _read(self) -> None:
        while not self._closing:
            try:
                ready = self.out_sock.poll(READ_POLL_MS)
            except zmq.ZMQError:
                return  # closed by shutdown
            if not ready:
                reason = self.death_reason()
                if reason is not None and not self._closing:
                    self._deliver(EngineDeadError(reason))
                    return
                continue
            try:
                frame = self.out_sock.recv(copy=False)
            except zmq.ZMQError:
                return
            size = len(frame.buffer)
            self.bytes_received += size
            self.messages_received += 1
            self.max_message_bytes = max(self.max_message_bytes, size)
            msg = self.decoder.decode(frame.buffer)
            self._deliver(msg)
            if msg.dead_error is not None:
                return

    def _deliver(self, item: EngineCoreOutputs | EngineDeadError) -> None:
        assert self._target is not None
        loop, callback = self._target
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            loop.call_soon_threadsafe(callback, item)

    def death_reason(self) -> str | None:
        raise NotImplementedError

    def _close_sockets(self) -> None:
        self._closing = True
        with self._send_lock, contextlib.suppress(zmq.ZMQError):
            self.in_sock.send_multipart([SHUTDOWN], flags=zmq.NOBLOCK)

    def _destroy(self) -> None:
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2 * READ_POLL_MS / 1000)
        self.in_sock.close(linger=0)
        self.out_sock.close(linger=0)


class MPCoreClient(_SocketCoreClient):
    """Starts ``EngineCore(args)`` in a ``spawn``ed process and talks to it over ipc sockets."""

    def __init__(self, args: EngineArgs) -> None:
        self._dir = tempfile.mkdtemp(prefix="slicelm-core-")
        super().__init__(zmq.Context.instance(), f"ipc://{self._dir}/in", f"ipc://{self._dir}/out")
        mp = multiprocessing.get_context("spawn")
        reader, writer = mp.Pipe(duplex=False)
        self._ready = reader
        self._info: EngineCoreInfo | None = None
        self.proc = mp.Process(target=run_engine_core, name="slicelm-engine-core", daemon=True,
                               args=(args, [f"ipc://{self._dir}/in"], [f"ipc://{self._dir}/out"], writer, os.getpid()))
        self.proc.start()
        writer.close()
        logger.info("engine core process started (pid %d)", self.proc.pid)

    def wait_ready(self, timeout: float | None = None) -> EngineCoreInfo:
        """Blocks until the core has loaded; raises its load error (a ``ValueError`` stays one)."""
        if self._info is None:
            try:
                self._info = wait_core_ready(self._ready, self.proc, timeout)
            except BaseException:
                self.shutdown()
                raise
        return self._info

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def death_reason(self) -> str | None:
        if self.proc.is_alive():
            return None
        return f"the engine core process died (exit code {self.proc.exitcode})"

    def shutdown(self, timeout: float = 5.0) -> None:
        self._close_sockets()
        stop_process(self.proc, timeout)
        self._destroy()
        shutil.rmtree(self._dir, ignore_errors=True)


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


class ThreadCoreClient(_SocketCoreClient):
    """Runs ``CoreLoop`` over ``core`` (an ``EngineCore`` or a test fake) in a thread of this process."""

    def __init__(self, core: EngineCore) -> None:
        name = uuid.uuid4().hex
        super().__init__(zmq.Context.instance(), f"inproc://{name}-in", f"inproc://{name}-out")
        self.core = core
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="slicelm-engine-core", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        in_sock = self.ctx.socket(zmq.PULL)
        in_sock.connect(self.in_sock.getsockopt_string(zmq.LAST_ENDPOINT))
        out_sock = self.ctx.socket(zmq.PUSH)
        out_sock.setsockopt(zmq.LINGER, 1000)
        out_sock.connect(self.out_sock.getsockopt_string(zmq.LAST_ENDPOINT))
        try:
            CoreLoop(self.core, in_sock, out_sock).run()
        except BaseException as e:
            self.error = e
        finally:
            in_sock.close(linger=0)
            out_sock.close()

    def wait_ready(self, timeout: float | None = None) -> EngineCoreInfo:
        return self.core.info()

    @property
    def pid(self) -> int | None:
        return None

    def death_reason(self) -> str | None:
        if self._thread.is_alive():
            return None
        return f"the engine core thread stopped: {self.error!r}"

    def shutdown(self, timeout: float = 5.0) -> None:
        self._close_sockets()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._destroy()
        stop = getattr(self.core, "shutdown", None)  # an EngineCore's tensor-parallel workers (fakes: none)
        if stop is not None:
            stop()
