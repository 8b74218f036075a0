"""``AsyncLLM``: the server's ``EngineClient`` — a thin client of an engine core, an output processor,
and admission control / stats.

The core runs in its own process by default (``MPCoreClient``; ``ThreadCoreClient`` runs it in a thread).
``add_request`` validates and tokenizes here (``InputProcessor``), so errors surface before a response
starts, and sends the sequences to the core without waiting for it. The core's per-step deltas arrive
on the event loop (one callback per step), where the ``OutputProcessor`` detokenizes them, checks stop
strings and hands each request's ``RequestStream`` its delta. A caller that stops iterating releases
its stream, which aborts the request in the core at once. If the core dies, every open stream and
every later ``add_request`` gets ``EngineDeadError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slicelm.engine.core_messages import EngineCoreInfo, EngineCoreOutputs, UtilityReply, utility_error
from slicelm.engine.input_processor import InputProcessor, PromptType
from slicelm.engine.output_processor import EngineCoreRequestError, OutputProcessor
from slicelm.engine.protocol import EngineDeadError as EngineDeadError
from slicelm.engine.protocol import EngineOverloadedError as EngineOverloadedError
from slicelm.engine.protocol import StatListener as StatListener
from slicelm.engine.request import CompletionOutput, PoolingOutput, RequestOutput
from slicelm.engine.request_stream import Output, RequestStream
from slicelm.engine.stats import MAX_NUM_QUEUED_REQS, EngineStats, FinishedRequestStats
from slicelm.engine.stats import IterationStats as IterationStats
from slicelm.pooling_params import PoolingParams
from slicelm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from slicelm.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig
    from slicelm.engine.core import EngineCore
    from slicelm.engine.core_client import CoreClient
    from slicelm.loader.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "EngineOverloadedError", "IterationStats", "RequestStream",
           "StatListener"]
# Set by a server around its own warm-up requests (``entrypoints/server/warmup.py``): their sequences reach the core
# marked ``warmup`` (it counts them in no stats) and their latencies reach no stat listener.
WARMING_UP: ContextVar[bool] = ContextVar("slicelm_warming_up", default=False)


@dataclass
class _ReqState:
    stream: RequestStream
    arrival_time: float
    n: int
    num_prompt_tokens: int
    num_tokens: int = 0
    last_token_time: float | None = None
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    num_preemptions: int = 0  # as the core has reported them so far
    reasons: set[str] = field(default_factory=set)
    warmup: bool = False  # a server's own warm-up request: in no stats


class AsyncLLM:
    """The ``EngineClient`` of one engine core (see the module docstring)."""

    def __init__(self, client: CoreClient, info: EngineCoreInfo, tokenizer: Tokenizer | None,
                 max_waiting_requests: int | None = None) -> None:
        self.client = client
        self.info = info
        self.tokenizer = tokenizer
        self.model_config: ModelConfig = info.model_config
        self.cache_config: CacheConfig = info.cache_config
        self.scheduler_config: SchedulerConfig = info.scheduler_config
        self.max_num_seqs = int(info.scheduler_config.max_num_seqs)
        self.max_waiting_requests = max_waiting_requests if max_waiting_requests is not None \
            else 4 * self.max_num_seqs
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        self.input_processor = InputProcessor(info, tokenizer)
        self.output_processor = OutputProcessor(tokenizer)
        self._states: dict[str, _ReqState] = {}
        self._num_active = 0  # streams handed out and not yet released
        self._num_sent = 0  # sequences sent to the core
        self._num_taken = 0  # sequences the core has taken (from its last message)
        self._engine_waiting = 0
        self._engine_running = 0
        self._listeners: list[StatListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: BaseException | None = None
        self._shut_down = False
        self.last_stats = EngineStats(timestamp=time.time())
        self._num_resets = 0  # the core's WARMUP_DONE resets seen
        self._reset_seen: asyncio.Event | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}  # utility calls waiting for the core's reply
        self._next_call = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs, max_waiting_requests: int | None = None,
                         multiprocess: bool = True) -> AsyncLLM:
        """Starts the core (its own process unless ``multiprocess=False``), loads the tokenizer meanwhile,
        and waits for the core; a load error in the core is raised here."""
        from slicelm.engine.core_client import MPCoreClient, ThreadCoreClient
        from slicelm.engine.engine import load_api_tokenizer
        from slicelm.loader.model_files import pin_hub_snapshots

        args = pin_hub_snapshots(args)  # Hub ids: fetched once, here, before the core starts
        client: CoreClient
        if multiprocess:
            client = MPCoreClient(args)
        else:
            from slicelm.engine.core import EngineCore

            client = ThreadCoreClient(EngineCore(args))
        try:
            tokenizer = load_api_tokenizer(args)
            info = client.wait_ready()
        except BaseException:
            client.shutdown()
            raise
        return cls(client, info, tokenizer, max_waiting_requests=max_waiting_requests)

    @classmethod
    def from_core(cls, core: EngineCore, tokenizer: Tokenizer | None,
                  max_waiting_requests: int | None = None) -> AsyncLLM:
        """Over an already built core object (an ``EngineCore`` or a test fake), run in a thread."""
        from slicelm.engine.core_client import ThreadCoreClient

        client = ThreadCoreClient(core)
        return cls(client, client.wait_ready(), tokenizer, max_waiting_requests=max_waiting_requests)

    # ------------------------------------------------------------------ state
    @property
    def is_running(self) -> bool:
        return not self.errored and not self._shut_down

    @property
    def errored(self) -> bool:
        return self._dead is not None or self.client.death_reason() is not None

    @property
    def dead_error(self) -> BaseException | None:
        if self._dead is None and (reason := self.client.death_reason()) is not None:
            return EngineDeadError(reason)
        return self._dead

    @property
    def num_active_requests(self) -> int:
        return self._num_active

    @property
    def num_waiting_estimate(self) -> int:
        """Sequences that will wait for a batch slot: the core's waiting + not yet taken - free slots."""
        free = max(0, self.max_num_seqs - self._engine_running)
        pending = max(0, self._num_sent - self._num_taken)
        return max(0, self._engine_waiting + pending - free)

    def add_stat_listener(self, listener: StatListener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------ requests
    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams,
                          arrival_time: float | None = None, priority: int = 0) -> RequestStream:
        """Validates the request and hands it to the core; returns its stream of deltas."""
        loop = asyncio.get_running_loop()
        self._attach(loop)
        if self.errored or self._shut_down:
            raise EngineDeadError(f"the engine is not running: {self.dead_error or 'it was shut down'}")
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if self.num_waiting_estimate >= self.max_waiting_requests:
            self._count_rejection(MAX_NUM_QUEUED_REQS)
            raise EngineOverloadedError(
                f"the server is overloaded: {self.num_waiting_estimate} requests are waiting "
                f"(max_waiting_requests={self.max_waiting_requests}); retry later")
        req = self.input_processor.process(request_id, prompt, params, arrival_time or time.time(), priority)
        warmup = WARMING_UP.get()
        for seq in req.sequences:
            seq.warmup = warmup
        stream = RequestStream(request_id, len(req.sequences), loop)
        self.output_processor.add(req, stream=True)
        self._states[request_id] = _ReqState(stream, req.arrival_time, len(req.sequences), len(req.prompt_token_ids),
                                             warmup=warmup)
        self._num_active += 1
        self._num_sent += len(req.sequences)
        try:
            self.client.add_requests(req.sequences)
        except BaseException:  # the core died meanwhile: nothing of this request may stay registered
            self._states.pop(request_id, None)
            self.output_processor.abort([request_id])
            stream.released = stream.finished = True
            self._num_active -= 1
            self._num_sent -= len(req.sequences)
            raise
        return stream

    def _count_rejection(self, reason: str) -> None:
        """A refused request counts in ``IterationStats.admission_rejections`` (vLLM's ``admission_rejections``)."""
        if not WARMING_UP.get():
            self._notify(IterationStats(now=time.time(), admission_rejections=[reason]))

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str, priority: int = 0,
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """The deltas of one request until it finishes."""
        async for out in self._outputs(prompt, params, request_id, priority, arrival_time):
            assert isinstance(out, RequestOutput)
            yield out

    async def encode(self, prompt: PromptType, params: PoolingParams, request_id: str, priority: int = 0,
                     arrival_time: float | None = None) -> AsyncIterator[PoolingOutput]:
        """The ``PoolingOutput`` of an embedding / score request (one item; an ``abort`` ends it with a finished
        ``RequestOutput`` without a pooling result, which callers treat as a failed request)."""
        async for out in self._outputs(prompt, params, request_id, priority, arrival_time):
            yield out  # type: ignore[misc]

    async def _outputs(self, prompt: PromptType, params: SamplingParams | PoolingParams, request_id: str,
                       priority: int, arrival_time: float | None) -> AsyncIterator[Output]:
        stream = await self.add_request(request_id, prompt, params, arrival_time, priority)
        try:
            async for out in stream:
                yield out
        finally:
            self.release(stream)

    def release(self, stream: RequestStream) -> None:
        """Called when a caller is done with ``stream``; aborts the request if it has not finished."""
        if stream.released:
            return
        stream.released = True
        self._num_active -= 1
        if not stream.finished:
            stream.finished = True
            self._abort(stream.request_id, notify=False)

    def abort(self, request_ids: str | Iterable[str]) -> None:
        """Aborts requests; their streams get a final output with ``finish_reason="abort"``."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self._on_loop(lambda: [self._abort(rid, notify=True) for rid in ids])

    def abort_all(self) -> None:
        self._on_loop(lambda: [self._abort(rid, notify=True) for rid in list(self._states)])

    def _abort(self, request_id: str, notify: bool) -> None:
        state = self._states.pop(request_id, None)
        if state is None:
            return
        indices = self.output_processor.unfinished_indices(request_id)
        self.client.abort_requests(self.output_processor.abort([request_id]))
        it = IterationStats(now=time.time())
        self._finish_stats(state, "abort", it)
        self._notify(it)
        if notify:
            outs = [CompletionOutput(i, "", [], finish_reason="abort") for i in indices]
            state.stream.put(RequestOutput(request_id, None, [], outs, True))

    async def end_warmup(self, timeout: float = 10.0) -> bool:
        """After the server's warm-up requests: asks the core to drop their prefix-cache entries (it does so once no
        sequence runs) and waits for its message saying so; False if none came within ``timeout``."""
        self._attach(asyncio.get_running_loop())
        seen, self._reset_seen = self._num_resets, asyncio.Event()
        self.client.end_warmup()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reset_seen.wait(), timeout)
        self._reset_seen = None
        return self._num_resets > seen

    # ------------------------------------------------------------------ sleep mode (utility calls)
    async def call_utility(self, method: str, *args: Any) -> Any:
        """Runs ``method`` in the core and returns its result; the core's ValueError stays a ValueError."""
        loop = asyncio.get_running_loop()
        self._attach(loop)
        if self.errored or self._shut_down:
            raise EngineDeadError(f"the engine is not running: {self.dead_error or 'it was shut down'}")
        self._next_call += 1
        future: asyncio.Future[Any] = loop.create_future()
        self._calls[self._next_call] = future
        self.client.call_utility(self._next_call, method, list(args))
        return await future

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        await self.call_utility("sleep", level, mode)

    async def wake_up(self, tags: list[str] | None = None) -> float:
        """Returns the seconds the core took to wake up."""
        return float(await self.call_utility("wake_up", tags) or 0.0)

    async def is_sleeping(self) -> bool:
        return bool(await self.call_utility("is_sleeping"))

    def _on_utility(self, replies: list[UtilityReply]) -> None:
        for r in replies:
            future = self._calls.pop(r.call_id, None)
            if future is None or future.done():
                continue
            if r.error is None:
                future.set_result(r.result)
            else:
                future.set_exception(utility_error(r.error))

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no stream is active; returns False on timeout."""
        deadline = time.monotonic() + timeout
        while self._num_active > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        self.client.shutdown(timeout=min(timeout, 5.0))
        self._on_loop(lambda: self._fail(EngineDeadError("the engine was shut down")))

    # ------------------------------------------------------------------ core outputs (event loop)
    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Outputs go to the loop of the callers; requests of a loop that was closed meanwhile are dropped."""
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("AsyncLLM serves one event loop at a time")
        self._loop = loop
        for state in self._states.values():
            state.stream.finished = True
            if not state.stream.released:
                state.stream.released = True
                self._num_active -= 1
        self.client.abort_requests(self.output_processor.abort(list(self._states)))
        self._states.clear()
        self.client.start_reader(loop, self._on_core_message)

    def _on_loop(self, fn: Callable[[], object]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            fn()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def _on_core_message(self, msg: EngineCoreOutputs | EngineDeadError) -> None:
        if isinstance(msg, EngineDeadError):
            self._fail(msg)
            return
        if msg.dead_error is not None:
            self._fail(EngineDeadError(f"the engine core failed: {msg.dead_error}"))
            return
        now = time.time()
        it = IterationStats(now=now)
        try:
            processed = self.output_processor.process(msg.outputs, now)
        except Exception as e:  # a bug here must fail the requests, never leave them waiting
            logger.exception("processing the engine core's outputs failed")
            self._fail(EngineDeadError(f"processing the engine core's outputs failed: {e!r}"))
            return
        if processed.abort_in_core:
            self.client.abort_requests(processed.abort_in_core)
        for rid, err in processed.errors.items():
            state = self._states.pop(rid, None)
            if state is not None:
                self._finish_stats(state, "abort", it)
                state.stream.put(EngineCoreRequestError(f"request {rid!r} failed in the engine core: {err}"))
        for out in processed.outputs:
            self._route(out, it)
        if msg.stats is not None:
            msg.stats.timestamp = now
            self.last_stats = msg.stats
            self._engine_waiting = msg.stats.num_waiting
            self._engine_running = msg.stats.num_running
        self._num_taken = msg.num_adds
        if msg.utility:
            self._on_utility(msg.utility)
        self._notify(it)
        if msg.num_resets != self._num_resets:
            self._num_resets = msg.num_resets
            if self._reset_seen is not None:
                self._reset_seen.set()

    def _route(self, out: Output, it: IterationStats) -> None:
        state = self._states.get(out.request_id)
        if state is None:  # released meanwhile
            return
        if state.warmup:
            it = IterationStats(now=it.now)  # measured, but for no listener
        m = out.metrics
        if m is not None:
            state.num_preemptions = m.num_preemptions
            if m.first_scheduled_time is not None:
                state.first_scheduled_time = m.first_scheduled_time
        if isinstance(out, RequestOutput):
            new = sum(len(o.token_ids) for o in out.outputs)
            state.reasons.update(o.finish_reason for o in out.outputs if o.finish_reason)
            if new > 0:
                t = it.now
                if state.first_token_time is None:
                    state.first_token_time = t
                    it.time_to_first_tokens.append(max(0.0, t - state.arrival_time))
                    new -= 1
                if new > 0 and state.last_token_time is not None:
                    it.inter_token_latencies.extend([max(0.0, (t - state.last_token_time) / new)] * new)
                state.last_token_time = t
                state.num_tokens += sum(len(o.token_ids) for o in out.outputs)
        if out.finished:
            self._states.pop(out.request_id, None)
            r = state.reasons
            reason = "abort" if "abort" in r else ("length" if "length" in r else "stop")
            self._finish_stats(state, reason, it)
        state.stream.put(out)

    def _finish_stats(self, state: _ReqState, reason: str, it: IterationStats) -> None:
        if state.warmup:
            return
        now = it.now
        f = FinishedRequestStats(reason, state.num_prompt_tokens, state.num_tokens,
                                 max(0.0, now - state.arrival_time), num_preemptions=state.num_preemptions)
        first_tok, last_tok, sched = state.first_token_time, state.last_token_time, state.first_scheduled_time
        if sched is not None:
            f.queue_time = max(0.0, sched - state.arrival_time)
            f.inference_time = max(0.0, now - sched)
            if first_tok is not None:
                f.prefill_time = max(0.0, first_tok - sched)
        if first_tok is not None and last_tok is not None:
            f.decode_time = max(0.0, last_tok - first_tok)
            per_seq = state.num_tokens / max(1, state.n)
            if per_seq > 1:
                f.time_per_output_token = f.decode_time / (per_seq - 1)
        it.finished.append(f)

    def _notify(self, it: IterationStats) -> None:
        for listener in self._listeners:
            try:
                listener(self.last_stats, it)
            except Exception:
                logger.exception("stat listener failed")

    def _fail(self, err: BaseException) -> None:
        if self._dead is None and not self._shut_down:
            logger.error("engine core is dead: %s", err)
        if self._dead is None:
            self._dead = err
        for state in self._states.values():
            state.stream.put(err)
        self._states.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(err)
        self._calls.clear()
        self.output_processor.abort(list(self.output_processor.parents))
