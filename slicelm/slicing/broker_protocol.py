"""Messages between engines and the per-GPU memory broker (msgspec structs, msgpack over zmq).

Transport: the broker binds a ROUTER socket (``ipc://…``); each engine core connects a DEALER whose
identity is its replica name; a control client (``slicelm ps``, a benchmark) is a DEALER too.

Accounting is in bytes of GPU memory a replica holds: ``used`` changes only through a ``Grant`` (up) and a
``Release`` (down), so the broker's books never race with the engine's. A replica's ``guarantee`` is its
slice (``requestGPUMem``): the broker always lets it hold that much, reclaiming from borrowers if need be.
Anything above it is borrowed, up to its ``ceiling``, and is given back when the broker sends ``Reclaim``.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Register(msgspec.Struct, tag=True):
    """Engine → broker, once: which GPU, what it is guaranteed, what it holds already."""

    gpu: str
    guarantee: int
    used: int = 0


class Acquire(msgspec.Struct, tag=True):
    """Engine → broker: may I hold ``nbytes`` more? Answered by a ``Grant`` with the same ``seq``."""

    seq: int
    nbytes: int


class Release(msgspec.Struct, tag=True):
    """Engine → broker: I gave ``nbytes`` back (unmapped)."""

    nbytes: int


class Bye(msgspec.Struct, tag=True):
    """Engine → broker: I am going away; forget me (a dead engine is forgotten by the supervisor)."""


class Welcome(msgspec.Struct, tag=True):
    """Broker → engine: registered; the most it may hold (guarantee + what it may borrow)."""

    ceiling: int
    reclaim_timeout: float


class Grant(msgspec.Struct, tag=True):
    seq: int
    granted: bool
    reason: str = ""


class Reclaim(msgspec.Struct, tag=True):
    """Broker → engine: hold at most ``target`` bytes (never below the guarantee) within the bound."""

    target: int


class Limits(msgspec.Struct, tag=True):
    """Broker → engine: the ceiling changed (the broker's policy was switched at run time)."""

    ceiling: int


class SetPolicy(msgspec.Struct, tag=True):
    """Control → broker: how much a replica may borrow beyond its guarantee (bytes; None: all that is free,
    0: static slices). Answered with a ``Status``."""

    max_borrow: int | None


class GetStatus(msgspec.Struct, tag=True):
    """Control → broker: answered with a ``Status``."""


class Status(msgspec.Struct, tag=True):
    state: dict[str, Any]


EngineMessage = Register | Acquire | Release | Bye
ControlMessage = SetPolicy | GetStatus
BrokerMessage = Welcome | Grant | Reclaim | Limits | Status

_encoder = msgspec.msgpack.Encoder()
to_broker = msgspec.msgpack.Decoder(EngineMessage | ControlMessage)
from_broker = msgspec.msgpack.Decoder(BrokerMessage)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)
