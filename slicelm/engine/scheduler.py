"""Continuous batching: decides, each step, how many tokens of which requests run.

One step is ``{request: num_new_tokens}`` inside ``max_num_batched_tokens`` tokens and
``max_num_seqs`` sequences. Running requests go first (a decode is one token, an unfinished prompt
a chunk of it), then waiting ones. When KV blocks run out, a running request is preempted by
recompute: its blocks are freed (they stay in the prefix cache) and it goes back to the front of
the queue. No new request is admitted in a step that preempted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from slicelm.config import SchedulerConfig
from slicelm.engine.kv_cache import KVCacheManager
from slicelm.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]
    samples: bool  # this step computes the request's last known token, so it yields a new one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # Sleep mode (vLLM's pause states): "new" admits nothing from the queue, "all" runs nothing at all.
        self.paused: str | None = None

    # ------------------------------------------------------------------------------- queue
    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id}"
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def _sort_key(self, r: Request) -> tuple[int, float]:
        return (r.priority, r.arrival_time)

    def _next_waiting(self) -> Request | None:
        """The next request to admit, passing over those whose grammar still compiles (WAITING_FOR_FSM)."""
        ready = (r for r in self.waiting if r.status != RequestStatus.WAITING_FOR_FSM)
        if self.config.policy == "priority":
            return min(ready, key=self._sort_key, default=None)
        return next(ready, None)

    def _pick_victim(self, candidates: list[Request]) -> Request:
        if self.config.policy == "priority":
            return max(candidates, key=self._sort_key)
        return candidates[-1]

    # ----------------------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        out = SchedulerOutput()
        if self.paused == "all":
            return out
        budget = cfg.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_pending and request.reached_limit(cfg.max_model_len):
                i += 1  # finishes once its pending token is read back; nothing left to compute
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new > 0, f"running request {request.request_id} has nothing to compute"
            if request.is_pooling or self.kv_cache.allocate_slots(request, num_new):
                out.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                i += 1
                continue
            # Out of blocks: preempt among the requests not yet scheduled this step (this one included),
            # so that no block that is only now being filled is left registered in the prefix cache.
            victim = self._pick_victim(self.running[i:])
            self.running.remove(victim)
            self._preempt(victim)
            out.preempted.append(victim)

        if not out.preempted and self.paused is None:
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                request = self._next_waiting()
                if request is None:
                    break
                if request.is_pooling:
                    if request.num_tokens > budget:
                        break  # pooling prompts are never chunked
                    num_computed, hits = 0, []
                elif request.wants_prompt_logprobs:
                    num_computed, hits = 0, []  # every prompt position needs its logits (as vLLM)
                else:
                    hits, num_computed = self.kv_cache.get_computed_blocks(request)
                num_new = min(request.num_tokens - num_computed, budget)
                if not request.is_pooling and not self.kv_cache.allocate_slots(request, num_new, hits):
                    break
                self.waiting.remove(request)
                request.status = RequestStatus.RUNNING
                request.num_computed_tokens = num_computed
                if request.metrics.first_scheduled_time is None:
                    request.num_cached_tokens = num_computed
                    request.metrics.first_scheduled_time = time.time()
                self.running.append(request)
                out.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
        return out

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        samples = not request.is_pooling and request.num_computed_tokens + num_new == request.num_tokens
        return ScheduledRequest(request, num_new, self.kv_cache.block_ids(request.request_id), samples)

    def preempt_requests(self, requests: Iterable[Request]) -> None:
        """Preempts running requests by recompute (elastic KV giving memory back, sleep keeping requests)."""
        for request in list(requests):
            self.running.remove(request)
            self._preempt(request)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------------------ update
    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advances ``num_computed_tokens`` of what ran; sampled tokens are appended by the engine."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens

    def finish_requests(self, requests: Iterable[Request], status: RequestStatus) -> None:
        """Frees finished or aborted requests, wherever they are."""
        assert status.is_finished
        for request in requests:
            if request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self.kv_cache.free(request)
            self.requests.pop(request.request_id, None)
