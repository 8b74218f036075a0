"""LLMEngine: add requests, step, read outputs. One engine serves one model.

A step = schedule -> run the model -> append sampled tokens -> detokenize -> check stops -> free.
Requests with ``n > 1`` are fanned out into ``n`` sequences that share their prompt's full KV
blocks through the prefix cache, and folded back into one ``RequestOutput``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from slicelm.config import EngineArgs
from slicelm.engine.detokenizer import IncrementalDetokenizer
from slicelm.engine.request import (
    CompletionOutput,
    EmptyPromptError,
    Logprob,
    PoolingOutput,
    PromptTooLongError,
    Request,
    RequestOutput,
    RequestStatus,
)
from slicelm.engine.runner import RunnerOutput, StepHandle
from slicelm.engine.sampler import make_generator
from slicelm.engine.stats import EngineStats
from slicelm.engine.worker import Worker
from slicelm.pooling_params import PoolingParams
from slicelm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


@dataclass
class _Parent:
    """An API-level request: its ``n`` sequences and what they share."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    stream: bool = True  # False: report only when finished (the offline API)
    children: list[Request] = field(default_factory=list)
    detokenizers: list[IncrementalDetokenizer | None] = field(default_factory=list)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.worker = Worker(args)
        self.model_config = self.worker.model_config
        self.cache_config = self.worker.cache_config
        self.scheduler_config = self.worker.scheduler_config
        self.tokenizer = self.worker.tokenizer
        self.scheduler = self.worker.scheduler
        self.eos_token_ids = frozenset(self.worker.eos_token_ids)
        self._parents: dict[str, _Parent] = {}
        self._seq_to_parent: dict[str, _Parent] = {}
        self._counter = itertools.count()
        self._stats = EngineStats()
        self._inflight: StepHandle | None = None  # the launched step not read back yet
        self.async_scheduling = (
            args.async_scheduling if args.async_scheduling is not None else self.worker.device.type == "cuda"
        )

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # --------------------------------------------------------------------------- requests
    def _tokenize(self, prompt: PromptType, truncate: int | None) -> tuple[str | None, list[int]]:
        text: str | None = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                return self._tokenize(prompt["prompt"], truncate)
            else:
                raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer (skip_tokenizer_init=True was set)")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            ids = prompt
        if not isinstance(ids, list | tuple) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        vocab = self.worker.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt_token_ids: every token id must be in [0, {vocab})")
        ids = list(ids)
        if truncate is not None:
            ids = ids[-truncate:]
        return text, ids

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        token_type_ids: list[int] | None = None,
        stream: bool = True,
    ) -> None:
        """Queues a request. ``stream=False``: ``step`` reports it only once it has finished."""
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        pooling = isinstance(params, PoolingParams)
        if pooling != self.model_config.is_pooling:
            raise ValueError(
                f"model {self.model_config.model!r} serves task {self.model_config.task!r}; "
                f"{'pooling' if pooling else 'generation'} requests are not supported by it"
            )
        max_len = self.model_config.max_model_len
        truncate = params.truncate_prompt_tokens
        if pooling:
            params.verify(getattr(self.worker.model, "hidden_size", 0) or 1 << 30, max_len)
            allowed = ("score", "classify") if self.model_config.task == "score" else ("embed",)
            if params.task not in allowed:
                raise ValueError(f"task: model {self.model_config.model!r} serves task {self.model_config.task!r}; "
                                 f"pooling task {params.task!r} is not supported by it (use {allowed[0]!r})")
        if isinstance(prompt, dict) and prompt.get("token_type_ids") is not None:
            token_type_ids = list(prompt["token_type_ids"])
        text, ids = self._tokenize(prompt, max_len if truncate == -1 else truncate)
        if token_type_ids is not None:
            if truncate is not None:
                token_type_ids = token_type_ids[-len(ids):]
            if len(token_type_ids) != len(ids):
                raise ValueError("token_type_ids must be as long as prompt_token_ids")
            num_types = int(self.model_config.hf_config.get("type_vocab_size") or 2)
            if any(not isinstance(t, int) or not 0 <= t < num_types for t in token_type_ids):
                raise ValueError(f"token_type_ids: every id must be in [0, {num_types})")
        if not ids:
            raise EmptyPromptError("prompt: the prompt is empty")
        limit = max_len if pooling else max_len - 1
        if len(ids) > limit:
            raise PromptTooLongError(
                f"prompt: {len(ids)} tokens do not fit in max_model_len={max_len}"
                + ("" if pooling else " with at least one generated token")
            )
        arrival_time = arrival_time if arrival_time is not None else time.time()
        parent = _Parent(request_id, text, ids, params, stream)
        n = 1 if pooling else params.n
        for i in range(n):
            seq_id = request_id if n == 1 else f"{request_id}#{i}"
            generator = None
            if not pooling and params.seed is not None:
                generator = make_generator(params.seed + i, self.worker.device)
            req = Request(
                seq_id,
                ids,
                sampling_params=None if pooling else params,
                pooling_params=params if pooling else None,
                eos_token_ids=self.eos_token_ids,
                priority=priority,
                arrival_time=arrival_time,
                prompt=text,
                token_type_ids=token_type_ids,
                generator=generator,
            )
            parent.children.append(req)
            detok = None
            if not pooling and self.tokenizer is not None and params.detokenize:
                detok = IncrementalDetokenizer(self.tokenizer.hf, params, ids)
            parent.detokenizers.append(detok)
            self._seq_to_parent[seq_id] = parent
            self.scheduler.add_request(req)
        self._parents[request_id] = parent

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            self.scheduler.finish_requests(parent.children, RequestStatus.FINISHED_ABORTED)
            for child in parent.children:
                child.drop_placeholders()
                self._seq_to_parent.pop(child.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # -------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput | PoolingOutput]:
        """One engine iteration. With async scheduling the step launched now is read back during the
        next call: the host schedules and prepares step N+1 while the device computes step N."""
        self._stats.num_steps += 1
        if self.model_config.is_pooling:
            return self._pooling_step()
        touched: dict[str, _Parent] = {}
        if self._inflight is not None and (not self.async_scheduling or self._needs_history()):
            self._read_back(self._inflight, touched)
            self._inflight = None
        sched = self.scheduler.schedule()
        handle = None
        if not sched.is_empty:
            handle = self.worker.execute_model(sched, self._inflight)
            self.scheduler.update_after_step(sched)
            self._stats.num_prompt_tokens += sum(
                max(0, min(s.request.num_prompt_tokens, s.request.num_computed_tokens)
                    - (s.request.num_computed_tokens - s.num_new_tokens))
                for s in sched.scheduled
            )
            for req in handle.requests:
                req.append_placeholder()
        prev, self._inflight = self._inflight, handle
        if prev is not None:
            self._read_back(prev, touched)
        if not self.async_scheduling and self._inflight is not None:
            self._read_back(self._inflight, touched)
            self._inflight = None
        return [self._make_output(p) for p in touched.values() if p.stream or all(c.is_finished for c in p.children)]

    def _needs_history(self) -> bool:
        """Penalties read every output token's value: such steps wait for the one in flight."""
        return any(r.sampling_params.needs_output_history for r in self.scheduler.running)

    def _pooling_step(self) -> list[RequestOutput | PoolingOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = time.time()
        pooled = self.worker.execute_pooling(sched)
        self.scheduler.update_after_step(sched)
        self._count_pooling_step(len(sched.scheduled))
        touched: dict[str, _Parent] = {}
        for s, data in zip(sched.scheduled, pooled):
            s.request.pooled = data
            s.request.metrics.first_token_time = s.request.metrics.last_token_time = now
            self._stats.num_prompt_tokens += s.num_new_tokens
            self._finish(s.request, RequestStatus.FINISHED_STOPPED)
            touched[s.request.request_id] = self._seq_to_parent[s.request.request_id]
        return [self._make_output(p) for p in touched.values()]

    def _count_pooling_step(self, num_requests: int) -> None:
        """Cumulative pooling batch figures in ``EngineStats.extra`` (steps, multi-request steps, largest)."""
        extra = self._stats.extra
        extra["pooling_steps"] = extra.get("pooling_steps", 0.0) + 1
        extra["pooling_requests"] = extra.get("pooling_requests", 0.0) + num_requests
        if num_requests > 1:
            extra["pooling_multi_request_steps"] = extra.get("pooling_multi_request_steps", 0.0) + 1
        extra["pooling_max_batch_requests"] = max(extra.get("pooling_max_batch_requests", 0.0), num_requests)

    def _read_back(self, handle: StepHandle, touched: dict[str, _Parent]) -> None:
        """Reads a launched step's samples, fills the requests' pending tokens, checks stops."""
        result = handle.wait()
        now = time.time()
        for row, (req, token) in enumerate(zip(result.requests, result.sampled_token_ids)):
            if req.is_finished:  # aborted, or stopped by an earlier token while this step ran
                continue
            req.resolve_placeholder(token)
            self._stats.num_generation_tokens += 1
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if result.logprobs is not None and req.logprobs is not None:
                self._append_logprobs(req, result, row)
            parent = self._seq_to_parent[req.request_id]
            touched[parent.request_id] = parent
            detok = parent.detokenizers[parent.children.index(req)]
            status = self._check_stop(req, token, detok)
            if status is not None:
                self._finish(req, status)

    def _append_logprobs(self, req: Request, result: RunnerOutput, row: int) -> None:
        assert result.logprob_token_ids is not None and result.logprobs is not None
        k = req.sampling_params.logprobs or 0
        ids = result.logprob_token_ids[row]
        lps = result.logprobs[row]
        entry: dict[int, Logprob] = {}
        for j, (tid, lp) in enumerate(zip(ids[: k + 1], lps[: k + 1])):
            rank = (result.ranks[row] if result.ranks is not None else None) if j == 0 else j
            if tid not in entry:
                text = self.tokenizer.decode([tid], skip_special_tokens=False) if self.tokenizer else None
                entry[tid] = Logprob(lp, rank, text)
        req.logprobs.append(entry)
        req.cumulative_logprob += lps[0]

    def _check_stop(self, req: Request, token: int, detok: IncrementalDetokenizer | None) -> RequestStatus | None:
        params = req.sampling_params
        num_output = req.num_known_output_tokens
        past_min = num_output >= params.min_tokens
        if past_min and not params.ignore_eos and token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if past_min and params.stop_token_ids and token in params.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if detok is not None:
            stop_str = detok.update([token])
            if stop_str is not None and past_min:
                req.stop_reason = stop_str
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens - req.num_pending >= self.model_config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.drop_placeholders()
        self.scheduler.finish_requests([req], status)
        req.metrics.finished_time = time.time()

    def _make_output(self, parent: _Parent) -> RequestOutput | PoolingOutput:
        finished = all(c.is_finished for c in parent.children)
        if finished:
            self._parents.pop(parent.request_id, None)
            for c in parent.children:
                self._seq_to_parent.pop(c.request_id, None)
        first = parent.children[0]
        if first.is_pooling:
            return PoolingOutput(parent.request_id, parent.prompt_token_ids, first.pooled, True, first.metrics)
        outputs = []
        for i, (child, detok) in enumerate(zip(parent.children, parent.detokenizers)):
            text = detok.get_next_output_text(child.is_finished, delta=False) if detok is not None else ""
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=child.known_output_token_ids(),
                    cumulative_logprob=child.cumulative_logprob if child.logprobs is not None else None,
                    logprobs=child.logprobs,
                    finish_reason=child.status.finish_reason,
                    stop_reason=child.stop_reason,
                )
            )
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            metrics=first.metrics,
            num_cached_tokens=first.num_cached_tokens,
        )

    # ------------------------------------------------------------------------------- stats
    def get_stats(self) -> EngineStats:
        s = self._stats
        kv = self.scheduler.kv_cache
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_cache_usage = kv.usage()
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries = kv.prefix_cache_queries
        s.prefix_cache_hits = kv.prefix_cache_hits
        s.timestamp = time.time()
        snapshot = EngineStats(**{k: getattr(s, k) for k in s.__dataclass_fields__})
        snapshot.extra = dict(s.extra)
        return snapshot

    def next_request_id(self) -> str:
        return str(next(self._counter))
