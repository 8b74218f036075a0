"""The KV cache's memory as chunks of blocks mapped on demand (elastic KV, sleep mode).

One virtual range holds the largest KV cache the engine may ever have (``max_blocks``). Every layer keeps
the usual tensor ``[2, max_blocks, block_size, num_kv_heads, head_dim]`` (K then V, contiguous), so the
attention kernels, the torch reference and CUDA graphs see one fixed tensor per layer. Inside the range
the layer's K half and V half are two *regions* of ``max_blocks`` blocks each, one after the other
(``2 × num_layers`` regions). Block ids are grouped into *chunks* of ``chunk_blocks`` consecutive ids;
mapping chunk ``c`` maps the same page-aligned slice of every region, so growing the pool by one chunk
maps ``2 × num_layers`` pieces of ``chunk_region_bytes`` and nothing else. Blocks of an unmapped chunk must
never be handed out (the KV cache manager only sees mapped chunks' blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slicelm.engine.vmm import VirtualRange, reserve


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def region_block_bytes(self) -> int:
        """Bytes of one block in one region (K or V of one layer)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, K and V (what one block id costs)."""
        return 2 * self.num_layers * self.region_block_bytes


def chunk_blocks_for(layout: KVLayout, granularity: int, min_chunk_blocks: int = 16) -> int:
    """Smallest block count whose bytes per region are a multiple of the page granularity (and at least
    ``min_chunk_blocks``, so that a chunk is not a handful of tiny mappings)."""
    per_page = granularity // math.gcd(granularity, layout.region_block_bytes)
    return per_page * max(1, -(min_chunk_blocks // -per_page))


class PagedKVMemory:
    """Per-layer KV tensors over one virtual range; physical memory in chunks (see module docstring)."""

    def __init__(self, layout: KVLayout, max_blocks: int, device: torch.device,
                 vrange: VirtualRange | None = None, min_chunk_blocks: int = 16) -> None:
        self.layout = layout
        self.device = device
        granularity = vrange.granularity if vrange is not None else _probe_granularity(device)
        self.chunk_blocks = chunk_blocks_for(layout, granularity, min_chunk_blocks)
        self.num_chunks = -(max_blocks // -self.chunk_blocks)
        self.max_blocks = self.num_chunks * self.chunk_blocks
        self.chunk_region_bytes = self.chunk_blocks * layout.region_block_bytes
        self.region_bytes = self.max_blocks * layout.region_block_bytes
        self.num_regions = 2 * layout.num_layers
        self.range = vrange if vrange is not None else reserve(self.num_regions * self.region_bytes, device)
        assert self.range.granularity == granularity and self.chunk_region_bytes % granularity == 0
        shape = (2, self.max_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.kv_caches = [self.range.tensor(2 * i * self.region_bytes, shape, layout.dtype)
                          for i in range(layout.num_layers)]
        self.mapped: set[int] = set()

    @property
    def chunk_bytes(self) -> int:
        """Physical bytes one chunk costs (all layers, K and V)."""
        return self.num_regions * self.chunk_region_bytes

    @property
    def mapped_bytes(self) -> int:
        return len(self.mapped) * self.chunk_bytes

    def chunk_of(self, block_id: int) -> int:
        return block_id // self.chunk_blocks

    def block_ids(self, chunk: int) -> range:
        return range(chunk * self.chunk_blocks, (chunk + 1) * self.chunk_blocks)

    def map_chunk(self, chunk: int) -> None:
        """Backs chunk ``chunk`` with physical memory in every region (all or nothing)."""
        assert 0 <= chunk < self.num_chunks and chunk not in self.mapped
        done: list[int] = []
        try:
            for r in range(self.num_regions):
                offset = r * self.region_bytes + chunk * self.chunk_region_bytes
                self.range.map(offset, self.chunk_region_bytes)
                done.append(offset)
        except BaseException:
            for offset in done:
                self.range.unmap(offset)
            raise
        self.mapped.add(chunk)
        if self.device.type == "cuda":  # fresh device pages hold garbage; the CPU's read as zeros
            for kv in self.kv_caches:
                kv[:, chunk * self.chunk_blocks:(chunk + 1) * self.chunk_blocks].zero_()

    def unmap_chunk(self, chunk: int) -> None:
        """Gives chunk ``chunk``'s memory back; the caller made sure no kernel can still touch it."""
        self.mapped.remove(chunk)
        for r in range(self.num_regions):
            self.range.unmap(r * self.region_bytes + chunk * self.chunk_region_bytes)

    def close(self) -> None:
        self.mapped.clear()
        self.range.close()


def _probe_granularity(device: torch.device) -> int:
    if device.type == "cuda":
        from slicelm.engine.vmm import CudaVirtualRange

        probe = CudaVirtualRange(1, device)
        try:
            return probe.granularity
        finally:
            probe.close()
    import mmap

    return mmap.PAGESIZE
