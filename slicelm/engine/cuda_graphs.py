"""CUDA graphs for decode steps: one graph per padded batch size, all in one shared memory pool.

A decode step of ``n`` sequences copies its inputs into static buffers, pads to the smallest
captured size ``>= n`` (padding rows write nowhere: slot -1, and read one cached token), and
replays the graph, which runs the model and the LM head. Sampling runs after, outside the graph.
"""

from __future__ import annotations

import logging
import time

import torch

from slicelm.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, then steps of 16 (vLLM's pattern), up to max_num_seqs."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 513, 16)]
    out = [s for s in sizes if s < max_num_seqs]
    return [*out, max_num_seqs]


class CUDAGraphDecoder:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        max_blocks = -(max_model_len // -block_size)
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(max_num_seqs, dtype=i64, device=device)
        self.positions = torch.zeros(max_num_seqs, dtype=i64, device=device)
        self.slot_mapping = torch.full((max_num_seqs,), -1, dtype=i64, device=device)
        self.seq_lens = torch.ones(max_num_seqs, dtype=i32, device=device)
        self.query_start_loc = torch.arange(max_num_seqs + 1, dtype=i32, device=device)
        self.block_tables = torch.zeros(max_num_seqs, max_blocks, dtype=i32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # One output buffer for every graph: per-graph outputs would each stay alive (and sum to GBs
        # of logits at vocabularies of 150k).
        vocab = int(model.vocab_size)
        dtype = next(model.parameters()).dtype  # logits stay in the model's dtype; the sampler upcasts
        self.logits = torch.empty(max_num_seqs, vocab, dtype=dtype, device=device)
        self.sizes: list[int] = []
        self.pool_bytes = 0

    def _meta(self, n: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_seqs=n,
            num_tokens=n,
            query_start_loc=self.query_start_loc[: n + 1],
            seq_lens=self.seq_lens[:n],
            slot_mapping=self.slot_mapping[:n],
            block_tables=self.block_tables[:n],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(n + 1)),
            seq_lens_cpu=[1] * n,
        )

    def _forward(self, n: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, self._meta(n))
        return self.model.compute_logits(hidden, out=self.logits[:n])

    @torch.inference_mode()
    def capture(self, sizes: list[int]) -> None:
        t0 = time.perf_counter()
        before = torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for n in sorted(sizes, reverse=True):  # largest first: smaller graphs reuse its memory
            with torch.cuda.stream(stream):
                self._forward(n)  # warm-up (kernel autotuning, lazy inits) outside the graph
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._forward(n)
            self.graphs[n] = graph
        torch.cuda.synchronize()
        self.sizes = sorted(self.graphs)
        self.pool_bytes = torch.cuda.memory_reserved() - before
        logger.info("captured %d CUDA graphs (batch sizes %s) in %.1fs using %.0f MiB",
                    len(self.sizes), self.sizes, time.perf_counter() - t0, self.pool_bytes / 2**20)

    def padded_size(self, n: int) -> int | None:
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [n, vocab] of a decode-only step of ``n = meta.num_seqs`` sequences."""
        n = meta.num_seqs
        size = self.padded_size(n)
        assert size is not None and meta.max_query_len == 1
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[n:size].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.logits[:n]
