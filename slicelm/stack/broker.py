"""The per-GPU memory broker's books and rules (no sockets here: ``broker_server.py`` carries them).

Every replica on a GPU is a ``Member`` with a ``guarantee`` (its slice, what ``requestGPUMem`` promised)
and a ``ceiling`` (guarantee + what it may borrow: the policy, switchable at run time; 0 extra = static
slices). ``used`` is what it holds; it goes up only by a granted ``Acquire`` and down by a ``Release``.

- An *owner* request (``used + n <= guarantee``) is always honoured: at once when the GPU has that much
  free, otherwise after borrowers give memory back. The broker sends the borrowers ``Reclaim(target)``
  (never below their guarantee) with a deadline ``reclaim_timeout`` seconds away; the waiting owner is
  granted, first come first served, as soon as releases make room.
- A *borrow* request (above the guarantee) is granted only from free memory, never while an owner waits,
  and never past the ceiling.
- ``overdue`` lists borrowers past their deadline; the supervisor restarts them (the guarantee is a hard
  one: a hung borrower cannot keep an owner waiting).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import msgspec

from slicelm.slicing.broker_protocol import Grant, Limits, Reclaim, Welcome

Out = tuple[str, msgspec.Struct]  # (member name, message to send it)


@dataclass
class Member:
    name: str
    gpu: str
    guarantee: int
    ceiling: int
    used: int = 0
    reclaim_target: int | None = None
    reclaim_deadline: float | None = None
    reclaims: int = 0  # how many times it was asked to give memory back
    denied: int = 0

    @property
    def borrowed(self) -> int:
        return max(0, self.used - self.guarantee)

    def to_json(self) -> dict[str, object]:
        return {"gpu": self.gpu, "guarantee": self.guarantee, "ceiling": self.ceiling, "used": self.used,
                "borrowed": self.borrowed, "reclaim_target": self.reclaim_target, "reclaims": self.reclaims,
                "denied": self.denied}


@dataclass
class _Waiter:
    name: str
    seq: int
    nbytes: int


@dataclass
class GPUPool:
    capacity: int | None  # None: the sum of its members' guarantees (nothing to lend beyond the slices)
    members: dict[str, Member] = field(default_factory=dict)
    waiting: deque[_Waiter] = field(default_factory=deque)

    def total(self) -> int:
        if self.capacity is not None:
            return self.capacity
        return sum(m.guarantee for m in self.members.values())

    def free(self) -> int:
        return self.total() - sum(m.used for m in self.members.values())


class BrokerState:
    def __init__(self, capacities: dict[str, int], max_borrow: int | None = None, reclaim_timeout: float = 2.0,
                 ) -> None:
        self.pools: dict[str, GPUPool] = {gpu: GPUPool(cap) for gpu, cap in capacities.items()}
        self.max_borrow = max_borrow
        self.reclaim_timeout = reclaim_timeout
        self.members: dict[str, Member] = {}

    # ---------------------------------------------------------------------------- membership
    def _ceiling(self, pool: GPUPool, guarantee: int) -> int:
        extra = pool.total() if self.max_borrow is None else self.max_borrow
        return max(guarantee, min(pool.total(), guarantee + extra))

    def register(self, name: str, gpu: str, guarantee: int, used: int, now: float) -> list[Out]:
        outs = self.leave(name, now) if name in self.members else []
        pool = self.pools.setdefault(gpu, GPUPool(None))
        member = Member(name, gpu, guarantee, 0, used)
        pool.members[name] = member
        self.members[name] = member
        member.ceiling = self._ceiling(pool, guarantee)
        outs.append((name, Welcome(member.ceiling, self.reclaim_timeout)))
        return outs + self._reclaim_for_owners(pool, now)

    def leave(self, name: str, now: float) -> list[Out]:
        member = self.members.pop(name, None)
        if member is None:
            return []
        pool = self.pools[member.gpu]
        del pool.members[name]
        pool.waiting = deque(w for w in pool.waiting if w.name != name)
        return self._serve_waiters(pool)

    # ---------------------------------------------------------------------------- requests
    def acquire(self, name: str, seq: int, nbytes: int, now: float) -> list[Out]:
        member = self.members.get(name)
        if member is None:
            return [(name, Grant(seq, False, "not registered"))]
        pool = self.pools[member.gpu]
        if member.used + nbytes > member.ceiling:
            member.denied += 1
            return [(name, Grant(seq, False, "ceiling"))]
        if member.used + nbytes + self._waiting_bytes(pool, name) <= member.guarantee:  # owner: always honoured
            pool.waiting.append(_Waiter(name, seq, nbytes))
            return self._serve_waiters(pool) + self._reclaim_for_owners(pool, now)
        if pool.waiting or nbytes > pool.free():
            member.denied += 1
            return [(name, Grant(seq, False, "an owner is waiting" if pool.waiting else "no free memory"))]
        member.used += nbytes
        return [(name, Grant(seq, True))]

    def release(self, name: str, nbytes: int, now: float) -> list[Out]:
        member = self.members.get(name)
        if member is None:
            return []
        member.used = max(0, member.used - nbytes)
        if member.reclaim_target is not None and member.used <= member.reclaim_target:
            member.reclaim_target = member.reclaim_deadline = None
        return self._serve_waiters(self.pools[member.gpu])

    def set_policy(self, max_borrow: int | None, now: float) -> list[Out]:
        """Switches how much every replica may borrow; borrowers now above their ceiling are reclaimed."""
        self.max_borrow = max_borrow
        outs: list[Out] = []
        for m in self.members.values():
            m.ceiling = self._ceiling(self.pools[m.gpu], m.guarantee)
            outs.append((m.name, Limits(m.ceiling)))
            if m.used > m.ceiling:
                outs += self._order_reclaim(m, m.ceiling, now)
        return outs

    def overdue(self, now: float) -> list[str]:
        """Borrowers that did not give memory back in time."""
        return [m.name for m in self.members.values()
                if m.reclaim_deadline is not None and now > m.reclaim_deadline and m.reclaim_target is not None
                and m.used > m.reclaim_target]

    # ---------------------------------------------------------------------------- internals
    @staticmethod
    def _waiting_bytes(pool: GPUPool, name: str) -> int:
        return sum(w.nbytes for w in pool.waiting if w.name == name)

    def _serve_waiters(self, pool: GPUPool) -> list[Out]:
        outs: list[Out] = []
        while pool.waiting and pool.waiting[0].nbytes <= pool.free():
            w = pool.waiting.popleft()
            pool.members[w.name].used += w.nbytes
            outs.append((w.name, Grant(w.seq, True)))
        return outs

    def _reclaim_for_owners(self, pool: GPUPool, now: float) -> list[Out]:
        """Asks borrowers (largest first) for what waiting owners need beyond the free memory."""
        need = sum(w.nbytes for w in pool.waiting) - pool.free()
        need -= sum(m.used - m.reclaim_target for m in pool.members.values() if m.reclaim_target is not None)
        outs: list[Out] = []
        for m in sorted(pool.members.values(), key=lambda m: -m.borrowed):
            if need <= 0:
                break
            level = m.used if m.reclaim_target is None else m.reclaim_target
            give = min(need, level - m.guarantee)
            if give > 0:
                need -= give
                outs += self._order_reclaim(m, level - give, now)
        return outs

    def _order_reclaim(self, m: Member, target: int, now: float) -> list[Out]:
        target = max(m.guarantee, target)
        if m.reclaim_target is not None and m.reclaim_target <= target:
            return []
        m.reclaim_target = target
        if m.reclaim_deadline is None:
            m.reclaim_deadline = now + self.reclaim_timeout
        m.reclaims += 1
        return [(m.name, Reclaim(target))]

    def status(self) -> dict[str, object]:
        return {"max_borrow": self.max_borrow, "reclaim_timeout": self.reclaim_timeout,
                "gpus": {gpu: {"capacity": p.total(), "free": p.free(), "waiting": len(p.waiting)}
                         for gpu, p in self.pools.items()},
                "members": {name: m.to_json() for name, m in self.members.items()}}
