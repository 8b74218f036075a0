"""An engine's link to the per-GPU memory broker (``slicelm.stack.broker``), and a control client.

``BrokerLink`` is used from the engine core's thread only: ``register`` once, ``acquire`` before mapping
more memory (waiting a little for the answer; a late ``Grant`` comes back through ``poll``), ``release``
after unmapping, ``poll`` each step (or when its socket wakes an idle core) for ``Reclaim`` / ``Limits`` /
late ``Grant`` messages. The stack hands a replica the broker's address in ``SLICELM_KV_BROKER`` and its
name in ``SLICELM_REPLICA`` (its GPU's id in ``SLICELM_KV_BROKER_GPU``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from typing import Any

import zmq

from slicelm.slicing.broker_protocol import (
    Acquire,
    BrokerMessage,
    Bye,
    GetStatus,
    Grant,
    Register,
    Release,
    SetPolicy,
    Status,
    Welcome,
    encode,
    from_broker,
)

BROKER_ENV = "SLICELM_KV_BROKER"
REPLICA_ENV = "SLICELM_REPLICA"
GPU_ENV = "SLICELM_KV_BROKER_GPU"


class BrokerUnavailable(RuntimeError):
    """The broker did not answer in time."""


class _Dealer:
    def __init__(self, address: str, identity: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity.encode())
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.connect(address)

    def send(self, msg: Any) -> None:
        self.sock.send(encode(msg))

    def recv(self, timeout_s: float) -> BrokerMessage | None:
        if not self.sock.poll(max(0, int(timeout_s * 1000))):
            return None
        return from_broker.decode(self.sock.recv())

    def close(self) -> None:
        self.sock.close()


class BrokerLink(_Dealer):
    """One engine's side of the protocol (see the module docstring)."""

    def __init__(self, address: str, name: str, gpu: str) -> None:
        super().__init__(address, name)
        self.name = name
        self.gpu = gpu
        self.ceiling = 0
        self.reclaim_timeout = 0.0
        self._seq = 0
        self._inbox: deque[BrokerMessage] = deque()

    @classmethod
    def from_env(cls, gpu: str, env: dict[str, str] | None = None) -> BrokerLink | None:
        env = os.environ if env is None else env
        address = env.get(BROKER_ENV)
        if not address:
            return None
        return cls(address, env.get(REPLICA_ENV) or f"engine-{os.getpid()}", env.get(GPU_ENV) or gpu)

    @property
    def socket(self) -> zmq.Socket:
        return self.sock

    def register(self, guarantee: int, used: int = 0, timeout_s: float = 10.0) -> int:
        """Returns the ceiling (the most this replica may hold); raises ``BrokerUnavailable``."""
        self.send(Register(self.gpu, guarantee, used))
        msg = self._wait(lambda m: isinstance(m, Welcome), timeout_s)
        if msg is None:
            raise BrokerUnavailable(f"the memory broker did not answer within {timeout_s:.0f} s")
        assert isinstance(msg, Welcome)
        self.ceiling, self.reclaim_timeout = msg.ceiling, msg.reclaim_timeout
        return msg.ceiling

    def acquire(self, nbytes: int, wait_s: float) -> tuple[int, bool | None]:
        """Asks for ``nbytes`` more: (seq, True granted / False denied / None no answer yet — it comes
        later as a ``Grant`` with that seq from ``poll``)."""
        self._seq += 1
        seq = self._seq
        self.send(Acquire(seq, nbytes))
        msg = self._wait(lambda m: isinstance(m, Grant) and m.seq == seq, wait_s)
        return seq, (None if msg is None else msg.granted)  # type: ignore[union-attr]

    def release(self, nbytes: int) -> None:
        if nbytes > 0:
            self.send(Release(nbytes))

    def poll(self) -> list[BrokerMessage]:
        """Every message that arrived (Reclaim, Limits, late Grants), without blocking."""
        out = list(self._inbox)
        self._inbox.clear()
        while (msg := self.recv(0)) is not None:
            out.append(msg)
        return out

    def _wait(self, match: Any, timeout_s: float) -> BrokerMessage | None:
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                return None
            if match(msg):
                return msg
            self._inbox.append(msg)

    def close(self) -> None:
        try:
            self.send(Bye())
        finally:
            super().close()


class BrokerControl(_Dealer):
    """Reads the broker's state and switches its policy (``slicelm ps``, benchmarks)."""

    def __init__(self, address: str) -> None:
        super().__init__(address, f"control-{uuid.uuid4().hex[:8]}")

    def status(self, timeout_s: float = 2.0) -> dict[str, Any]:
        self.send(GetStatus())
        return self._reply(timeout_s)

    def set_policy(self, max_borrow: int | None, timeout_s: float = 2.0) -> dict[str, Any]:
        self.send(SetPolicy(max_borrow))
        return self._reply(timeout_s)

    def _reply(self, timeout_s: float) -> dict[str, Any]:
        msg = self.recv(timeout_s)
        if not isinstance(msg, Status):
            raise BrokerUnavailable(f"the memory broker did not answer within {timeout_s:.0f} s")
        return msg.state
