"""CUDA graphs for model steps, all in one shared memory pool; sampling runs after, outside the graphs.

* ``CUDAGraphDecoder``: decode-only steps, one graph per padded batch size. A step of ``n``
  sequences copies its inputs into static buffers, pads to the smallest captured size ``>= n``
  (padding rows write nowhere: slot -1, and read one cached token), and replays the graph, which
  runs the model and the LM head.
* ``CUDAGraphMixed``: any other step (prefill chunks and decode rows together) up to
  ``MIXED_MAX_TOKENS`` tokens, one graph per padded token count, always ``max_num_seqs`` sequence
  slots. Attention must read only device tensors (the Triton backend without flash prefill):
  padded sequences have no query rows, padded tokens belong to no sequence (their rows are never
  attended and their K/V go nowhere), and the LM head runs on ``max_num_seqs`` gathered rows.
  Without it every step that admits a prompt ran eagerly, launch-bound on the host (~20-30 ms for a
  0.6B model where the GPU needs a few ms), which stalled online serving whenever requests arrived.
"""

from __future__ import annotations

import logging
import time

import torch

from slicelm.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)
MIXED_MAX_TOKENS = 8192  # above this a step's GPU time dwarfs the eager launch cost
_MIXED_SIZES = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, then steps of 16 (vLLM's pattern), up to max_num_seqs."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 513, 16)]
    out = [s for s in sizes if s < max_num_seqs]
    return [*out, max_num_seqs]


def mixed_capture_sizes(max_num_batched_tokens: int) -> list[int]:
    """Token counts to capture mixed steps at: a ~1.5x ladder up to min(budget, MIXED_MAX_TOKENS)."""
    top = min(max_num_batched_tokens, MIXED_MAX_TOKENS)
    return [*(s for s in _MIXED_SIZES if s < top), top]


def _capture_all(forward, sizes: list[int], pool, stream: torch.cuda.Stream | None) -> dict[int, torch.cuda.CUDAGraph]:
    """One graph per size, largest first (smaller graphs reuse its memory), in ``pool``, captured on
    ``stream``: give every capture of an engine the same side stream, since the caching allocator keeps
    the warm-ups' freed blocks per stream (a second stream would reserve them all over again)."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    stream = stream or torch.cuda.Stream()
    for n in sorted(sizes, reverse=True):
        with torch.cuda.stream(stream):
            forward(n)  # warm-up (kernel autotuning, lazy inits) outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        # The warm-up's activations sit cached on the side stream; hand them back so that the memory
        # plan's activation + graph-pool reserve covers warm-up and capture (a mixed step of 8192
        # tokens would otherwise hold its activations twice).
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            forward(n)
        graphs[n] = graph
    torch.cuda.synchronize()
    return graphs


def _padded(sizes: list[int], n: int) -> int | None:
    return next((s for s in sizes if s >= n), None)


class StaticBatch:
    """The input buffers a graph reads: ``max_tokens`` token rows and ``max_seqs`` sequence slots.
    ``load`` copies a step in and pads the rows/slots up to the replayed graph's size."""

    def __init__(self, max_tokens: int, max_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device) -> None:
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(max_tokens, dtype=i64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=i64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=i64, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=i32, device=device)
        self.query_start_loc = torch.zeros(max_seqs + 1, dtype=i32, device=device)
        self.block_tables = torch.zeros(max_seqs, -(max_model_len // -block_size), dtype=i32, device=device)

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             token_end: int, seq_end: int, pad_seq_len: int) -> None:
        """Rows ``num_tokens:token_end`` write nowhere (slot -1); slots ``num_seqs:seq_end`` get
        ``pad_seq_len``. ``query_start_loc`` is the caller's (static for decode graphs)."""
        n, s = meta.num_tokens, meta.num_seqs
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:token_end].fill_(-1)
        self.seq_lens[:s].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[s:seq_end].fill_(pad_seq_len)
        self.block_tables[:s, : meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)


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
        self.batch = StaticBatch(max_num_seqs, max_num_seqs, max_model_len, block_size, device)
        self.batch.seq_lens.fill_(1)  # padded slots read one cached token
        torch.arange(max_num_seqs + 1, out=self.batch.query_start_loc)  # one query row per sequence
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # One output buffer for every graph: per-graph outputs would each stay alive (and sum to GBs
        # of logits at vocabularies of 150k).
        vocab = int(model.vocab_size)
        dtype = next(model.parameters()).dtype  # logits stay in the model's dtype; the sampler upcasts
        self.logits = torch.empty(max_num_seqs, vocab, dtype=dtype, device=device)
        self.sizes: list[int] = []
        self.pool_bytes = 0

    def _meta(self, n: int) -> AttentionMetadata:
        b = self.batch
        return AttentionMetadata(
            num_seqs=n,
            num_tokens=n,
            query_start_loc=b.query_start_loc[: n + 1],
            seq_lens=b.seq_lens[:n],
            slot_mapping=b.slot_mapping[:n],
            block_tables=b.block_tables[:n],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(n + 1)),
            seq_lens_cpu=[1] * n,
        )

    def _forward(self, n: int) -> torch.Tensor:
        hidden = self.model(self.batch.input_ids[:n], self.batch.positions[:n], self.kv_caches, self._meta(n))
        return self.model.compute_logits(hidden, out=self.logits[:n])

    @torch.inference_mode()
    def capture(self, sizes: list[int], pool=None, stream: torch.cuda.Stream | None = None) -> None:
        t0 = time.perf_counter()
        before = torch.cuda.memory_reserved()
        self.graphs = _capture_all(self._forward, sizes, pool or torch.cuda.graph_pool_handle(), stream)
        self.sizes = sorted(self.graphs)
        self.pool_bytes = torch.cuda.memory_reserved() - before
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1fs using %.0f MiB",
                    len(self.sizes), self.sizes, time.perf_counter() - t0, self.pool_bytes / 2**20)

    def padded_size(self, n: int) -> int | None:
        return _padded(self.sizes, n)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [n, vocab] of a decode-only step of ``n = meta.num_seqs`` sequences."""
        n = meta.num_seqs
        size = self.padded_size(n)
        assert size is not None and meta.max_query_len == 1
        self.batch.load(input_ids, positions, meta, token_end=size, seq_end=size, pad_seq_len=1)
        self.graphs[size].replay()
        return self.logits[:n]


class CUDAGraphMixed:
    """Graphs for steps that are not decode-only (see the module docstring); shares the decoder's
    logits buffer and memory pool."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], max_num_seqs: int,
                 max_model_len: int, block_size: int, logits: torch.Tensor, max_tokens: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.batch = StaticBatch(max_tokens, max_num_seqs, max_model_len, block_size, logits.device)
        self.logits_indices = torch.zeros(max_num_seqs, dtype=torch.int64, device=logits.device)
        self.logits = logits[:max_num_seqs]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.sizes: list[int] = []
        self.num_replays = 0

    def _meta(self, num_tokens: int) -> AttentionMetadata:
        # max_query_len > 1: the unified kernel; the host-side lists are never read on this path
        b = self.batch
        return AttentionMetadata(
            num_seqs=self.max_num_seqs, num_tokens=num_tokens, query_start_loc=b.query_start_loc,
            seq_lens=b.seq_lens, slot_mapping=b.slot_mapping[:num_tokens], block_tables=b.block_tables,
            max_query_len=num_tokens, max_seq_len=self.max_model_len, query_start_loc_cpu=[], seq_lens_cpu=[],
        )

    def _forward(self, n: int) -> torch.Tensor:
        hidden = self.model(self.batch.input_ids[:n], self.batch.positions[:n], self.kv_caches, self._meta(n))
        return self.model.compute_logits(hidden[self.logits_indices], out=self.logits)

    @torch.inference_mode()
    def capture(self, sizes: list[int], pool, stream: torch.cuda.Stream) -> None:
        t0 = time.perf_counter()
        self.graphs = _capture_all(self._forward, sizes, pool, stream)
        self.sizes = sorted(self.graphs)
        logger.info("captured %d mixed-step CUDA graphs (token counts %s) in %.1fs",
                    len(self.sizes), self.sizes, time.perf_counter() - t0)

    def fits(self, num_tokens: int, num_seqs: int) -> bool:
        return num_seqs <= self.max_num_seqs and _padded(self.sizes, num_tokens) is not None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            logits_indices: torch.Tensor) -> torch.Tensor:
        """Logits [len(logits_indices), vocab] of a step that ``fits``."""
        n, s, k = meta.num_tokens, meta.num_seqs, logits_indices.shape[0]
        size = _padded(self.sizes, n)
        assert size is not None and s <= self.max_num_seqs
        self.batch.load(input_ids, positions, meta, token_end=size, seq_end=self.max_num_seqs, pad_seq_len=0)
        self.batch.query_start_loc[: s + 1].copy_(meta.query_start_loc, non_blocking=True)
        self.batch.query_start_loc[s + 1 :].fill_(n)  # padded sequences: no query rows
        self.logits_indices[:k].copy_(logits_indices, non_blocking=True)
        self.logits_indices[k:].fill_(0)  # stale rows could point past this graph's token count
        self.graphs[size].replay()
        self.num_replays += 1
        return self.logits[:k]
