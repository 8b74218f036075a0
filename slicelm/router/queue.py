"""Router-side admission per model: at most ``--max-inflight-per-replica`` requests on a replica; beyond that requests
wait in a per-model queue ordered by (``priority``, arrival), bounded by ``--max-queue-size`` and
``--queue-timeout``; past either bound they are refused (429 with Retry-After)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from slicelm.router.backends import Backend, BackendPool


class QueueRejected(Exception):
    def __init__(self, message: str, retry_after: int, code: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code


class NoReplica(Exception):
    pass


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    future: asyncio.Future[None] = field(compare=False)


class Admission:
    def __init__(self, pool: BackendPool, max_inflight_per_replica: int, max_queue_size: int,
                 queue_timeout: float) -> None:
        assert max_inflight_per_replica >= 0 and max_queue_size >= 0 and queue_timeout > 0
        self.pool = pool
        self.cap = max_inflight_per_replica
        self.max_queue = max_queue_size
        self.timeout = queue_timeout
        self._queues: dict[str, list[_Waiter]] = {}
        self._granted: dict[str, int] = {}
        self._seq = itertools.count()
        pool.add_listener(self.wake)

    def free(self, backends: list[Backend]) -> list[Backend]:
        """The backends below the in-flight cap (all of them without a cap)."""
        if not self.cap:
            return backends
        return [b for b in backends if b.in_flight < self.cap]

    def _capacity(self, model: str) -> float:
        if not self.cap:
            return math.inf
        slots = sum(max(0, self.cap - b.in_flight) for b in self.pool.candidates(model))
        return slots - self._granted.get(model, 0)

    def queued(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    def queue_sizes(self) -> dict[str, int]:
        return {m: len(q) for m, q in self._queues.items()}

    def retry_after(self, model: str, avg_latency: float) -> int:
        replicas = max(1, len(self.pool.candidates(model)))
        waiting = self.queued(model) + 1
        return max(1, min(60, math.ceil(waiting * max(avg_latency, 0.1) / (replicas * max(1, self.cap)))))

    async def acquire(self, model: str, priority: int, avg_latency: Callable[[], float] = lambda: 1.0) -> None:
        """Returns when ``model`` has a free replica slot for this request (the caller takes it at once)."""
        q = self._queues.get(model)
        if not q and self._capacity(model) > 0:
            return
        if self.queued(model) >= self.max_queue:
            raise QueueRejected(f"the queue for model '{model}' is full ({self.max_queue} waiting)",
                                self.retry_after(model, avg_latency()), "queue_full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(priority, next(self._seq), fut)
        heapq.heappush(self._queues.setdefault(model, []), waiter)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except TimeoutError:
            self._drop(model, waiter)
            raise QueueRejected(f"waited {self.timeout:g} s in the queue for model '{model}'",
                                self.retry_after(model, avg_latency()), "queue_timeout") from None
        except asyncio.CancelledError:
            self._drop(model, waiter)
            raise
        self._granted[model] -= 1  # the grant becomes an in-flight request right after we return

    def _drop(self, model: str, waiter: _Waiter) -> None:
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self._granted[model] -= 1  # granted but never used: pass the slot on
            self.wake()
            return
        fut.cancel()
        q = self._queues.get(model, [])
        if waiter in q:
            q.remove(waiter)
            heapq.heapify(q)

    def wake(self) -> None:
        for model, q in self._queues.items():
            if q and not self.pool.candidates(model):
                while q:
                    w = heapq.heappop(q)
                    if not w.future.done():
                        w.future.set_exception(NoReplica(model))
                continue
            while q and self._capacity(model) > 0:
                w = heapq.heappop(q)
                if w.future.done():
                    continue
                self._granted[model] = self._granted.get(model, 0) + 1
                w.future.set_result(None)
