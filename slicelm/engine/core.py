"""EngineCore: scheduler + KV cache + model runner of one model; takes sequences, steps, hands out deltas.

A step = schedule -> run the model -> append sampled tokens -> check token stops -> free. It knows
token ids only: text (detokenization, stop strings, logprob texts) is the API side's work
(``OutputProcessor``), which aborts a sequence here once one of its stop strings appears. With async
scheduling the step launched now is read back during the next call, so the host schedules step N+1
while the device computes step N. The same object runs in the offline ``LLMEngine`` (in-process) and
in the engine-core process behind the server (``core_proc``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable

from slicelm.config import EngineArgs
from slicelm.engine.core_messages import EngineCoreInfo, EngineCoreOutput, EngineCoreRequest, UtilityReply
from slicelm.engine.executor import make_executor
from slicelm.engine.request import Request, RequestStatus
from slicelm.engine.runner import RunnerOutput, StepHandle
from slicelm.engine.sampler import make_generator
from slicelm.engine.sleep_mode import SleepMode
from slicelm.engine.stats import EngineStats, PoolingStats
from slicelm.engine.structured_output import StructuredOutputManager
from slicelm.engine.warmup import WarmupReport, warm_up
from slicelm.engine.worker import Worker

logger = logging.getLogger(__name__)
GRAMMAR_WAIT_S = 0.02  # an idle core waits this long at most on compiling grammars before it looks again


class EngineCore:
    def __init__(self, args: EngineArgs, exit_on_worker_failure: bool = False) -> None:
        self.args = args
        # one Worker here, or the driver of tensor-parallel worker processes
        self.executor = make_executor(args, exit_on_worker_failure)
        self.worker = self.executor.driver
        self.scheduler = self.worker.make_scheduler()
        self.model_config = self.worker.model_config
        self.cache_config = self.worker.cache_config
        self.scheduler_config = self.worker.scheduler_config
        self.requests: dict[str, Request] = {}
        self._stats = EngineStats()
        self._inflight: StepHandle | None = None  # the launched step not read back yet
        self.async_scheduling = (
            args.async_scheduling if args.async_scheduling is not None else self.worker.device.type == "cuda"
        )
        self.structured = None if self.model_config.is_pooling else make_structured_manager(args, self.worker)
        self._waiting_for_grammar: list[Request] = []
        self.elastic = self.worker.elastic  # KV in chunks mapped on demand (elastic KV / sleep mode), or None
        self.sleep_mode = SleepMode(self)
        self._replies: list[UtilityReply] = []
        self._extra_outputs: list[EngineCoreOutput] = []  # made outside a step (requests a sleep aborted)
        self.warmup: WarmupReport = warm_up(self)  # before anyone is told the core is ready

    def info(self) -> EngineCoreInfo:
        w = self.worker
        return EngineCoreInfo(self.model_config, self.cache_config, self.scheduler_config, w.vocab_size,
                              w.hidden_size, sorted(w.eos_token_ids), w.device.type, self.async_scheduling,
                              *_pooling_defaults(w.model))

    # --------------------------------------------------------------------------- requests
    def add_request(self, req: EngineCoreRequest) -> None:
        """Queues a sequence that the API side has validated (ids, lengths, parameters)."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        generator = make_generator(req.seed, self.worker.device) if req.seed is not None else None
        request = Request(
            req.request_id,
            req.prompt_token_ids,
            sampling_params=req.sampling_params,
            pooling_params=req.pooling_params,
            eos_token_ids=frozenset(req.eos_token_ids),
            priority=req.priority,
            arrival_time=req.arrival_time or time.time(),
            token_type_ids=req.token_type_ids,
            generator=generator,
            warmup=req.warmup,
        )
        so_params = req.sampling_params.structured_outputs if req.sampling_params is not None else None
        if so_params is not None:
            assert self.structured is not None, "structured outputs on a pooling model"
            request.structured = self.structured.add(so_params)  # GrammarError: refused, nothing queued
            request.status = RequestStatus.WAITING_FOR_FSM
            self._waiting_for_grammar.append(request)
        self.requests[req.request_id] = request
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        reqs = [r for rid in request_ids if (r := self.requests.pop(rid, None)) is not None]
        if reqs:
            self.scheduler.finish_requests(reqs, RequestStatus.FINISHED_ABORTED)
            for r in reqs:
                r.drop_placeholders()
                self._release_grammar(r)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def reset_after_warmup(self) -> None:
        """After an API server's warm-up requests (which no counter counted): no prefix-cache entry of theirs is left,
        so no user sees a hit they caused. Called when no sequence runs."""
        if self._inflight is not None:
            self._inflight.wait()
            self._inflight = None
        ok = self.scheduler.kv_cache.reset_prefix_cache()
        assert ok, "prefix cache reset with KV blocks allocated"

    def is_runnable(self) -> bool:
        """Whether a step can make progress (requests queued while asleep wait without spinning the loop)."""
        sched = self.scheduler
        return self._inflight is not None or bool(sched.running) or (bool(sched.waiting) and sched.paused is None)

    def abort_all_from_core(self, why: str) -> None:
        """Ends every request here with finish reason ``abort`` (a pooling request with an error)."""
        outs = [EngineCoreOutput(rid, finish_reason="abort", num_preemptions=r.metrics.take_unsent_preemptions())
                if not r.is_pooling else EngineCoreOutput(rid, finish_reason="error", error=why)
                for rid, r in self.requests.items()]
        self.abort_requests(list(self.requests))
        self._extra_outputs += outs

    def read_back_inflight(self) -> None:
        """Waits for the launched step and keeps its outputs for the next message."""
        if self._inflight is not None:
            outputs: dict[str, EngineCoreOutput] = {}
            self._read_back(self._inflight, outputs)
            self._inflight = None
            self._extra_outputs += outputs.values()

    # ------------------------------------------------------------------------ utility calls
    def utility(self, call_id: int, method: str, args: list) -> None:
        """``sleep(level, mode)``, ``wake_up(tags)``, ``is_sleeping()``; the reply goes to ``take_replies``."""
        if method == "is_sleeping":
            self.add_reply(UtilityReply(call_id, self.sleep_mode.is_sleeping))
            return
        if method not in ("sleep", "wake_up"):
            raise ValueError(f"unknown engine call {method!r}")
        if not self.args.enable_sleep_mode:
            raise ValueError("sleep mode is off: start the server with --enable-sleep-mode")
        if method == "sleep":
            self.sleep_mode.sleep(call_id, int(args[0]), str(args[1]))
        else:
            self.add_reply(UtilityReply(call_id, self.sleep_mode.wake_up(args[0] if args else None)))

    def add_reply(self, reply: UtilityReply) -> None:
        self._replies.append(reply)

    def has_replies(self) -> bool:
        return bool(self._replies or self._extra_outputs)

    def take_replies(self) -> tuple[list[UtilityReply], list[EngineCoreOutput]]:
        replies, outputs = self._replies, self._extra_outputs
        self._replies, self._extra_outputs = [], []
        return replies, outputs

    def wakeup_sockets(self) -> list:
        """Sockets whose messages need ``service`` even when idle (the memory broker's)."""
        link = self.elastic.link if self.elastic is not None else None
        return [link.socket] if link is not None else []

    def service(self, idle: bool = False) -> None:
        """Elastic KV housekeeping: broker messages, growth ahead of need, giving chunks back (``idle``: the
        engine has just run out of work, the watermark is checked at once)."""
        if self.elastic is not None:
            self.elastic.service(self.scheduler.running, self.scheduler.preempt_requests, idle)

    # -------------------------------------------------------------------------------- step
    def step(self) -> list[EngineCoreOutput]:
        """One iteration; returns what each sequence produced (deltas) in the step(s) read back now."""
        self._stats.num_steps += 1
        if self.model_config.is_pooling:
            pooled = self._pooling_step()
            self.sleep_mode.try_finish()
            return pooled
        outputs: dict[str, EngineCoreOutput] = {}
        if self._inflight is not None and (not self.async_scheduling or self._needs_history()):
            self._read_back(self._inflight, outputs)
            self._inflight = None
        if self._waiting_for_grammar:
            self._activate_grammars(outputs)
        self.service()
        sched = self.scheduler.schedule()
        handle = None
        if not sched.is_empty:
            if self.structured is not None and sched.preempted:
                if self._inflight is not None:
                    self._inflight.resolve()  # its mask fill may still read matchers the rollback changes
                for r in sched.preempted:
                    self.structured.sync(r)
            bitmask_fn = None
            if self.structured is not None and self.structured.num_live:
                bitmask_fn = lambda requests: self._grammar_bitmask(requests, outputs)
            handle = self.executor.execute_model(sched, self._inflight, bitmask_fn)
            self.scheduler.update_after_step(sched)
            self._stats.num_prompt_tokens += sum(
                max(0, min(s.request.num_prompt_tokens, s.request.num_computed_tokens)
                    - (s.request.num_computed_tokens - s.num_new_tokens))
                for s in sched.scheduled if not s.request.warmup
            )
            for req in handle.requests:
                if not req.is_finished:  # finished while the bitmask callback read the previous step back
                    req.append_placeholder()
        elif self._inflight is None and self._waiting_for_grammar:
            self._wait_for_grammars()  # nothing else to run: sleep on the compiles instead of spinning
        prev, self._inflight = self._inflight, handle
        if prev is not None:
            self._read_back(prev, outputs)
        if not self.async_scheduling and self._inflight is not None:
            self._read_back(self._inflight, outputs)
            self._inflight = None
        self.sleep_mode.try_finish()
        return list(outputs.values())

    # ------------------------------------------------------------------- structured outputs
    def _activate_grammars(self, outputs: dict[str, EngineCoreOutput]) -> None:
        """Sequences whose grammar has compiled may be scheduled; a failed compile fails the sequence."""
        assert self.structured is not None
        still = []
        for req in self._waiting_for_grammar:
            so = req.structured
            if req.is_finished or so is None:
                continue
            if not so.ready:
                still.append(req)
                continue
            error = self.structured.activate(so)
            if error is None:
                req.status = RequestStatus.WAITING
            else:
                self._finish(req, RequestStatus.FINISHED_ABORTED)
                outputs[req.request_id] = EngineCoreOutput(req.request_id, finish_reason="error", error=error)
        self._waiting_for_grammar = still

    def _wait_for_grammars(self, timeout: float = GRAMMAR_WAIT_S) -> None:
        futures = [r.structured.compiled for r in self._waiting_for_grammar if r.structured is not None]
        concurrent.futures.wait(futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def _grammar_bitmask(self, requests: list[Request], outputs: dict[str, EngineCoreOutput]):
        """Called by the runner after launching the forward pass: the previous step's tokens must advance
        the matchers first, so it is read back now (the device is busy with this step's forward). With async
        scheduling the masks are filled on a thread while the host returns this step's outputs and builds the
        next step; the step samples when the next one needs its tokens (``StepHandle.resolve``)."""
        assert self.structured is not None
        if not any(r.structured is not None for r in requests):
            return None
        if self._inflight is not None:
            self._read_back(self._inflight, outputs)
            self._inflight = None
        if self.async_scheduling:
            return self.structured.bitmask_async(requests)
        return self.structured.bitmask(requests)

    def _release_grammar(self, req: Request) -> None:
        if req.structured is not None and self.structured is not None:
            self.structured.release(req.structured)
            req.structured = None

    def _needs_history(self) -> bool:
        """Penalties read every output token's value, of every sequence in the batch: a step that may schedule a
        penalized sequence (running, or waiting to start / resume) waits for the one in flight, whose sampled
        tokens are still placeholders in the other sequences."""
        return any(r.sampling_params.needs_output_history
                   for r in itertools.chain(self.scheduler.running, self.scheduler.waiting))

    def _pooling_step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        pooled = self.worker.execute_pooling(sched)
        self.scheduler.update_after_step(sched)
        self._count_pooling_step(sum(not s.request.warmup for s in sched.scheduled))
        outputs = []
        for s, data in zip(sched.scheduled, pooled):
            req = s.request
            if not req.warmup:
                self._stats.num_prompt_tokens += s.num_new_tokens
            self._finish(req, RequestStatus.FINISHED_STOPPED)
            outputs.append(EngineCoreOutput(req.request_id, finish_reason="stop",
                                            pooled=data.float().contiguous().numpy().tobytes(),
                                            first_scheduled_time=req.metrics.first_scheduled_time))
        return outputs

    def _count_pooling_step(self, num_requests: int) -> None:
        """Cumulative pooling batch figures (``EngineStats.pooling``)."""
        if num_requests == 0:  # only an API server's warm-up requests ran
            return
        if self._stats.pooling is None:
            self._stats.pooling = PoolingStats()
        self._stats.pooling.count_step(num_requests)

    def _read_back(self, handle: StepHandle, outputs: dict[str, EngineCoreOutput]) -> None:
        """Reads a launched step's samples, fills the requests' pending tokens, checks token stops."""
        result = handle.wait()
        constrained: list[tuple[Request, int]] = []
        for row, (req, token) in enumerate(zip(result.requests, result.sampled_token_ids)):
            if req.is_finished:  # aborted, or stopped by an earlier token while this step ran
                continue
            req.resolve_placeholder(token)
            if req.structured is not None:  # its matcher takes the token (after the stop checks below)
                constrained.append((req, token))
            self._stats.num_generation_tokens += not req.warmup
            out = outputs.get(req.request_id)
            if out is None:
                out = outputs[req.request_id] = EngineCoreOutput(
                    req.request_id, [], num_preemptions=req.metrics.take_unsent_preemptions())
                if req.num_known_output_tokens == 1:  # its first token: say when it was first scheduled
                    out.first_scheduled_time = req.metrics.first_scheduled_time
                    out.num_cached_tokens = req.num_cached_tokens
                    if req.wants_prompt_logprobs:
                        out.prompt_logprobs = req.prompt_logprobs
            out.new_token_ids.append(token)
            if result.logprobs is not None and req.sampling_params.num_logprobs is not None:
                out.new_logprobs = out.new_logprobs or []
                out.new_logprobs.append(_logprob_entry(req, result, row))
            status = self._check_stop(req, token)
            if status is not None:
                self._finish(req, status)
                out.finish_reason = status.finish_reason
                out.stop_reason = req.stop_reason if isinstance(req.stop_reason, int) else None
        if constrained:
            assert self.structured is not None
            self.structured.accept([r for r, _ in constrained], [t for _, t in constrained])

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        num_output = req.num_known_output_tokens
        past_min = num_output >= params.min_tokens
        if past_min and not params.ignore_eos and token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if past_min and params.stop_token_ids and token in params.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens - req.num_pending >= self.model_config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.drop_placeholders()
        self._release_grammar(req)
        self.scheduler.finish_requests([req], status)
        req.metrics.finished_time = time.time()
        self.requests.pop(req.request_id, None)

    def check_health(self) -> None:
        """Raises when the engine cannot step any more (a tensor-parallel worker died)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers, if any (idempotent)."""
        self.executor.shutdown()

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
        s.elastic = self.elastic.figures() if self.elastic is not None else None
        s.sleep_level = self.sleep_mode.state()
        s.is_sleeping = self.sleep_mode.is_sleeping
        s.timestamp = time.time()
        snapshot = EngineStats(**{k: getattr(s, k) for k in s.__dataclass_fields__})
        snapshot.pooling = dataclasses.replace(s.pooling) if s.pooling is not None else None
        return snapshot


def _pooling_defaults(model: object) -> tuple[str | None, bool | None]:
    pooling = getattr(model, "pooling", None)
    return getattr(pooling, "pooling_type", None), getattr(pooling, "normalize", None)


def make_structured_manager(args: EngineArgs, worker: Worker) -> StructuredOutputManager:
    """Structured outputs of a generating model; the core loads the tokenizer on the first such request."""

    def load_tokenizer():
        if args.skip_tokenizer_init:
            return None
        from slicelm.loader.hub import HubOptions
        from slicelm.loader.tokenizer import load_tokenizer_from

        return load_tokenizer_from(args.tokenizer or args.model, hub=HubOptions.for_tokenizer(args))

    return StructuredOutputManager(args.structured_outputs_config, load_tokenizer, worker.vocab_size,
                                   set(worker.eos_token_ids), worker.scheduler_config.max_num_seqs,
                                   pin=worker.device.type == "cuda")


def _logprob_entry(req: Request, result: RunnerOutput, row: int) -> tuple[list[int], list[float], int | None]:
    assert result.logprob_token_ids is not None and result.logprobs is not None
    k = req.sampling_params.num_logprobs or 0
    rank = result.ranks[row] if result.ranks is not None else None
    return result.logprob_token_ids[row][: k + 1], result.logprobs[row][: k + 1], rank
