"""Paged KV cache bookkeeping: a block pool with prefix caching, and per-request block tables.

The GPU/CPU tensors live in the model runner; this module only decides which block ids a request
owns. Prefix caching follows vLLM v1: every *full* block gets a chained hash, sha256 over the
msgpack encoding of ``(parent_hash, token_ids_of_block, extra_keys)`` — a cryptographic hash of an
unambiguous serialization, so two different blocks never share a cache entry, by accident or on
purpose (several tenants share a slice's cache; Python's ``hash`` of ints and tuples is predictable).
A freed block keeps its hash and sits in an LRU free queue, so a later request with the same prefix
takes it back (a "hit") unless it was evicted for reuse first. Only blocks whose contents have been
(or are being, this step) computed are hashed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from slicelm.engine.request import Request

BlockHash = bytes  # 32-byte sha256 digest
_encode = msgspec.msgpack.Encoder().encode


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


def hash_block(parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[Any, ...] | None = None
               ) -> BlockHash:
    """sha256 of the msgpack encoding of (parent hash, token ids, extra keys): self-delimiting, so
    different inputs never serialize alike, and chained, so a block's hash covers its whole prefix."""
    return hashlib.sha256(_encode((parent_hash, token_ids, extra_keys))).digest()


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    """All blocks, the free queue (LRU order: evict from the front) and the hash -> block map.

    With elastic KV only some block ids are backed by memory at a time: ``num_present`` of ``len(blocks)``
    start present; ``add_blocks`` / ``remove_free_blocks`` change which (``num_blocks`` counts the present)."""

    def __init__(self, num_blocks: int, enable_caching: bool, num_present: int | None = None) -> None:
        assert num_blocks > 0
        present = num_blocks if num_present is None else num_present
        self.num_blocks = present
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[:present])
        self.cached: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    def add_blocks(self, block_ids: Iterable[int]) -> None:
        """Makes absent blocks present and free, at the front of the free queue (they hold nothing cached)."""
        for block_id in sorted(block_ids, reverse=True):
            block = self.blocks[block_id]
            assert block.ref_cnt == 0 and block_id not in self.free_queue, f"block {block_id} is present"
            self.free_queue[block_id] = block
            self.free_queue.move_to_end(block_id, last=False)
            self.num_blocks += 1

    def remove_free_blocks(self, block_ids: Iterable[int]) -> None:
        """Makes free blocks absent (their prefix-cache entries are dropped)."""
        for block_id in block_ids:
            block = self.free_queue.pop(block_id)
            self._evict(block)
            self.num_blocks -= 1

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached.get(block_hash)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > len(self.free_queue):
            raise ValueError(f"cannot allocate {n} blocks: only {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            assert block.ref_cnt == 0
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Takes a reference on cache-hit blocks, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops a reference; blocks reaching zero go to the tail of the free queue (last evicted)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        assert block.block_hash is None
        block.block_hash = block_hash
        # Two requests may compute the same block in one step; the first one stays the hit target.
        self.cached.setdefault(block_hash, block)


class KVCacheManager:
    """Allocates blocks to requests and finds their cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 num_present: int | None = None) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching, num_present)
        # Elastic KV: called with a number of missing blocks when the pool runs short; makes up to that many
        # more blocks present and returns how many it added.
        self.grow: Callable[[int], int] | None = None
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_block_ids: dict[str, list[int]] = {}  # kept in step with req_to_blocks (no per-step copies)
        self.num_cached_blocks: dict[str, int] = {}
        # Prefix-cache counters, in tokens (vLLM's prefix_cache_queries / prefix_cache_hits).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live list: do not modify)."""
        return self.req_to_block_ids.get(request_id, [])

    def _update_block_hashes(self, request: Request) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        num_known = len(tokens) - request.num_pending  # a block is hashed once all its tokens are known
        while (len(hashes) + 1) * bs <= num_known:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a request about to be (re)scheduled: (blocks, num_tokens).

        The last token is always recomputed so that the step produces logits for it.
        """
        if not self.enable_caching or request.is_pooling:
            return [], 0
        self._update_block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        if not request.warmup:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVCacheBlock] | None = None
    ) -> bool:
        """Makes room for ``num_new_tokens`` more tokens; False (and no change) if blocks run out."""
        assert num_new_tokens > 0
        bs = self.block_size
        if not new_computed_blocks:
            # Fast path (most decode steps): the tokens fit in the blocks the request already has.
            owned = self.req_to_blocks.get(request.request_id)
            total = request.num_computed_tokens + num_new_tokens
            if owned is not None and total <= len(owned) * bs:
                known = request.num_tokens - request.num_pending
                if self.enable_caching and min(total, known) // bs > self.num_cached_blocks[request.request_id]:
                    self._cache_full_blocks(request, total)
                return True
        new_computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = num_required - len(req_blocks) - len(new_computed_blocks)
        # Hits sitting in the free queue stop being allocatable once we take them.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        short = num_new_blocks - (self.pool.num_free_blocks - num_evictable_hits)
        if short > 0 and self.grow is not None:
            short -= self.grow(short)
        if short > 0:
            if not req_blocks:
                del self.req_to_blocks[request.request_id]
            return False
        self.pool.touch(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_new_blocks) if num_new_blocks > 0 else []
        req_blocks.extend(new_computed_blocks)
        req_blocks.extend(new_blocks)
        ids = self.req_to_block_ids.setdefault(request.request_id, [])
        ids.extend(b.block_id for b in new_computed_blocks)
        ids.extend(b.block_id for b in new_blocks)
        if self.enable_caching:
            self.num_cached_blocks.setdefault(request.request_id, 0)
            self._cache_full_blocks(request, num_computed + num_new_tokens)
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Registers the hashes of blocks that are full once ``num_tokens`` tokens are computed."""
        self._update_block_hashes(request)
        blocks = self.req_to_blocks[request.request_id]
        start = self.num_cached_blocks[request.request_id]
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        for i in range(start, end):
            if blocks[i].block_hash is None:
                self.pool.cache_block(blocks[i], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = max(start, end)

    def free(self, request: Request) -> None:
        """Releases every block of the request (tail first, so its tail is evicted first)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.req_to_block_ids.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        if self.pool.num_free_blocks != self.pool.num_blocks:
            return False
        for block in self.pool.blocks:
            block.block_hash = None
        self.pool.cached.clear()
        return True
