"""ModelRunner: turns a scheduled step into tensors, runs the model, samples.

The runner owns the model, the paged KV cache tensors and the sampler. It knows nothing about
queues or stop conditions: the engine gives it a ``SchedulerOutput`` and gets back one sampled
token (plus logprobs if asked) per request that reached the end of its known tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from slicelm.distributed.parallel_state import get_tp_group
from slicelm.engine.cuda_graphs import (
    MIXED_MAX_TOKENS,
    CUDAGraphDecoder,
    CUDAGraphMixed,
    capture_sizes,
    mixed_capture_sizes,
)
from slicelm.engine.prompt_logprobs import PromptLogprobsJob, plan_jobs, run_jobs
from slicelm.engine.request import PLACEHOLDER, Request
from slicelm.engine.sampler import Sampler, SamplingMetadata
from slicelm.engine.scheduler import ScheduledRequest, SchedulerOutput
from slicelm.engine.structured_output.bitmask import apply_bitmask_
from slicelm.layers.attention_metadata import AttentionMetadata
from slicelm.sampling_params import SamplingParams

# sampling requests -> their grammar mask (int32 [rows, ceil(V/32)] on the host) or None; or a future of it, being
# filled on another thread: the step's sampling then waits until the step is resolved (``StepHandle.resolve``)
BitmaskFn = Callable[[list[Request]], "torch.Tensor | Future[torch.Tensor | None] | None"]


def supports_mixed_graphs(model: torch.nn.Module) -> bool:
    """Whether any step can be captured: every attention backend declares ``captures_mixed_batches``."""
    from slicelm.layers.attention import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    return bool(layers) and all(getattr(m.backend, "captures_mixed_batches", False) for m in layers)


@dataclass
class RunnerOutput:
    """Per sampling request, in the order of the scheduled requests that sample."""

    requests: list[Request]
    sampled_token_ids: list[int]
    # [num_requests, 1 + k]: column 0 is the sampled token, then the top-k (only when asked).
    logprob_token_ids: list[list[int]] | None = None
    logprobs: list[list[float]] | None = None
    ranks: list[int] | None = None


@dataclass
class StepHandle:
    """A launched step. Its sampled ids stay on the device (the next step may read them as inputs)
    while a copy travels to pinned host memory; ``wait`` blocks until just this step is done."""

    requests: list[Request]
    sampled: torch.Tensor | None = None  # [B] int64 on the device
    host: dict[str, torch.Tensor] = field(default_factory=dict)
    event: torch.cuda.Event | None = None
    row_of: dict[str, int] = field(default_factory=dict)
    # a launched forward pass whose sampling waits for its grammar mask: ``resolve`` samples it
    finish: Callable[[], StepHandle] | None = None

    def resolve(self) -> None:
        """Samples a deferred step (its grammar mask was filled while the host went on with other work)."""
        if self.finish is not None:
            done, self.finish = self.finish(), None
            self.sampled, self.host, self.event = done.sampled, done.host, done.event

    def wait(self) -> RunnerOutput:
        if not self.requests:
            return RunnerOutput([], [])
        self.resolve()
        if self.event is not None:
            self.event.synchronize()
        h = self.host
        out = RunnerOutput(self.requests, h["sampled"].tolist())
        if "logprobs" in h:
            out.logprob_token_ids = h["logprob_token_ids"].tolist()
            out.logprobs = h["logprobs"].tolist()
            out.ranks = h["ranks"].tolist() if "ranks" in h else None
        return out


@dataclass
class HostBatch:
    """A step's inputs as host arrays. The driver builds it from the scheduled requests; with tensor
    parallelism it goes as it is to the other ranks, and every rank turns it into the same device tensors
    (``ModelRunner.to_device``). A token still pending (sampled by the step in flight) is named by its
    position and its row in that step's sampled tensor, which every rank holds on the device."""

    input_ids: np.ndarray  # int64 [T] (pending positions hold a placeholder)
    positions: np.ndarray  # int64 [T]
    query_start_loc: np.ndarray  # int32 [S + 1]
    seq_lens: np.ndarray  # int32 [S]
    slot_mapping: np.ndarray  # int64 [T]
    block_tables: np.ndarray  # int32 [S, max blocks]
    logits_indices: np.ndarray  # int64: rows of the hidden states that sample
    pending_pos: np.ndarray  # int64
    pending_rows: np.ndarray  # int64
    prompt_jobs: list[PromptLogprobsJob] = field(default_factory=list)

    @property
    def num_sampling(self) -> int:
        return len(self.logits_indices)

    def for_followers(self) -> HostBatch:
        """The batch without request objects (what the other ranks need)."""
        jobs = [PromptLogprobsJob(None, j.rows, j.targets, j.k) for j in self.prompt_jobs]
        return HostBatch(**{**self.__dict__, "prompt_jobs": jobs})


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states that sample
    sampling: list[ScheduledRequest]  # the driver's; empty on the other ranks
    prompt_logprobs: list[PromptLogprobsJob] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        vocab_size: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.vocab_size = vocab_size
        self.sampler = Sampler()
        self.pin = device.type == "cuda"
        self.graphs: CUDAGraphDecoder | None = None
        self.mixed_graphs: CUDAGraphMixed | None = None
        self.tp = get_tp_group()
        self._followed_sampled: torch.Tensor | None = None  # a follower's copy of the last step's samples

    def enable_cuda_graphs(self, max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int,
                           mixed_max_tokens: int = MIXED_MAX_TOKENS) -> None:
        """Decode graphs always; mixed-step graphs (up to ``mixed_max_tokens``, what the memory plan reserved
        for) when every attention layer reads only device tensors."""
        self.graphs = CUDAGraphDecoder(
            self.model, self.kv_caches, max_num_seqs, max_model_len, self.block_size, self.device
        )
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        if supports_mixed_graphs(self.model):
            top = min(max_num_batched_tokens, mixed_max_tokens, MIXED_MAX_TOKENS)
            self.mixed_graphs = CUDAGraphMixed(self.model, self.kv_caches, max_num_seqs, max_model_len,
                                               self.block_size, self.graphs.logits, top)
            self.mixed_graphs.capture(mixed_capture_sizes(top), pool, stream)
        self.graphs.capture(capture_sizes(max_num_seqs), pool, stream)

    def clear_graph_block_tables(self) -> None:
        """Elastic KV gave chunks back: stale block ids in the graphs' static tables (read by padded rows)
        now point to block 0, which stays mapped."""
        for graphs in (self.graphs, self.mixed_graphs):
            if graphs is not None:
                graphs.batch.block_tables.zero_()

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int, sample: bool = True) -> None:
        """One step of the largest shape (writing nowhere in the cache), sampling included if asked."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        q_lens = np.full(num_seqs, num_tokens // num_seqs, dtype=np.int64)
        q_lens[: num_tokens % num_seqs] += 1
        qsl = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(q_lens, out=qsl[1:])
        seq_index = np.repeat(np.arange(num_seqs), q_lens)
        positions = np.arange(num_tokens, dtype=np.int64) - qsl[:-1][seq_index]
        max_len = int(q_lens.max())
        meta = AttentionMetadata(
            num_seqs=num_seqs,
            num_tokens=num_tokens,
            query_start_loc=self._to_device(qsl),
            seq_lens=self._to_device(q_lens.astype(np.int32)),
            slot_mapping=self._to_device(np.full(num_tokens, -1, dtype=np.int64)),
            block_tables=self._to_device(np.zeros((num_seqs, -(max_len // -self.block_size)), dtype=np.int32)),
            max_query_len=max_len,
            max_seq_len=max_len,
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=q_lens.tolist(),
        )
        input_ids = self._to_device(np.zeros(num_tokens, dtype=np.int64))
        hidden = self.model(input_ids, self._to_device(positions), self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[self._to_device(qsl[1:].astype(np.int64) - 1)])
        if sample:
            self._profile_sampler(logits, num_seqs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _profile_sampler(self, logits: torch.Tensor, num_seqs: int) -> None:
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=5)
        meta_s = SamplingMetadata.build(
            params=[params] * num_seqs, prompt_token_ids=[[0]] * num_seqs, output_token_ids=[[]] * num_seqs,
            generators=[None] * num_seqs, vocab_size=self.vocab_size, device=self.device,
        )
        self.sampler(logits.float(), meta_s)

    # --------------------------------------------------------------------------- inputs
    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.pin:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def prepare_inputs(self, scheduled: list[ScheduledRequest], prev: StepHandle | None = None) -> StepInputs:
        """Batch tensors for a step. A token still pending on the device (sampled by ``prev``, the
        step in flight) is taken from ``prev.sampled`` on the device: no wait for the host."""
        if prev is not None:
            prev.resolve()
        inputs = self.to_device(self.build_batch(scheduled, prev), prev.sampled if prev is not None else None)
        inputs.sampling = [s for s in scheduled if s.samples]
        return inputs

    def build_batch(self, scheduled: list[ScheduledRequest], prev: StepHandle | None = None) -> HostBatch:
        """The step's host arrays (see ``HostBatch``)."""
        bs = self.block_size
        num_seqs = len(scheduled)
        q_lens = np.array([s.num_new_tokens for s in scheduled], dtype=np.int64)
        starts = np.array([s.request.num_computed_tokens for s in scheduled], dtype=np.int64)
        seq_lens = starts + q_lens
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(q_lens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])

        input_ids = np.empty(num_tokens, dtype=np.int64)
        pending_pos, pending_rows = [], []
        for s, a, b in zip(scheduled, query_start_loc[:-1], query_start_loc[1:]):
            r = s.request
            start = r.num_computed_tokens
            input_ids[a:b] = r.all_token_ids[start : start + (b - a)]
            if r.num_pending:
                assert r.num_pending == 1 and prev is not None and r.all_token_ids[start + (b - a) - 1] == PLACEHOLDER
                pending_pos.append(b - 1)
                pending_rows.append(prev.row_of[r.request_id])
        # positions: for every token, its index within its sequence
        seq_index = np.repeat(np.arange(num_seqs), q_lens)
        positions = np.arange(num_tokens, dtype=np.int64) - query_start_loc[:-1][seq_index] + starts[seq_index]

        max_blocks = max(len(s.block_ids) for s in scheduled)
        block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        for i, s in enumerate(scheduled):
            block_tables[i, : len(s.block_ids)] = s.block_ids
        slot_mapping = block_tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        logits_indices = np.array(
            [query_start_loc[i + 1] - 1 for i, s in enumerate(scheduled) if s.samples], dtype=np.int64
        )
        return HostBatch(
            input_ids=input_ids, positions=positions, query_start_loc=query_start_loc,
            seq_lens=seq_lens.astype(np.int32), slot_mapping=slot_mapping, block_tables=block_tables,
            logits_indices=logits_indices, pending_pos=np.array(pending_pos, dtype=np.int64),
            pending_rows=np.array(pending_rows, dtype=np.int64),
            prompt_jobs=plan_jobs(scheduled, query_start_loc, self.vocab_size),
        )

    def to_device(self, batch: HostBatch, prev_sampled: torch.Tensor | None) -> StepInputs:
        """Device tensors of ``batch``; pending tokens are gathered from ``prev_sampled`` on the device."""
        meta = AttentionMetadata(
            num_seqs=len(batch.seq_lens),
            num_tokens=len(batch.input_ids),
            query_start_loc=self._to_device(batch.query_start_loc),
            seq_lens=self._to_device(batch.seq_lens),
            slot_mapping=self._to_device(batch.slot_mapping),
            block_tables=self._to_device(batch.block_tables),
            max_query_len=int(np.diff(batch.query_start_loc).max()),
            max_seq_len=int(batch.seq_lens.max()),
            query_start_loc_cpu=batch.query_start_loc.tolist(),
            seq_lens_cpu=batch.seq_lens.tolist(),
        )
        input_ids = self._to_device(batch.input_ids)
        if len(batch.pending_pos):
            assert prev_sampled is not None
            rows = self._to_device(batch.pending_rows)
            input_ids[self._to_device(batch.pending_pos)] = prev_sampled[rows]
        return StepInputs(
            input_ids=input_ids,
            positions=self._to_device(batch.positions),
            attn_meta=meta,
            logits_indices=self._to_device(batch.logits_indices),
            sampling=[],
            prompt_logprobs=batch.prompt_jobs,
        )

    # ------------------------------------------------------------------------------ run
    def run_model(self, inputs: StepInputs) -> torch.Tensor:
        meta = inputs.attn_meta
        if (
            self.graphs is not None
            and not inputs.prompt_logprobs
            and meta.is_decode_only
            and inputs.logits_indices.shape[0] == meta.num_seqs
            and self.graphs.padded_size(meta.num_seqs) is not None
        ):
            return self.graphs.run(inputs.input_ids, inputs.positions, meta)
        mixed = self.mixed_graphs
        if mixed is not None and not inputs.prompt_logprobs and mixed.fits(meta.num_tokens, meta.num_seqs):
            return mixed.run(inputs.input_ids, inputs.positions, meta, inputs.logits_indices)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_meta)
        if inputs.prompt_logprobs:
            run_jobs(self.model, hidden, inputs.prompt_logprobs)
        return self.model.compute_logits(hidden[inputs.logits_indices])

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput, prev: StepHandle | None = None,
                      grammar_bitmask: BitmaskFn | None = None) -> StepHandle:
        """Launches a step; on a GPU it returns before the step has run."""
        batch = self.build_batch(sched.scheduled, prev)
        return self.execute_batch(batch, [s.request for s in sched.scheduled if s.samples], prev, grammar_bitmask)

    @torch.inference_mode()
    def execute_batch(self, batch: HostBatch, requests: list[Request], prev: StepHandle | None,
                      grammar_bitmask: BitmaskFn | None = None) -> StepHandle:
        """The driver's half of a step (after ``batch`` went to the other ranks): run, sample, share the
        sampled ids with the other ranks (their next step may read them as inputs). ``grammar_bitmask``
        (structured outputs) is called once the forward pass is launched, with the sampling requests; the
        int32 host mask it returns is applied to the logits before sampling, outside any CUDA graph. When it
        returns a future (the mask is being filled on another thread), sampling is deferred to
        ``StepHandle.resolve``: the next step's inputs or the read-back resolve it."""
        if prev is not None:
            prev.resolve()
        inputs = self.to_device(batch, prev.sampled if prev is not None else None)
        if not requests:
            self.run_model(inputs)  # a prefill chunk that does not reach the end of its prompt
            return StepHandle([])
        logits = self.run_model(inputs)
        mask = grammar_bitmask(requests) if grammar_bitmask is not None else None
        if isinstance(mask, Future):
            pending = mask
            return StepHandle(requests, row_of={r.request_id: i for i, r in enumerate(requests)},
                              finish=lambda: self._sample_masked(logits, requests, pending.result()))
        return self._sample_masked(logits, requests, mask)

    def _sample_masked(self, logits: torch.Tensor, requests: list[Request], mask: torch.Tensor | None) -> StepHandle:
        if mask is not None:
            apply_bitmask_(logits, mask.to(logits.device, non_blocking=True))
        handle = self.sample(logits, requests)
        assert handle.sampled is not None and handle.sampled.dtype == torch.int64  # what the followers receive
        self.tp.broadcast(handle.sampled)
        return handle

    @torch.inference_mode()
    def follow_batch(self, batch: HostBatch) -> None:
        """Another rank's half of the driver's step: the same model run (same collectives), no sampling;
        receives the sampled ids the driver shares."""
        inputs = self.to_device(batch, self._followed_sampled)
        self.run_model(inputs)
        self._followed_sampled = None
        if batch.num_sampling:
            sampled = torch.empty(batch.num_sampling, dtype=torch.int64, device=self.device)
            self._followed_sampled = self.tp.broadcast(sampled)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> StepHandle:
        meta = SamplingMetadata.build(
            params=[r.sampling_params for r in requests],
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
            generators=[r.generator for r in requests],
            vocab_size=self.vocab_size,
            device=logits.device,
            eos_token_ids=requests[0].eos_token_ids,
        )
        out = self.sampler(logits, meta)
        device_tensors = {"sampled": out.sampled_token_ids}
        if out.logprobs is not None:
            device_tensors.update(logprob_token_ids=out.logprob_token_ids, logprobs=out.logprobs)
            if out.ranks is not None:
                device_tensors["ranks"] = out.ranks
        handle = StepHandle(requests, out.sampled_token_ids, row_of={r.request_id: i for i, r in enumerate(requests)})
        if self.device.type == "cuda":
            for name, t in device_tensors.items():
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                handle.host[name] = host
            handle.event = torch.cuda.Event()
            handle.event.record()
        else:
            handle.host = device_tensors
        return handle
