"""The server's own warm-up: before ``/health`` answers 200, one real request of each kind the model serves goes
through this server's ASGI app, in process (httpx's ``ASGITransport``), so that a user's first request meets a
warm path end to end.

The engine core warms its steps itself (``engine/warmup.py``). What a first request still paid in the API process,
measured with cProfile on the first vs the second request of a ``slicelm serve`` process (no module was imported
lazily, the chat template was compiled at load): the start of the core's output reader thread (on the first
``add_request``: 8 ms for a chat, 100 ms for a rerank on a loaded CPU), the event loop's default executor and its
first thread (the first ``asyncio.to_thread``: tokenization, 9-15 ms), FastAPI's per-endpoint set-up on its first
call (``inspect.getsourcelines`` of the endpoint, dependency solving: 2-11 ms), the embeddings endpoint's metric
series, created on first use. These requests pay them here, and the core's first steps of a lone request's shapes:
a completion (plain and streamed) and a chat completion (plain, streamed with usage, sampled with logprobs) for a
generation model; embeddings (one text; four, base64) and a score for an embedding model; a rerank of eight
documents and a score for a cross-encoder.

Nothing of them stays visible: they run with ``async_llm.WARMING_UP`` set, so the core counts their sequences in no
stats and no stat listener hears of them (every ``vllm:*`` series, the stats log line), they bypass uvicorn (no
access-log line), and afterwards the core drops their prefix-cache entries (``EngineClient.end_warmup``). The
warm-up is logged with its time; a request of it that fails is logged as a warning and the server still starts
(a cold path is no reason to refuse service).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.types import ASGIApp

from slicelm.engine.async_llm import WARMING_UP
from slicelm.entrypoints.server.state import ServerState

logger = logging.getLogger("slicelm.server")
WARMUP_TEXT = "Warm-up: what is the capital of France?"
# a rerank of eight documents, as a retrieval pipeline sends it (the pooling batch of a usual first request)
WARMUP_DOCS = [f"{city} is the capital of {country}." for city, country in (
    ("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy"), ("Vienna", "Austria"),
    ("Lisbon", "Portugal"), ("Warsaw", "Poland"), ("Athens", "Greece"))]


@dataclass
class WarmupCall:
    path: str
    body: dict[str, Any]


@dataclass
class ServerWarmupReport:
    calls: list[str]
    seconds: float
    failures: list[str] = field(default_factory=list)
    core_reset: bool = False


def warmup_calls(state: ServerState) -> list[WarmupCall]:
    """The requests of the warm-up, by the engine's task (generation or pooling)."""
    model = state.served_model_names[0]
    if state.task == "generate":
        return _generation_calls(state, model)
    if state.task == "embed":
        return [WarmupCall("/v1/embeddings", {"model": model, "input": WARMUP_TEXT}),
                WarmupCall("/v1/embeddings", {"model": model, "input": WARMUP_DOCS[:4], "encoding_format": "base64"}),
                WarmupCall("/v1/score", {"model": model, "text_1": WARMUP_TEXT, "text_2": WARMUP_DOCS})]
    if state.task == "score":
        return [WarmupCall("/v1/rerank", {"model": model, "query": WARMUP_TEXT, "documents": WARMUP_DOCS}),
                WarmupCall("/v1/score", {"model": model, "text_1": WARMUP_TEXT, "text_2": WARMUP_DOCS})]
    return []


def _generation_calls(state: ServerState, model: str) -> list[WarmupCall]:
    tok = state.engine.tokenizer
    short: dict[str, Any] = {"model": model, "max_tokens": 2, "temperature": 0}
    prompt: str | list[int] = WARMUP_TEXT if tok is not None else [1, 2, 3]
    calls = [WarmupCall("/v1/completions", {**short, "prompt": prompt}),
             WarmupCall("/v1/completions", {**short, "prompt": prompt, "stream": True})]
    if tok is not None and (state.chat_template or getattr(tok, "chat_template", None)):
        messages = [{"role": "user", "content": WARMUP_TEXT}]
        calls += [WarmupCall("/v1/chat/completions", {**short, "messages": messages}),
                  WarmupCall("/v1/chat/completions", {**short, "messages": messages, "stream": True,
                                                      "stream_options": {"include_usage": True}}),
                  WarmupCall("/v1/chat/completions", {**short, "messages": messages, "temperature": 0.7,
                                                      "top_p": 0.9, "logprobs": True, "top_logprobs": 2})]
    return calls


async def warm_up_server(app: ASGIApp, state: ServerState) -> ServerWarmupReport:
    """Sends ``warmup_calls(state)`` through ``app`` (the whole ASGI stack, auth included), then has the engine
    forget them; returns what ran (logged)."""
    t0 = time.perf_counter()
    calls = warmup_calls(state)
    headers = {"Authorization": f"Bearer {state.api_keys[0]}"} if state.api_keys else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    failures: list[str] = []
    marked = WARMING_UP.set(True)
    try:
        async with _quiet("httpx"), httpx.AsyncClient(transport=transport, base_url="http://warm-up",
                                                      headers=headers, timeout=None) as client:
            for call in calls:
                r = await client.post(call.path, json=call.body)
                if r.status_code != 200:
                    failures.append(f"{call.path}: HTTP {r.status_code} {r.text[:300]}")
        core_reset = await state.engine.end_warmup()
    finally:
        WARMING_UP.reset(marked)
    report = ServerWarmupReport([c.path for c in calls], time.perf_counter() - t0, failures, core_reset)
    logger.info("API warm-up: %d requests (%s) in %.2f s", len(calls), ", ".join(sorted(set(report.calls))),
                report.seconds)
    for failure in failures:
        logger.warning("API warm-up request failed (the server starts anyway): %s", failure)
    if not core_reset:
        logger.warning("API warm-up: the engine core did not confirm dropping the warm-up's cache entries")
    return report


@contextlib.asynccontextmanager
async def _quiet(name: str) -> AsyncIterator[None]:
    """Logger ``name`` at WARNING meanwhile (httpx's per-request INFO line would read like an access-log line)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    try:
        yield
    finally:
        log.setLevel(level)
