"""What the endpoints share: the engine client, served names, limits (length, text size, priority), and helpers every
endpoint uses (streams, disconnects, work off the event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from slicelm.engine.protocol import EngineClient
from slicelm.engine.request import CompletionOutput, RequestOutput
from slicelm.engine.request_stream import RequestStream
from slicelm.entrypoints.server.errors import APIError, bad_request
from slicelm.entrypoints.server.metrics import LoggingStatLogger, PrometheusStatLogger, cache_config_info
from slicelm.entrypoints.server.options import ApiOptions
from slicelm.sampling_params import SamplingParams

T = TypeVar("T")
CHARS_PER_TOKEN_LIMIT = 64  # text longer than max_model_len * this cannot fit: 400 before tokenizing
TASK_ENDPOINTS = {"generate": "text generation (/v1/chat/completions, /v1/completions)",
                  "embed": "embeddings (/v1/embeddings)", "score": "scoring (/v1/score, /v1/rerank)"}


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was complete."""


@dataclass
class ServerState:
    engine: EngineClient
    served_model_names: list[str]
    max_model_len: int
    task: str
    model_path: str
    chat_template: str | None = None
    api_keys: list[str] = field(default_factory=list)
    shutdown_timeout: float = 30.0
    metrics: PrometheusStatLogger | None = None
    stat_logger: LoggingStatLogger | None = None
    draining: bool = False
    options: ApiOptions = field(default_factory=ApiOptions)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_engine(cls, engine: EngineClient, served_model_names: list[str] | None = None,
                    chat_template: str | None = None, api_keys: list[str] | None = None,
                    shutdown_timeout: float = 30.0, log_stats: bool = True,
                    record_engine_metrics: bool = True) -> ServerState:
        mc = engine.model_config
        names = list(served_model_names or mc.served_model_names or [mc.model])
        state = cls(engine, names, int(mc.max_model_len), str(mc.task), str(mc.model), chat_template,
                    list(api_keys or []), shutdown_timeout)
        info = cache_config_info(engine.cache_config, state.max_model_len)
        state.metrics = PrometheusStatLogger(names[0], state.max_model_len, info,
                                             record_engine=record_engine_metrics, pooling=state.task != "generate")
        engine.add_stat_listener(state.metrics)
        if log_stats:
            state.stat_logger = LoggingStatLogger()
            engine.add_stat_listener(state.stat_logger)
        return state

    @property
    def tokenizer(self) -> Any:
        tok = self.engine.tokenizer
        if tok is None:
            raise bad_request("this server was started without a tokenizer (--skip-tokenizer-init)")
        return tok

    def check_model(self, model: str | None, required: bool = True) -> str:
        if model is None or model == "":
            if required:
                raise bad_request("you must provide a model parameter", param="model",
                                  code="missing_required_parameter")
            return self.served_model_names[0]
        if model not in self.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist. Served models: "
                           f"{', '.join(self.served_model_names)}", param="model", code="model_not_found")
        return model

    def require_task(self, task: str, api: str) -> None:
        if self.task != task:
            raise bad_request(f"The model `{self.served_model_names[0]}` does not support the {api} API: it is "
                              f"served for {TASK_ENDPOINTS.get(self.task, self.task)} "
                              f"(task {self.task!r}); start a model with task {task!r} for this endpoint",
                              code="wrong_task")

    def token_text(self, token_id: int) -> str:
        """Text of one token (cached), as shown in logprobs."""
        return self.tokenizer.token_text(token_id)

    def check_text_size(self, chars: int, param: str, truncating: bool = False) -> None:
        """400 before tokenizing for a text that cannot fit in ``max_model_len`` tokens whatever its tokens."""
        limit = self.max_model_len * CHARS_PER_TOKEN_LIMIT
        if not truncating and chars > limit:  # vLLM's text
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                              f"prompt contains {chars} characters (more than {limit} characters, which is the upper "
                              f"bound for {self.max_model_len} input tokens). Please reduce the length of the input "
                              "prompt.", param=param, code="context_length_exceeded")

    def check_priority(self, priority: int | None) -> int:
        """The request's priority; 400 for one without ``--scheduling-policy priority``."""
        if priority and self.options.scheduling_policy != "priority":
            raise bad_request(f"priority: got priority {priority} but priority scheduling is not enabled "
                              "(start the server with --scheduling-policy priority)", param="priority")
        return priority or 0

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """Returns the effective max_tokens; 400 when prompt + max_tokens exceed ``max_model_len``."""
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"{num_prompt_tokens} input tokens. Please reduce the length of the input.",
                param=param, code="context_length_exceeded")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the input, {max_tokens} in the "
                f"completion). Please reduce the length of the input or the completion.",
                param="max_tokens", code="context_length_exceeded")
        return max_tokens


def get_state(request: Request) -> ServerState:
    return request.app.state.server


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Tokenizing and template rendering run in a worker thread so that no request holds up the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body must have been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class OutputAccumulator:
    """Folds a request's deltas into its complete output (texts joined once, lists extended: O(length))."""

    def __init__(self) -> None:
        self.last: Any = None
        self._choices: dict[int, tuple[list[str], list[int], list[Any] | None, CompletionOutput]] = {}
        self._prompt_logprobs: list[Any] | None = None

    def add(self, out: Any) -> None:
        self.last = out
        if not isinstance(out, RequestOutput):
            return
        if self._prompt_logprobs is None:
            self._prompt_logprobs = out.prompt_logprobs
        for o in out.outputs:
            texts, ids, lps, _ = self._choices.get(o.index) or ([], [], None, o)
            texts.append(o.text)
            ids.extend(o.token_ids)
            if o.logprobs is not None:
                lps = [] if lps is None else lps
                lps.extend(o.logprobs)
            self._choices[o.index] = (texts, ids, lps, o)

    def result(self) -> Any:
        out = self.last
        if not isinstance(out, RequestOutput):
            return out
        choices = [CompletionOutput(i, "".join(texts), ids, last.cumulative_logprob, lps, last.finish_reason,
                                    last.stop_reason)
                   for i, (texts, ids, lps, last) in sorted(self._choices.items())]
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, choices, out.finished, out.metrics,
                             out.num_cached_tokens, self._prompt_logprobs)


async def final_outputs(streams: list[RequestStream], request: Request) -> list[Any]:
    """Consumes ``streams`` to their complete outputs; raises ``ClientDisconnected`` if the client leaves first."""

    async def consume(stream: RequestStream) -> Any:
        acc = OutputAccumulator()
        async for out in stream:
            acc.add(out)
        return acc.result()

    consumer = asyncio.ensure_future(asyncio.gather(*(consume(s) for s in streams)))
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await consumer
    if consumer not in done or consumer.cancelled():
        raise ClientDisconnected()
    return consumer.result()


async def add_requests(state: ServerState, engine_base: str, prompts: list[list[int]],
                       params_list: list[SamplingParams], priority: int) -> list[RequestStream]:
    """One engine request per prompt (ids ``{engine_base}-{i}`` when several); all released if one fails."""
    streams: list[RequestStream] = []
    try:
        for i, (ids, params) in enumerate(zip(prompts, params_list, strict=True)):
            engine_id = engine_base if len(prompts) == 1 else f"{engine_base}-{i}"
            streams.append(await state.engine.add_request(engine_id, {"prompt_token_ids": ids}, params,
                                                          priority=priority))
    except BaseException:
        for s in streams:
            state.engine.release(s)
        raise
    return streams


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Interleaves several streams as ``(stream index, output)`` in arrival order."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, Any] | tuple[int, BaseException] | None] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item[1], BaseException):
                raise item[1]
            yield item
    finally:
        for t in tasks:
            t.cancel()
