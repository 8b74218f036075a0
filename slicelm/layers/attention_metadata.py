"""What the model runner tells attention about one step's flattened batch.

A step packs the new tokens of ``num_seqs`` sequences into one flat batch of ``num_tokens``
tokens (sequence after sequence). Sequence ``i`` owns query rows
``query_start_loc[i]:query_start_loc[i+1]``; those are the *last* tokens of its context, whose
full length (cached prefix + new tokens) is ``seq_lens[i]``. So query row ``j`` of sequence ``i``
sits at position ``seq_lens[i] - q_len_i + j`` and attends causally to positions ``0..that``.

The paged KV cache of one layer is one tensor ``[2, num_blocks, block_size, num_kv_heads,
head_dim]`` (index 0 = K, 1 = V). Token ``t`` of the batch is written to flat slot
``slot_mapping[t] = block_id * block_size + offset``; a negative slot means "padding, do not
write". Sequence ``i``'s logical block ``b`` lives in physical block ``block_tables[i, b]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    num_seqs: int
    num_tokens: int
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], on the model's device
    seq_lens: torch.Tensor  # int32 [num_seqs]: cached + new tokens per sequence
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]; unused entries are 0
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """One implementation per device family; all compute the same function."""

    name: str

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,  # a query at position p sees keys in (p - window, p]
        soft_cap: float | None = None,  # logits s -> soft_cap * tanh(s / soft_cap) (after scaling)
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store key/value at ``meta.slot_mapping``, then attend over each sequence's context."""
        ...
