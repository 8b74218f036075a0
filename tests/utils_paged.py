"""Test helpers: build ``AttentionMetadata`` and paged KV caches the way the model runner does.

``PagedBatch`` tracks a fixed set of sequences: each owns physical blocks (contiguous ranges by
default, optionally shuffled), and ``step(new_tokens)`` packs the next tokens of every sequence
into one flat batch, advancing each sequence's computed-token count. This covers whole-prompt
prefill, prefix hits / chunked prefill (a later step with tokens already cached), decode steps
(one token per sequence) and mixed steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from slicelm.layers.attention_metadata import AttentionMetadata


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def assign_blocks(
    max_lens: list[int], block_size: int, first_block: int = 0, shuffle_seed: int | None = None
) -> tuple[list[list[int]], int]:
    """Contiguous physical blocks per sequence (or a shuffled permutation of them).

    Returns (block ids per sequence, number of blocks the cache needs)."""
    counts = [cdiv(n, block_size) for n in max_lens]
    num_blocks = first_block + sum(counts)
    ids = list(range(first_block, num_blocks))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(ids)
    tables, start = [], 0
    for c in counts:
        tables.append(ids[start : start + c])
        start += c
    return tables, num_blocks


def make_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fill: float = 0.0,
) -> list[torch.Tensor]:
    """One ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` cache per layer, filled with ``fill``
    (use NaN to catch reads of slots that were never written)."""
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.full(shape, fill, dtype=dtype, device=device) for _ in range(num_layers)]


def build_metadata(
    num_computed: list[int],
    num_new: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata and positions [T] for a step where sequence i has ``num_computed[i]`` tokens cached
    and ``num_new[i]`` new tokens in the batch."""
    assert len(num_computed) == len(num_new) == len(block_tables)
    seq_lens = [c + n for c, n in zip(num_computed, num_new)]
    positions, slots, qsl = [], [], [0]
    for computed, seq_len, table in zip(num_computed, seq_lens, block_tables):
        assert cdiv(seq_len, block_size) <= len(table), (seq_len, len(table))
        for pos in range(computed, seq_len):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        qsl.append(len(positions))
    max_blocks = max(1, max(len(t) for t in block_tables))
    bt = torch.zeros(len(block_tables), max_blocks, dtype=torch.int32)
    for i, t in enumerate(block_tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    meta = AttentionMetadata(
        num_seqs=len(num_new),
        num_tokens=len(positions),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=bt.to(device),
        max_query_len=max(num_new),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    return meta, torch.tensor(positions, dtype=torch.int64, device=device)


@dataclass
class Step:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata


class PagedBatch:
    """A fixed set of sequences sharing one paged cache layout (block tables never change)."""

    def __init__(
        self,
        max_lens: list[int],
        block_size: int,
        first_block: int = 0,
        shuffle_seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.device = device
        self.block_tables, self.num_blocks = assign_blocks(max_lens, block_size, first_block, shuffle_seed)
        self.num_computed = [0] * len(max_lens)
        self.max_lens = max_lens

    def step(self, new_tokens: list[list[int]]) -> Step:
        """Pack ``new_tokens[i]`` (possibly empty) of every sequence i into one batch and advance."""
        assert len(new_tokens) == len(self.num_computed)
        num_new = [len(t) for t in new_tokens]
        for c, n, m in zip(self.num_computed, num_new, self.max_lens):
            assert c + n <= m, (c, n, m)
        meta, positions = build_metadata(
            self.num_computed, num_new, self.block_tables, self.block_size, self.device
        )
        ids = torch.tensor([t for toks in new_tokens for t in toks], dtype=torch.int64, device=self.device)
        self.num_computed = [c + n for c, n in zip(self.num_computed, num_new)]
        return Step(ids, positions, meta)

    def prefill(self, prompts: list[list[int]]) -> Step:
        """Whole prompts (or the rest of them after a prefix hit) in one step."""
        return self.step([p[c:] for p, c in zip(prompts, self.num_computed)])

    def decode(self, tokens: list[int]) -> Step:
        """One token per sequence."""
        return self.step([[t] for t in tokens])
