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
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import zmq

from slicelm.engine.core_launcher import CoreProcess
from slicelm.engine.core_launcher import EngineStartupError as EngineStartupError
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
from slicelm.engine.core_proc import CoreLoop
from slicelm.engine.protocol import EngineDeadError

if TYPE_CHECKING:
    from slicelm.config import EngineArgs
    from slicelm.engine.core import EngineCore

logger = logging.getLogger(__name__)
READ_POLL_MS = 500
SEND_RETRY_S = 0.01  # a send the core cannot take yet is retried this often while the core lives

OutputCallback = Callable[[EngineCoreOutputs | EngineDeadError], None]


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
    """Launches ``EngineCore(args)`` in its own process (``CoreProcess``, one client) and is its only client."""

    def __init__(self, args: EngineArgs) -> None:
        self.core_process = CoreProcess(args, client_count=1)
        super().__init__(zmq.Context.instance(), *self.core_process.client_addrs[0])

    @property
    def proc(self) -> BaseProcess:
        return self.core_process.proc

    def wait_ready(self, timeout: float | None = None) -> EngineCoreInfo:
        """Blocks until the core has loaded; raises its load error (a ``ValueError`` stays one)."""
        try:
            return self.core_process.wait_ready(timeout)
        except BaseException:
            self.shutdown()
            raise

    @property
    def pid(self) -> int | None:
        return self.core_process.pid

    def death_reason(self) -> str | None:
        return self.core_process.death_reason()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._close_sockets()
        self.core_process.shutdown(timeout)
        self._destroy()


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
