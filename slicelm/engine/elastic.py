"""Elastic KV: the block pool grows and shrinks with the chunks of ``PagedKVMemory`` that are mapped.

The KV cache manager asks ``grow`` for blocks when its pool runs short; ``service`` runs before every
schedule (and when a broker message wakes an idle core) and

- maps chunks granted late by the broker, and asks for one more chunk ahead of need (free blocks below
  half a chunk), so that growth rarely waits;
- gives chunks back: fully free chunks above the free-block watermark (``elastic`` only), and, when the
  broker sends ``Reclaim`` / a lower ceiling, as many chunks as it takes, preempting (by recompute) the
  requests that hold blocks in the highest chunks. Before any unmap the device is synchronised (a step
  in flight may still touch freed blocks) and the CUDA graphs' block tables are cleared (padded rows
  read block 0: chunk 0 is never given back while awake).

Accounting with the broker (``BrokerLink``): ``held`` = non-KV bytes (``resident``) + mapped chunks, as the
broker's books have it: it grows only by grants and shrinks by releases. Without a broker the engine grows
up to its own guarantee (its planned KV cache) and never borrows. ``elastic=False`` (sleep mode alone)
maps the whole guarantee up front and never shrinks except to sleep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from slicelm.engine.kv_cache import KVCacheManager
from slicelm.engine.kv_memory import PagedKVMemory
from slicelm.engine.request import Request
from slicelm.engine.stats import ElasticKVStats
from slicelm.engine.vmm import VMMError
from slicelm.slicing.broker_client import BrokerLink
from slicelm.slicing.broker_protocol import Grant, Limits, Reclaim

logger = logging.getLogger(__name__)
GROW_WAIT_S = 0.002  # how long a short pool waits for the broker's answer before the step goes on
DENIED_BACKOFF_S = 0.05  # after a denial, do not ask again for this long
SHRINK_CHECK_S = 0.1  # the watermark is checked at most this often (a scan of the mapped chunks)


@dataclass
class ElasticStats:
    reclaims: int = 0  # broker reclaims served
    preempted: int = 0  # requests preempted to give memory back
    denied: int = 0  # growth the broker refused
    peak_chunks: int = 0  # most chunks mapped at once


class ElasticKV:
    def __init__(self, memory: PagedKVMemory, kv: KVCacheManager, guarantee_blocks: int, resident_bytes: int,
                 link: BrokerLink | None = None, elastic: bool = True, watermark: float = 0.1) -> None:
        self.memory = memory
        self.kv = kv
        self.pool = kv.pool
        self.link = link
        self.elastic = elastic
        cb = memory.chunk_blocks
        self.guarantee_chunks = max(1, min(memory.num_chunks, guarantee_blocks // cb))
        self.resident = resident_bytes
        self.held = resident_bytes  # what the broker's books say we hold (kept in step with them)
        self.ceiling_chunks = self.guarantee_chunks
        if link is not None:
            self.ceiling_chunks = self._chunks_under(link.ceiling)
        self.high_water = max(2 * cb, int(watermark * self.guarantee_chunks * cb))
        self.target_chunks: int | None = None
        self.pending: dict[int, int] = {}  # broker seq -> chunks asked for, answer not in yet
        self.pending_resident: dict[int, int] = {}  # broker seq -> bytes a wake-up stopped waiting for
        self.denied_until = 0.0
        self.next_shrink_check = 0.0
        self.asleep = False
        self.stats = ElasticStats()
        self.on_unmap: Callable[[], None] | None = None  # clears the CUDA graphs' block tables
        self.last_map_error: str | None = None  # the driver's answer to the last failed map (in start's error)
        kv.grow = self.grow

    # ------------------------------------------------------------------------------- figures
    @property
    def guarantee_bytes(self) -> int:
        return self.guarantee_chunks * self.memory.chunk_bytes

    @property
    def ceiling_bytes(self) -> int:
        return self.ceiling_chunks * self.memory.chunk_bytes

    def _chunks_under(self, limit: int) -> int:
        return max(1, min(self.memory.num_chunks, (limit - self.resident) // self.memory.chunk_bytes))

    def figures(self) -> ElasticKVStats:
        """For the engine's stats (metrics, ``slicelm ps``)."""
        borrowed = max(0, len(self.memory.mapped) - self.guarantee_chunks) * self.memory.chunk_bytes
        return ElasticKVStats(mapped_bytes=self.memory.mapped_bytes, guarantee_bytes=self.guarantee_bytes,
                              ceiling_bytes=self.ceiling_bytes, borrowed_bytes=borrowed, reclaims=self.stats.reclaims)

    # ------------------------------------------------------------------------------- start / sleep
    def start(self, prepaid: int = 0) -> None:
        """Maps the first chunks: the whole guarantee (static) or one chunk (elastic). ``prepaid``: bytes the
        broker already granted (the whole slice, reserved before loading); what is not needed goes back."""
        want = self.guarantee_chunks if not self.elastic else 1
        if self.link is not None and prepaid:
            self.held = prepaid
            covered = min(want, max(0, (prepaid - self.resident) // self.memory.chunk_bytes))
            self._map(covered)
            want -= covered
            self._give_back(self.held - self.resident - self.memory.mapped_bytes)
        self._acquire_and_map(want, wait_s=self._owner_wait())
        if not self.memory.mapped:
            raise VMMError(f"could not map the first KV chunk ({self.last_map_error or 'the broker granted none'})")

    def settle(self) -> None:
        """Back to what ``start`` mapped, figures cleared (after the warm-up: its growth goes back)."""
        keep = 1 if self.elastic else self.guarantee_chunks
        extra = sorted(self.memory.mapped, reverse=True)[:max(0, len(self.memory.mapped) - keep)]
        self._unmap([c for c in extra if c != 0 and self._chunk_free(c)])
        self.stats = ElasticStats(peak_chunks=len(self.memory.mapped))

    def release_resident(self, nbytes: int) -> None:
        """Sleep gave ``nbytes`` of non-KV memory (weights) back."""
        self.resident -= nbytes
        self._give_back(nbytes)

    def acquire_resident(self, nbytes: int) -> bool:
        """A wake-up wants ``nbytes`` of non-KV memory back (an owner's request: borrowers give way)."""
        if self.link is not None:
            seq, granted = self.link.acquire(nbytes, self._owner_wait())
            if not granted:
                if granted is None:
                    self.pending_resident[seq] = nbytes
                return False
            self.held += nbytes
        self.resident += nbytes
        return True

    def release_all(self) -> None:
        """Sleep: every chunk goes back (no request may hold a block)."""
        assert self.pool.num_free_blocks == self.pool.num_blocks, "sleep with KV blocks in use"
        self._unmap(sorted(self.memory.mapped))
        self.asleep = True

    def restore(self) -> None:
        self.asleep = False
        self.target_chunks = None
        self.start()

    # ------------------------------------------------------------------------------- growth
    def grow(self, short_blocks: int) -> int:
        """The pool lacks ``short_blocks``: maps what the limits and the broker allow; returns blocks added."""
        if self.asleep or self.pending or time.monotonic() < self.denied_until:
            return 0
        want = -(short_blocks // -self.memory.chunk_blocks)
        before = self.pool.num_blocks
        self._acquire_and_map(min(want, self._room()), wait_s=GROW_WAIT_S)
        return self.pool.num_blocks - before

    def _room(self) -> int:
        limit = self.ceiling_chunks if self.target_chunks is None else min(self.ceiling_chunks, self.target_chunks)
        return max(0, limit - len(self.memory.mapped))

    def _owner_wait(self) -> float:
        return (self.link.reclaim_timeout + 2.0) if self.link is not None else 0.0

    def _acquire_and_map(self, chunks: int, wait_s: float) -> None:
        if chunks <= 0:
            return
        if self.link is None:
            self._map(chunks)
            return
        seq, granted = self.link.acquire(chunks * self.memory.chunk_bytes, wait_s)
        if granted is None:
            self.pending[seq] = chunks
        elif granted:
            self.held += chunks * self.memory.chunk_bytes
            self._map(chunks)
        else:
            self.stats.denied += 1
            self.denied_until = time.monotonic() + DENIED_BACKOFF_S

    def _map(self, chunks: int) -> None:
        free = [c for c in range(self.memory.num_chunks) if c not in self.memory.mapped][:chunks]
        for i, c in enumerate(free):
            try:
                self.memory.map_chunk(c)
            except VMMError as e:  # the device ran out despite the books (another process): give the grant back
                logger.warning("mapping KV chunk %d failed (%s): the cache stays at %d chunks", c, e,
                               len(self.memory.mapped))
                self.last_map_error = str(e)
                self._give_back((len(free) - i) * self.memory.chunk_bytes)
                return
            self.pool.add_blocks(self.memory.block_ids(c))
        self.stats.peak_chunks = max(self.stats.peak_chunks, len(self.memory.mapped))

    def _give_back(self, nbytes: int) -> None:
        if self.link is not None and nbytes > 0:
            self.held -= nbytes
            self.link.release(nbytes)

    # ------------------------------------------------------------------------------- service
    def service(self, running: list[Request], preempt: Callable[[Iterable[Request]], None],
                idle: bool = False) -> None:
        """Broker messages, prefetch, watermark and reclaim shrinking (see the module docstring)."""
        if self.link is not None:
            self._handle_messages()
        if self.asleep:
            return
        if idle:
            self.next_shrink_check = 0.0
        excess = 0 if self.target_chunks is None else len(self.memory.mapped) - self.target_chunks
        if excess > 0:
            self._shrink(excess, running, preempt)
            self.stats.reclaims += 1
        if self.target_chunks is not None and len(self.memory.mapped) <= self.target_chunks:
            self.target_chunks = None
        if self.elastic and self.target_chunks is None:
            self._watermark()

    def _handle_messages(self) -> None:
        assert self.link is not None
        for msg in self.link.poll():
            if isinstance(msg, Grant) and msg.seq in self.pending_resident:
                nbytes = self.pending_resident.pop(msg.seq)
                if msg.granted:  # too late for the wake-up that asked: give it back
                    self.held += nbytes
                    self._give_back(nbytes)
            elif isinstance(msg, Grant) and msg.seq in self.pending:
                chunks = self.pending.pop(msg.seq)
                if msg.granted:
                    self.held += chunks * self.memory.chunk_bytes
                    if self.asleep:
                        self._give_back(chunks * self.memory.chunk_bytes)
                    else:
                        self._map(chunks)
                else:
                    self.denied_until = time.monotonic() + DENIED_BACKOFF_S
            elif isinstance(msg, Reclaim):
                self.target_chunks = self._chunks_under(msg.target)
            elif isinstance(msg, Limits):
                self.ceiling_chunks = self._chunks_under(msg.ceiling)
                if len(self.memory.mapped) > self.ceiling_chunks:
                    self.target_chunks = self.ceiling_chunks

    def _watermark(self) -> None:
        cb = self.memory.chunk_blocks
        free = self.pool.num_free_blocks
        if free < cb // 2 and self.link is not None and not self.pending and self._room() > 0 \
                and time.monotonic() >= self.denied_until:
            self._acquire_and_map(1, wait_s=0.0)  # ahead of need: the answer is mapped at the next service
        elif free > self.high_water and time.monotonic() >= self.next_shrink_check:
            self.next_shrink_check = time.monotonic() + SHRINK_CHECK_S
            surplus = (free - self.high_water // 2) // cb
            if surplus > 0:
                self._shrink(surplus, [], lambda _: None)

    def _shrink(self, count: int, running: list[Request], preempt: Callable[[Iterable[Request]], None]) -> None:
        """Unmaps ``count`` chunks: fully free ones first (highest ids), then the highest ones after preempting
        the requests holding blocks there (only when ``running`` is given)."""
        candidates = sorted((c for c in self.memory.mapped if c != 0), reverse=True)
        chosen = [c for c in candidates if self._chunk_free(c)][:count]
        if len(chosen) < count and running:
            more = [c for c in candidates if c not in chosen][:count - len(chosen)]
            victims = [r for r in running if any(self.memory.chunk_of(b) in more for b in
                                                 self.kv.block_ids(r.request_id))]
            if victims:
                preempt(victims)
                self.stats.preempted += len(victims)
            chosen += [c for c in more if self._chunk_free(c)]
        self._unmap(chosen)

    def _chunk_free(self, chunk: int) -> bool:
        blocks = self.pool.blocks
        return all(blocks[b].ref_cnt == 0 for b in self.memory.block_ids(chunk))

    def _unmap(self, chunks: list[int]) -> None:
        if not chunks:
            return
        if self.memory.device.type == "cuda":
            torch.cuda.synchronize(self.memory.device)  # a launched step may still touch these blocks
        for c in chunks:
            self.pool.remove_free_blocks(self.memory.block_ids(c))
            self.memory.unmap_chunk(c)
        if self.on_unmap is not None:
            self.on_unmap()
        self._give_back(len(chunks) * self.memory.chunk_bytes)
