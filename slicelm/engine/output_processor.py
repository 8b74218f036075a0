"""OutputProcessor: turns the core's per-step deltas into ``RequestOutput``s, API side.

Per sequence it detokenizes the new tokens, checks stop strings (a hit finishes the sequence here and
asks the caller to abort it in the core), builds logprob entries with token texts, and folds the
``n`` sequences of a request back into one output. ``stream=True`` requests get **deltas** (the new
text, token ids and logprobs since their last output); ``stream=False`` ones get one output with
everything once they finish. Work per output is proportional to what is new (O(length) per stream).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from slicelm.engine.core_messages import EngineCoreOutput, LogprobEntry
from slicelm.engine.detokenizer import IncrementalDetokenizer
from slicelm.engine.input_processor import ProcessedRequest
from slicelm.engine.request import CompletionOutput, Logprob, PoolingOutput, RequestMetrics, RequestOutput
from slicelm.pooling_params import PoolingParams

Output = RequestOutput | PoolingOutput


class EngineCoreRequestError(RuntimeError):
    """The engine core refused or failed one request."""


@dataclass(eq=False)
class _Seq:
    index: int
    detok: IncrementalDetokenizer | None
    want_logprobs: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_tokens: int = 0
    cumulative_logprob: float = 0.0
    # the delta since the last output (stream) or everything (final-only)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    touched: bool = False


@dataclass(eq=False)
class _Parent:
    req: ProcessedRequest
    stream: bool
    seqs: dict[str, _Seq]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    num_unfinished: int = 0
    error: str | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class ProcessedOutputs:
    outputs: list[Output] = field(default_factory=list)
    abort_in_core: list[str] = field(default_factory=list)  # sequences that hit a stop string
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why the core failed it


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self._seq_parent: dict[str, _Parent] = {}
        self.num_tokens_processed = 0  # token ids taken from core outputs (for O(length) checks)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self.parents)

    def add(self, req: ProcessedRequest, stream: bool) -> None:
        if req.request_id in self.parents:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        params = req.params
        seqs: dict[str, _Seq] = {}
        for i, core_req in enumerate(req.sequences):
            detok = None
            want_lp = False
            if not isinstance(params, PoolingParams):
                want_lp = params.num_logprobs is not None
                if self.tokenizer is not None and params.detokenize:
                    detok = IncrementalDetokenizer(self.tokenizer.hf, params, req.prompt_token_ids)
            seqs[core_req.request_id] = _Seq(i, detok, want_lp, logprobs=[] if want_lp else None)
        parent = _Parent(req, stream, seqs, RequestMetrics(req.arrival_time), num_unfinished=len(seqs))
        self.parents[req.request_id] = parent
        for sid in seqs:
            self._seq_parent[sid] = parent

    def abort(self, request_ids: list[str]) -> list[str]:
        """Forgets requests; returns their unfinished sequence ids (to abort in the core)."""
        out: list[str] = []
        for rid in request_ids:
            parent = self.parents.pop(rid, None)
            if parent is None:
                continue
            for sid, seq in parent.seqs.items():
                self._seq_parent.pop(sid, None)
                if seq.finish_reason is None:
                    out.append(sid)
        return out

    def unfinished_indices(self, request_id: str) -> list[int]:
        parent = self.parents.get(request_id)
        return [] if parent is None else [s.index for s in parent.seqs.values() if s.finish_reason is None]

    # -------------------------------------------------------------------------- outputs
    def process(self, core_outputs: list[EngineCoreOutput], now: float | None = None) -> ProcessedOutputs:
        now = now if now is not None else time.time()
        result = ProcessedOutputs()
        touched: dict[str, _Parent] = {}
        for co in core_outputs:
            parent = self._seq_parent.get(co.request_id)
            if parent is None:  # aborted (or stopped by a stop string) while the core ran on
                continue
            if co.error is not None:
                result.errors[parent.req.request_id] = co.error
                result.abort_in_core += [sid for sid in self.abort([parent.req.request_id]) if sid != co.request_id]
                continue
            m = parent.metrics
            m.num_preemptions += co.num_preemptions  # summed over the request's sequences
            seq = parent.seqs[co.request_id]
            if seq.finish_reason is not None:
                continue
            if co.first_scheduled_time is not None and m.first_scheduled_time is None:
                m.first_scheduled_time = co.first_scheduled_time
                parent.num_cached_tokens = co.num_cached_tokens
            if co.prompt_logprobs is not None and parent.prompt_logprobs is None:  # n > 1: the first one
                parent.prompt_logprobs = [None] + [self._entry_dict(e) for e in co.prompt_logprobs]
            if co.pooled is not None:
                self._finish(parent, seq, "stop", None)
                m.first_token_time = m.last_token_time = now
                parent.metrics.finished_time = now
                result.outputs.append(self._pooling_output(parent, co.pooled))
                continue
            if co.new_token_ids:
                m.first_token_time = m.first_token_time or now
                m.last_token_time = now
            if self._take_tokens(seq, co) and co.finish_reason is None:
                result.abort_in_core.append(co.request_id)
            if seq.finish_reason is None and co.finish_reason is not None:
                self._finish(parent, seq, co.finish_reason, co.stop_reason)
            touched[parent.req.request_id] = parent
        for parent in touched.values():
            out = self._make_output(parent, now)
            if out is not None:
                result.outputs.append(out)
        return result

    def _take_tokens(self, seq: _Seq, co: EngineCoreOutput) -> bool:
        """Appends the new tokens; True when a stop string ended the sequence on one of them."""
        ids = co.new_token_ids
        last = len(ids) - 1
        for k, token in enumerate(ids):
            self.num_tokens_processed += 1
            seq.num_tokens += 1
            seq.touched = True
            seq.token_ids.append(token)
            if seq.logprobs is not None and co.new_logprobs is not None and k < len(co.new_logprobs):
                seq.logprobs.append(self._logprob_dict(co.new_logprobs[k], seq))
            # a sequence the core stopped on an eos / stop token: that token's text is left out
            stop_token = k == last and co.finish_reason == "stop"
            if seq.detok is not None and not stop_token:
                stop_str = seq.detok.update([token])
                if stop_str is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop_str
                    return True
        return False

    def _logprob_dict(self, entry: LogprobEntry, seq: _Seq) -> dict[int, Logprob]:
        if entry[1]:
            seq.cumulative_logprob += entry[1][0]
        return self._entry_dict(entry)

    def _entry_dict(self, entry: LogprobEntry) -> dict[int, Logprob]:
        """{token id: Logprob}: the chosen token with its rank, then the top-k with ranks 1..k."""
        ids, lps, rank = entry
        out: dict[int, Logprob] = {}
        for j, (tid, lp) in enumerate(zip(ids, lps)):
            if tid not in out:
                out[tid] = Logprob(lp, rank if j == 0 else j, self._text_of(tid))
        return out

    def _text_of(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.token_text(token_id)

    def _finish(self, parent: _Parent, seq: _Seq, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason = reason
        if stop_reason is not None:
            seq.stop_reason = stop_reason
        seq.touched = True

    def _pooling_output(self, parent: _Parent, pooled: bytes) -> PoolingOutput:
        self._forget(parent)
        data = torch.frombuffer(bytearray(pooled), dtype=torch.float32)
        return PoolingOutput(parent.req.request_id, parent.req.prompt_token_ids, data, True, parent.metrics)

    def _forget(self, parent: _Parent) -> None:
        self.parents.pop(parent.req.request_id, None)
        for sid in parent.seqs:
            self._seq_parent.pop(sid, None)

    def _make_output(self, parent: _Parent, now: float) -> RequestOutput | None:
        seqs = parent.seqs.values()
        finished = all(s.finish_reason is not None for s in seqs)
        if finished:
            parent.metrics.finished_time = now
            self._forget(parent)
        elif not parent.stream:
            return None
        outputs = [self._completion(s, finished, parent.stream) for s in seqs if s.touched or not parent.stream]
        req = parent.req
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, finished, parent.metrics,
                             parent.num_cached_tokens, parent.prompt_logprobs)

    @staticmethod
    def _completion(seq: _Seq, request_finished: bool, delta: bool) -> CompletionOutput:
        done = seq.finish_reason is not None
        text = seq.detok.get_next_output_text(done, delta=delta) if seq.detok is not None else ""
        out = CompletionOutput(seq.index, text, seq.token_ids, seq.cumulative_logprob if seq.want_logprobs else None,
                               seq.logprobs, seq.finish_reason, seq.stop_reason)
        if delta:  # hand the lists over and start new ones for the next delta
            seq.token_ids = []
            seq.logprobs = [] if seq.want_logprobs else None
        seq.touched = False
        return out
