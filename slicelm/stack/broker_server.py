"""The memory broker as a thread: a zmq ROUTER socket in front of ``BrokerState``.

``slicelm up`` runs one for the whole stack (its books are per GPU) at ``ipc://<run dir>/broker.ipc`` and
hands every GPU replica that address (``SLICELM_KV_BROKER``) and its name (``SLICELM_REPLICA``). Engines
speak ``slicing.broker_protocol`` to it; a control client may read the status or switch the borrowing
policy at run time. Every ``TICK_S`` the thread checks reclaim deadlines and hands overdue borrowers to
``on_overdue`` (the supervisor restarts them). ``forget`` (a replica died) and ``status`` are safe to call
from other threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from slicelm.slicing.broker_protocol import (
    Acquire,
    Bye,
    GetStatus,
    Register,
    Release,
    SetPolicy,
    Status,
    encode,
    to_broker,
)
from slicelm.stack.broker import BrokerState, Out

logger = logging.getLogger("slicelm.stack")
TICK_S = 0.05


class BrokerServer:
    def __init__(self, address: str, state: BrokerState,
                 on_overdue: Callable[[str], None] | None = None) -> None:
        self.address = address
        self.state = state
        self.on_overdue = on_overdue
        self._lock = threading.Lock()
        self._outbox: list[Out] = []
        self._stop = threading.Event()
        self._reported: set[str] = set()
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._sock.bind(address)
        self._thread = threading.Thread(target=self._run, name="slicelm-memory-broker", daemon=True)

    def start(self) -> BrokerServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        with contextlib.suppress(zmq.ZMQError):
            self._sock.close()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return self.state.status()

    def forget(self, name: str) -> None:
        """A replica died: its memory is free again (waiting owners may be granted)."""
        with self._lock:
            self._outbox += self.state.leave(name, time.monotonic())
            self._reported.discard(name)

    # ------------------------------------------------------------------------------ thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._sock.poll(int(TICK_S * 1000)):
                    self._drain()
                self._tick()
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                logger.exception("memory broker socket error")
            except Exception:
                logger.exception("memory broker failed to handle a message")

    def _drain(self) -> None:
        while True:
            try:
                ident, payload = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            name = ident.decode()
            try:
                msg = to_broker.decode(payload)
            except msgspec.DecodeError:
                logger.warning("memory broker: undecodable message from %s", name)
                continue
            with self._lock:
                outs = self._handle(name, msg, time.monotonic())
            self._send(outs)

    def _handle(self, name: str, msg: Any, now: float) -> list[Out]:
        st = self.state
        if isinstance(msg, Register):
            logger.info("memory broker: %s registered on %s, guarantee %.2f GiB", name, msg.gpu,
                        msg.guarantee / (1 << 30))
            return st.register(name, msg.gpu, msg.guarantee, msg.used, now)
        if isinstance(msg, Acquire):
            return st.acquire(name, msg.seq, msg.nbytes, now)
        if isinstance(msg, Release):
            return st.release(name, msg.nbytes, now)
        if isinstance(msg, Bye):
            return st.leave(name, now)
        if isinstance(msg, SetPolicy):
            outs = st.set_policy(msg.max_borrow, now)
            return [*outs, (name, Status(st.status()))]
        if isinstance(msg, GetStatus):
            return [(name, Status(st.status()))]
        return []

    def _tick(self) -> None:
        with self._lock:
            outs, self._outbox = self._outbox, []
            now_overdue = self.state.overdue(time.monotonic())
            overdue = [n for n in now_overdue if n not in self._reported]
            self._reported = set(now_overdue)
        self._send(outs)
        for name in overdue:
            logger.error("memory broker: %s did not give borrowed memory back within %.1f s", name,
                         self.state.reclaim_timeout)
            if self.on_overdue is not None:
                self.on_overdue(name)

    def _send(self, outs: list[Out]) -> None:
        for name, msg in outs:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart([name.encode(), encode(msg)], flags=zmq.NOBLOCK)
