"""``AsyncLLM``: runs ``LLMEngine.step()`` in a background thread and streams outputs to asyncio callers.

Requests enter through a thread-safe queue of commands (add / abort); the engine-loop thread drains it
between steps, so the engine itself is only ever touched by that one thread. Each request has a
``RequestStream`` (an asyncio queue living on the caller's event loop); the loop thread hands outputs to
it with ``loop.call_soon_threadsafe``. ``add_request`` waits for the engine to accept the request, so
validation errors (``SamplingParamsError``, ``PromptTooLongError`` …) surface in the caller before any
response is started. A caller that stops iterating (client disconnect, timeout, cancellation) releases
its stream, which aborts the request in the engine at once and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slicelm.engine.request import CompletionOutput, PoolingOutput, RequestOutput
from slicelm.engine.stats import EngineStats, FinishedRequestStats, IterationStats

if TYPE_CHECKING:
    from slicelm.config import EngineArgs

logger = logging.getLogger(__name__)

Output = RequestOutput | PoolingOutput


class EngineDeadError(RuntimeError):
    """The engine loop thread has died (or was shut down); no request can be served."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``max_waiting_requests``); retry later."""


StatListener = Callable[[EngineStats, IterationStats], None]


class RequestStream:
    """Outputs of one request, in order; consecutive cumulative outputs are coalesced (latest wins)."""

    def __init__(self, request_id: str, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.n = n
        self.loop = loop
        self.queue: asyncio.Queue[Output | BaseException] = asyncio.Queue()
        self.accepted: asyncio.Future[None] = loop.create_future()
        self.finished = False
        self.released = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Output:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        while not isinstance(item, BaseException) and not self.queue.empty():
            item = self.queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


@dataclass
class _Add:
    request_id: str
    prompt: Any
    params: Any
    arrival_time: float
    priority: int
    stream: RequestStream


@dataclass
class _Abort:
    request_ids: list[str]
    notify: bool  # send a final "abort" output to the stream (server-initiated aborts)


@dataclass
class _ReqState:
    stream: RequestStream
    arrival_time: float
    n: int
    num_tokens: int = 0
    last_token_time: float | None = None
    first_token_time: float | None = None
    last_output: Output | None = None


def _safe_set(fut: asyncio.Future[Any], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class AsyncLLM:
    """Asynchronous front of an ``LLMEngine`` (or anything with its interface)."""

    def __init__(self, engine: Any, max_waiting_requests: int | None = None, start: bool = True) -> None:
        self.engine = engine
        max_num_seqs = getattr(getattr(engine, "scheduler_config", None), "max_num_seqs", None) or 256
        self.max_num_seqs = int(max_num_seqs)
        self.max_waiting_requests = max_waiting_requests if max_waiting_requests is not None \
            else 4 * max_num_seqs
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        self._inputs: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # adds not yet reflected in an engine stats snapshot
        self._engine_waiting = 0
        self._engine_running = 0
        self._num_active = 0  # streams handed out and not yet released (event-loop side)
        self._states: dict[str, _ReqState] = {}  # loop-thread side
        self._listeners: list[StatListener] = []
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self.last_stats = EngineStats(timestamp=time.time())
        self._thread = threading.Thread(target=self._run, name="slicelm-engine-loop", daemon=True)
        if start:
            self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, max_waiting_requests: int | None = None) -> AsyncLLM:
        from slicelm.engine.engine import LLMEngine

        return cls(LLMEngine.from_engine_args(args), max_waiting_requests=max_waiting_requests)

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_config(self) -> Any:
        return self.engine.model_config

    @property
    def cache_config(self) -> Any:
        return self.engine.cache_config

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None and not self._stop.is_set()

    @property
    def errored(self) -> bool:
        return self._dead is not None or (self._thread.ident is not None and not self._thread.is_alive())

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    @property
    def num_active_requests(self) -> int:
        """Requests handed to callers and not yet released."""
        return self._num_active

    @property
    def num_waiting_estimate(self) -> int:
        """Requests that will wait for a batch slot: engine's waiting + not yet added - free slots."""
        with self._lock:
            return self._waiting_locked()

    def _waiting_locked(self) -> int:
        free = max(0, self.max_num_seqs - self._engine_running)
        return max(0, self._engine_waiting + self._pending - free)

    def add_stat_listener(self, listener: StatListener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------ public API
    async def add_request(self, request_id: str, prompt: Any, params: Any, arrival_time: float | None = None,
                          priority: int = 0) -> RequestStream:
        """Hands a request to the engine; returns once the engine accepted it (raises what it raised)."""
        if self.errored or self._stop.is_set():
            raise EngineDeadError(f"the engine loop is not running: {self._dead!r}")
        with self._lock:
            if self._waiting_locked() >= self.max_waiting_requests:
                raise EngineOverloadedError(
                    f"the server is overloaded: {self._waiting_locked()} requests are waiting "
                    f"(max_waiting_requests={self.max_waiting_requests}); retry later")
            self._pending += 1
        stream = RequestStream(request_id, int(getattr(params, "n", 1) or 1), asyncio.get_running_loop())
        self._num_active += 1
        self._inputs.put(_Add(request_id, prompt, params, arrival_time or time.time(), priority, stream))
        try:
            await asyncio.shield(stream.accepted)
        except BaseException:
            self.release(stream)
            raise
        return stream

    async def generate(self, prompt: Any, params: Any, request_id: str, priority: int = 0,
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative ``RequestOutput``s of one request until it finishes."""
        async for out in self._outputs(prompt, params, request_id, priority, arrival_time):
            yield out  # type: ignore[misc]

    async def encode(self, prompt: Any, params: Any, request_id: str, priority: int = 0,
                     arrival_time: float | None = None) -> AsyncIterator[PoolingOutput]:
        """The ``PoolingOutput`` of an embedding / score request (one item)."""
        async for out in self._outputs(prompt, params, request_id, priority, arrival_time):
            yield out  # type: ignore[misc]

    async def _outputs(self, prompt: Any, params: Any, request_id: str, priority: int,
                       arrival_time: float | None) -> AsyncIterator[Output]:
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
            self._inputs.put(_Abort([stream.request_id], notify=False))

    def abort(self, request_ids: str | Iterable[str]) -> None:
        """Aborts requests; their streams get a final output with ``finish_reason="abort"``."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self._inputs.put(_Abort(ids, notify=True))

    def abort_all(self) -> None:
        self._inputs.put(_Abort([], notify=True))  # empty list = everything in flight

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no stream is active; returns False on timeout."""
        deadline = time.monotonic() + timeout
        while self._num_active > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inputs.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine-loop thread
    def _run(self) -> None:
        try:
            self._publish(IterationStats(now=time.time()), 0)
            while not self._stop.is_set():
                busy = self.engine.has_unfinished_requests()
                drained = self._drain_inputs(block=not busy)
                if self._stop.is_set():
                    break
                it = IterationStats(now=time.time())
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    it.now = time.time()
                    for out in outputs:
                        self._route(out, it)
                self._publish(it, drained)
        except BaseException as e:
            logger.exception("engine loop died")
            self._dead = e
        finally:
            err = EngineDeadError(f"the engine loop stopped: {self._dead!r}" if self._dead else
                                  "the engine was shut down")
            for st in self._states.values():
                self._send(st.stream, err)
            self._states.clear()
            while True:  # fail adds that never reached the engine
                try:
                    cmd = self._inputs.get_nowait()
                except queue.Empty:
                    break
                if isinstance(cmd, _Add):
                    cmd.stream.loop.call_soon_threadsafe(_safe_set, cmd.stream.accepted, err)

    def _drain_inputs(self, block: bool) -> int:
        """Applies queued commands; returns how many adds it processed."""
        cmds: list[_Add | _Abort | None] = []
        try:
            cmds.append(self._inputs.get(timeout=1.0) if block else self._inputs.get_nowait())
            while True:
                cmds.append(self._inputs.get_nowait())
        except queue.Empty:
            pass
        adds = 0
        for cmd in cmds:
            if cmd is None:
                continue
            if isinstance(cmd, _Add):
                adds += 1
                self._do_add(cmd)
            else:
                self._do_abort(cmd)
        return adds

    def _do_add(self, cmd: _Add) -> None:
        st = cmd.stream
        if cmd.request_id in self._states:
            err: BaseException | None = ValueError(f"request_id {cmd.request_id!r} is already in use")
        else:
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, arrival_time=cmd.arrival_time,
                                        priority=cmd.priority)
                err = None
                self._states[cmd.request_id] = _ReqState(st, cmd.arrival_time, st.n)
            except Exception as e:  # validation errors go back to the caller
                err = e
        st.loop.call_soon_threadsafe(_safe_set, st.accepted, err)

    def _do_abort(self, cmd: _Abort) -> None:
        ids = cmd.request_ids or list(self._states)
        present = [rid for rid in ids if rid in self._states]
        if not present:
            return
        self.engine.abort_request(present)
        now = time.time()
        it = IterationStats(now=now)
        for rid in present:
            state = self._states.pop(rid)
            self._finish_stats(state, "abort", now, it, None)
            if cmd.notify:
                self._send(state.stream, _aborted_output(rid, state))
        if it.finished:
            self._notify(it)

    def _route(self, out: Output, it: IterationStats) -> None:
        state = self._states.get(out.request_id)
        if state is None:  # aborted meanwhile
            return
        state.last_output = out
        if isinstance(out, RequestOutput):
            num_tokens = sum(len(o.token_ids) for o in out.outputs)
            new = num_tokens - state.num_tokens
            if new > 0:
                t = it.now
                if state.first_token_time is None:  # measured here: the engine stamps before the forward
                    state.first_token_time = t
                    it.time_to_first_tokens.append(max(0.0, t - state.arrival_time))
                    new -= 1
                if new > 0 and state.last_token_time is not None:
                    it.inter_token_latencies.extend([max(0.0, (t - state.last_token_time) / new)] * new)
                state.last_token_time = t
                state.num_tokens = num_tokens
        if out.finished:
            self._states.pop(out.request_id, None)
            reason = "stop"
            if isinstance(out, RequestOutput):
                reasons = [o.finish_reason for o in out.outputs if o.finish_reason]
                reason = "abort" if "abort" in reasons else ("length" if "length" in reasons else "stop")
            self._finish_stats(state, reason, it.now, it, out)
        self._send(state.stream, out)

    def _finish_stats(self, state: _ReqState, reason: str, now: float, it: IterationStats,
                      out: Output | None) -> None:
        out = out or state.last_output
        m = getattr(out, "metrics", None)
        num_prompt = len(out.prompt_token_ids) if out is not None else 0
        f = FinishedRequestStats(reason, num_prompt, state.num_tokens, max(0.0, now - state.arrival_time))
        first_tok, last_tok = state.first_token_time, state.last_token_time
        sched = m.first_scheduled_time if m else None
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

    def _publish(self, it: IterationStats, drained_adds: int) -> None:
        stats = self.engine.get_stats()
        stats.timestamp = it.now
        with self._lock:
            self._pending -= drained_adds
            self._engine_waiting = stats.num_waiting
            self._engine_running = stats.num_running
        self.last_stats = stats
        self._notify(it)

    def _notify(self, it: IterationStats) -> None:
        for listener in self._listeners:
            try:
                listener(self.last_stats, it)
            except Exception:
                logger.exception("stat listener failed")

    @staticmethod
    def _send(stream: RequestStream, item: Output | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def _aborted_output(request_id: str, state: _ReqState) -> RequestOutput:
    last = state.last_output
    if isinstance(last, RequestOutput):
        outs = [CompletionOutput(o.index, o.text, list(o.token_ids), o.cumulative_logprob, o.logprobs,
                                 o.finish_reason or "abort", o.stop_reason) for o in last.outputs]
        return RequestOutput(request_id, last.prompt, last.prompt_token_ids, outs, True, last.metrics,
                             last.num_cached_tokens)
    outs = [CompletionOutput(i, "", [], finish_reason="abort") for i in range(state.n)]
    return RequestOutput(request_id, None, [], outs, True)
