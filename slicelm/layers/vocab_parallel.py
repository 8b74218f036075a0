"""Vocabulary-parallel embedding and LM head (Megatron's split of the ``[vocab, hidden]`` matrix by rows).

The vocabulary is padded to a multiple of the tensor-parallel size; rank r holds rows ``[r V' / tp,
(r + 1) V' / tp)`` of the padded matrix (padding rows are zero and their logits are cut off). Embedding:
each rank looks up the ids it holds (others give zero rows), one all-reduce sums them. LM head: each
rank computes its vocabulary slice of the logits, an all-gather puts them side by side on every rank (the
driver samples; the others need them only to take part in the same collectives). A tied LM head reads
the embedding's rows: both split the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.distributed.parallel_state import TPGroup, get_tp_group
from slicelm.layers.parallel_linear import Part, TensorSource, copy_checked, materialize


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp: TPGroup | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.tp = tp or get_tp_group()
        self.prefix = prefix
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = -(-num_embeddings // self.tp.world_size)
        self.part = Part(self.tp.rank * per_rank, per_rank)
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim))
        nn.init.normal_(self.weight)

    @property
    def num_real_rows(self) -> int:
        """Rows of this rank that are vocabulary (the rest pad the last rank)."""
        return max(0, min(self.part.length, self.num_embeddings - self.part.start))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.part.start
        held = (local >= 0) & (local < self.part.length)
        out = F.embedding(local.masked_fill(~held, 0), self.weight)
        out.masked_fill_(~held.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def load_weight(self, leaf: str, tensor: TensorSource, shard: int = 0) -> None:
        assert leaf == "weight" and shard == 0, (leaf, shard)
        if tuple(tensor.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"weight {self.prefix}.weight has shape {tuple(tensor.shape)}, expected "
                             f"{(self.num_embeddings, self.embedding_dim)}")
        rows = self.num_real_rows
        if rows < self.part.length:
            self.weight.data[rows:].zero_()
        if rows:
            copy_checked(self.weight.data[:rows], materialize(tensor.narrow(0, self.part.start, rows)),
                         f"{self.prefix}.weight")


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int, tp: TPGroup,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden [N, H] @ W.T`` over the whole vocabulary ``[N, vocab_size]`` (into ``out`` when given)."""
    if tp.world_size == 1:
        return torch.mm(hidden, weight.t(), out=out) if out is not None else F.linear(hidden, weight)
    logits = tp.all_gather(F.linear(hidden, weight), dim=-1)[:, :vocab_size]
    if out is not None:
        return out.copy_(logits)
    return logits


class ParallelLMHead(VocabParallelEmbedding):
    """The untied LM head: the same row split; ``compute_logits`` gathers the vocabulary."""

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return vocab_parallel_logits(hidden, self.weight, self.num_embeddings, self.tp, out)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead computes logits (compute_logits), it embeds nothing")
