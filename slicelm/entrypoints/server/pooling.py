"""Pooling endpoints: ``/v1/embeddings``, ``/v1/score`` + ``/score``, ``/v1/rerank`` + ``/rerank`` + ``/v2/rerank``.

Which model serves what (as vLLM): an embedding model (task "embed") serves embeddings, and score / rerank
as the cosine similarity of the two sides' embeddings; a cross-encoder (task "score") serves score / rerank
with its head's activated output for each (text_1, text_2) pair; a generative model serves none (400).

Every input of a request becomes one engine request; they are all handed to the engine before the first
one is awaited, so the engine loop batches them with whatever else is waiting. Text is tokenized here
(``truncate_prompt_tokens`` cuts text on the right, keeping the special tokens, as transformers does; token
id inputs keep their last tokens, as vLLM does); an input longer than ``max_model_len`` without truncation
is a 400. Batching is visible in ``/metrics``: ``slicelm:pooling_steps_total``,
``slicelm:pooling_multi_request_steps_total``, ``slicelm:pooling_requests_total`` and
``slicelm:pooling_max_batch_requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter, Gauge
from tokenizers import Tokenizer as HFTokenizer

from slicelm.engine.async_llm import IterationStats
from slicelm.engine.request import PoolingOutput
from slicelm.engine.stats import EngineStats
from slicelm.entrypoints.server.chat import convert_messages, render_chat, request_template
from slicelm.entrypoints.server.embed_chunking import run_chunked
from slicelm.entrypoints.server.embed_encoding import encode_vector, vector_bytes
from slicelm.entrypoints.server.errors import APIError, bad_request
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.pooling_protocol import EmbeddingRequest, RerankRequest, ScoreRequest
from slicelm.entrypoints.server.sampling import check_text_size, request_ids, response_headers
from slicelm.entrypoints.server.state import (
    TASK_ENDPOINTS,
    ClientDisconnected,
    ServerState,
    get_state,
    wait_for_disconnect,
)
from slicelm.layers.pooler import num_labels_of
from slicelm.pooling_params import PoolingParams

router = APIRouter()
Prompt = dict[str, list[int]]


# ---------------------------------------------------------------------------------------------- checks
def _require_tasks(state: ServerState, tasks: tuple[str, ...], api: str) -> None:
    if state.task in tasks:
        return
    wanted = " or ".join(repr(t) for t in tasks)
    raise bad_request(f"The model `{state.served_model_names[0]}` does not support the {api} API: it is served "
                      f"for {TASK_ENDPOINTS.get(state.task, state.task)} (task {state.task!r}); start a model "
                      f"with task {wanted} for this endpoint", code="wrong_task")


def _hf_config(state: ServerState) -> dict[str, Any]:
    return getattr(state.engine.model_config, "hf_config", None) or {}


def _check_dimensions(state: ServerState, dims: int | None) -> None:
    """As vLLM: ``dimensions`` only for Matryoshka models (config ``is_matryoshka`` / ``matryoshka_dimensions``)."""
    if dims is None:
        return
    cfg = _hf_config(state)
    allowed = cfg.get("matryoshka_dimensions")
    if not (cfg.get("is_matryoshka") or allowed):
        raise bad_request(f"dimensions: the model `{state.served_model_names[0]}` does not support Matryoshka "
                          "representation; changing the output dimensions would give poor embeddings",
                          param="dimensions")
    hidden = int(cfg.get("hidden_size") or 0)
    if hidden and dims > hidden:
        raise bad_request(f"dimensions: must be <= the model's embedding size {hidden}, got {dims}",
                          param="dimensions")
    if allowed and dims not in allowed:
        raise bad_request(f"dimensions: the model supports {sorted(allowed)}, got {dims}", param="dimensions")


def _limit(state: ServerState, truncate: int | None) -> int | None:
    if truncate is None:
        return None
    if truncate == -1:
        return state.max_model_len
    if truncate > state.max_model_len:
        raise bad_request(f"truncate_prompt_tokens: must be <= max_model_len {state.max_model_len}, got {truncate}",
                          param="truncate_prompt_tokens")
    return truncate


def _check_len(state: ServerState, n: int, param: str, max_len: int | None = None) -> None:
    if max_len is not None and max_len != state.max_model_len:  # chunked embeddings (--pooler-config)
        if n > max_len:
            raise bad_request(f"{param}: this model's maximum embedding input length is {max_len} tokens "
                              f"(max_embed_len); the input has {n} tokens", param=param,
                              code="context_length_exceeded")
        return
    if n > state.max_model_len:
        raise bad_request(f"{param}: {n} tokens exceed this model's maximum context length of {state.max_model_len} "
                          "tokens; shorten the input or set truncate_prompt_tokens", param=param,
                          code="context_length_exceeded")


# ---------------------------------------------------------------------------------------------- tokenizing
_TRUNCATING: dict[tuple[int, int], HFTokenizer] = {}


def _truncating(hf: HFTokenizer, limit: int) -> HFTokenizer:
    """A copy of ``hf`` that truncates to ``limit`` tokens (longest-first for pairs), special tokens kept."""
    key = (id(hf), limit)
    tok = _TRUNCATING.get(key)
    if tok is None:
        tok = HFTokenizer.from_str(hf.to_str())
        tok.no_padding()
        tok.enable_truncation(max_length=limit, strategy="longest_first", direction="right")
        if len(_TRUNCATING) > 64:
            _TRUNCATING.clear()
        _TRUNCATING[key] = tok
    return tok


def _encode(state: ServerState, text: str, limit: int | None, special: bool, param: str,
            max_len: int | None = None) -> list[int]:
    hf = state.tokenizer.hf
    ids = hf.encode(text, add_special_tokens=special).ids
    if limit is not None and len(ids) > limit:
        ids = _truncating(hf, limit).encode(text, add_special_tokens=special).ids
    _check_len(state, len(ids), param, max_len)
    return list(ids)


def _token_ids(state: ServerState, ids: list[int], limit: int | None, param: str,
               max_len: int | None = None) -> list[int]:
    vocab = int(_hf_config(state).get("vocab_size") or 0)
    if vocab and any(not 0 <= t < vocab for t in ids):
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise bad_request(f"{param}: token id {bad} is out of range [0, {vocab})", param=param)
    if limit is not None:
        ids = ids[-limit:]
    _check_len(state, len(ids), param, max_len)
    return list(ids)


def _cut_tokens(state: ServerState, text: str, limit: int) -> str:
    """``text`` cut to its first ``limit`` tokens (rerank's ``max_tokens_per_doc``)."""
    enc = state.tokenizer.hf.encode(text, add_special_tokens=False)
    if len(enc.ids) <= limit:
        return text
    return text[: enc.offsets[limit - 1][1]]


def _encode_pair(state: ServerState, a: str, b: str, limit: int | None, param: str) -> Prompt:
    tok = state.tokenizer
    ids, types = tok.encode_pair(a, b)
    if limit is not None and len(ids) > limit:
        enc = _truncating(tok.hf, limit).encode(a, b)
        ids, types = list(enc.ids), list(enc.type_ids)
    _check_len(state, len(ids), param)
    prompt: Prompt = {"prompt_token_ids": ids}
    if int(_hf_config(state).get("type_vocab_size") or 2) > 1:  # XLM-R has a single token type
        prompt["token_type_ids"] = types
    return prompt


# ---------------------------------------------------------------------------------------------- running
async def _run(state: ServerState, raw: Request, prompts: list[Prompt], params: PoolingParams, base_id: str,
               priority: int) -> list[PoolingOutput]:
    """Runs every prompt, at most ``max_num_seqs`` in the engine at once: a request larger than one step
    admits is split across steps instead of overflowing the waiting queue (which would answer 503 on an idle
    server). The engine batches them with whatever else is waiting."""
    window = asyncio.Semaphore(max(1, int(getattr(state.engine, "max_num_seqs", 256))))

    async def one(i: int, prompt: Prompt) -> PoolingOutput:
        async with window:
            stream = await state.engine.add_request(f"{base_id}-{i}", prompt, params, priority=priority)
            try:
                last = None
                async for out in stream:
                    last = out
                return last  # type: ignore[return-value]
            finally:
                state.engine.release(stream)

    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
    everything = asyncio.ensure_future(asyncio.gather(*tasks))
    watcher = asyncio.ensure_future(wait_for_disconnect(raw))
    try:
        await asyncio.wait({everything, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not everything.done():
            for t in tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await everything
    if not everything.done() or everything.cancelled():
        raise ClientDisconnected()
    finals = everything.result()
    for out in finals:
        if not isinstance(out, PoolingOutput) or out.data is None:
            raise APIError(503, "the request was aborted before it finished (the server is shutting down)",
                           code="aborted")
    return finals


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12))


async def _scores(state: ServerState, raw: Request, req: ScoreRequest | RerankRequest, left: list[str],
                  right: list[str], base_id: str, names: tuple[str, str]) -> tuple[list[float], int]:
    """Scores of ``left[i or 0]`` vs ``right[i]``; returns ``(scores, prompt tokens)``. ``names``: the request
    fields of the two sides, for error messages."""
    limit = _limit(state, req.truncate_prompt_tokens)
    priority = req.priority or 0

    def param(side: int, i: int) -> str:
        return names[side] if len((left, right)[side]) == 1 else f"{names[side]}[{i}]"

    if state.task == "embed":  # cosine similarity of embeddings; a single left text is embedded once
        special = req.add_special_tokens is not False
        prompts = [{"prompt_token_ids": _encode(state, t, limit, special, param(0, i))} for i, t in enumerate(left)]
        prompts += [{"prompt_token_ids": _encode(state, t, limit, special, param(1, i))} for i, t in enumerate(right)]
        outs = await _run(state, raw, prompts, PoolingParams(task="embed"), base_id, priority)
        emb = [o.data for o in outs]
        lhs, rhs = emb[: len(left)], emb[len(left):]
        scores = [_cosine(lhs[i if len(lhs) > 1 else 0], r) for i, r in enumerate(rhs)]
        return scores, sum(len(o.prompt_token_ids) for o in outs)
    num_labels = num_labels_of(_hf_config(state))
    if num_labels != 1:
        raise bad_request(f"this cross-encoder has {num_labels} labels; scoring needs a model with one label")
    pairs = [_encode_pair(state, left[i if len(left) > 1 else 0], r, limit, param(1, i)) for i, r in enumerate(right)]
    outs = await _run(state, raw, pairs, PoolingParams(task="score", use_activation=req.use_activation,
                                                       truncate_prompt_tokens=None), base_id, priority)
    return [float(o.data.reshape(-1)[0]) for o in outs], sum(len(o.prompt_token_ids) for o in outs)


def _ids(prefix: str, req: Any, raw: Request) -> str:
    return request_ids(req, raw, prefix)[1]


# ---------------------------------------------------------------------------------------------- metrics
class _PoolingMetrics:
    """Stat listener turning the engine's pooling batch figures into Prometheus series."""

    def __init__(self, state: ServerState) -> None:
        assert state.metrics is not None
        m = state.metrics
        labels = list(m.labels)
        self.steps = Counter("slicelm:pooling_steps", "Engine steps that ran pooling requests.", labels,
                             registry=m.registry).labels(**m.labels)
        self.multi = Counter("slicelm:pooling_multi_request_steps", "Pooling steps that batched 2+ requests.",
                             labels, registry=m.registry).labels(**m.labels)
        self.requests = Counter("slicelm:pooling_requests", "Pooling requests run by the engine.", labels,
                                registry=m.registry).labels(**m.labels)
        self.max_batch = Gauge("slicelm:pooling_max_batch_requests", "Most pooling requests in one step.", labels,
                               registry=m.registry).labels(**m.labels)
        self._prev: dict[str, float] = {}

    def __call__(self, stats: EngineStats, _: IterationStats) -> None:
        extra = stats.extra
        for key, counter in (("pooling_steps", self.steps), ("pooling_multi_request_steps", self.multi),
                             ("pooling_requests", self.requests)):
            value = extra.get(key, 0.0)
            if value > self._prev.get(key, 0.0):
                counter.inc(value - self._prev.get(key, 0.0))
                self._prev[key] = value
        self.max_batch.set(extra.get("pooling_max_batch_requests", 0.0))


def _ensure_metrics(raw: Request, state: ServerState) -> None:
    if state.metrics is None or getattr(raw.app.state, "pooling_metrics", None) is not None:
        return
    listener = _PoolingMetrics(state)
    raw.app.state.pooling_metrics = listener
    state.engine.add_stat_listener(listener)


# ---------------------------------------------------------------------------------------------- endpoints
async def embed_outputs(state: ServerState, raw: Request, req: EmbeddingRequest) -> tuple[str, list[PoolingOutput]]:
    """Tokenizes ``req``'s inputs and runs them; returns ``(response id, outputs)``."""
    _require_tasks(state, ("embed",), "Embeddings")
    _ensure_metrics(raw, state)
    _check_dimensions(state, req.dimensions)
    limit = _limit(state, req.truncate_prompt_tokens)
    special = req.add_special_tokens is not False
    resp_id = _ids("embd", req, raw)
    items = req.inputs()
    many = isinstance(req.input, list) and not isinstance(req.input[0], int)

    cap = _embed_cap(state)

    def tokenize() -> list[Prompt]:
        return [{"prompt_token_ids": _encode(state, item, limit, special, f"input[{i}]" if many else "input", cap)
                 if isinstance(item, str) else _token_ids(state, item, limit, f"input[{i}]" if many else "input",
                                                          cap)}
                for i, item in enumerate(items)]

    prompts = await asyncio.to_thread(tokenize) if req.messages is None else \
        [await _chat_prompt(state, req, limit, cap)]
    normalize = req.normalize if req.normalize is not None else req.use_activation
    if any(len(p["prompt_token_ids"]) > state.max_model_len for p in prompts):
        info = getattr(state.engine, "info", None)
        return resp_id, await run_chunked(
            prompts, lambda ps, params: _run(state, raw, ps, params, resp_id, req.priority or 0),
            state.max_model_len, getattr(info, "pooling_type", None), getattr(info, "pooling_normalize", None),
            req.dimensions, normalize, resp_id)
    params = PoolingParams(dimensions=req.dimensions, normalize=normalize, task="embed")
    return resp_id, await _run(state, raw, prompts, params, resp_id, req.priority or 0)


def _embed_cap(state: ServerState) -> int:
    """Most tokens one embedding input may have: max_model_len, or more with chunked processing."""
    pc = state.options.pooler_config
    if not pc.enable_chunked_processing:
        return state.max_model_len
    return pc.max_embed_len if pc.max_embed_len is not None else sys.maxsize


async def _chat_prompt(state: ServerState, req: EmbeddingRequest, limit: int | None, cap: int) -> Prompt:
    """vLLM's chat-style embedding input: the messages rendered with the chat template, then tokenized."""
    assert req.messages is not None
    messages = convert_messages(req.messages)
    check_text_size(state, sum(len(m["content"] or "") for m in messages), "messages",
                    truncating=req.truncate_prompt_tokens is not None or cap > state.max_model_len)
    template = request_template(state, req.chat_template, req.chat_template_kwargs)
    ids = await asyncio.to_thread(
        render_chat, state, messages, add_generation_prompt=bool(req.add_generation_prompt),
        continue_final_message=bool(req.continue_final_message), template=template, kwargs=req.chat_template_kwargs,
        tools=None, documents=None, add_special_tokens=bool(req.add_special_tokens))
    return {"prompt_token_ids": _token_ids(state, ids, limit, "messages", cap)}


@router.post("/v1/embeddings")
async def create_embeddings(raw: Request) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, EmbeddingRequest)
    model = state.check_model(req.model, required=False)
    try:
        resp_id, outs = await embed_outputs(state, raw, req)
    except ClientDisconnected:
        return Response(status_code=499)
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    headers = response_headers(state, resp_id)
    if req.encoding_format in ("bytes", "bytes_only"):
        blobs = [vector_bytes(o.data, req.embed_dtype, req.endianness) for o in outs]
        if req.encoding_format == "bytes":
            items = [{"index": i, "start": sum(len(b) for b in blobs[:i]), "end": sum(len(b) for b in blobs[: i + 1]),
                      "shape": [int(o.data.numel())]} for i, o in enumerate(outs)]
            headers["metadata"] = json.dumps({"id": resp_id, "created": int(time.time()), "model": model,
                                              "embed_dtype": req.embed_dtype, "endianness": req.endianness,
                                              "data": items, "usage": usage}, separators=(",", ":"))
        return Response(b"".join(blobs), media_type="application/octet-stream", headers=headers)
    data = [{"object": "embedding", "index": i,
             "embedding": encode_vector(o.data, req.encoding_format, req.embed_dtype, req.endianness)}
            for i, o in enumerate(outs)]
    body = {"id": resp_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": usage}
    return JSONResponse(body, headers=headers)


@router.post("/v1/score")
@router.post("/score")
async def create_score(raw: Request) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, ScoreRequest)
    model = state.check_model(req.model, required=False)
    _require_tasks(state, ("embed", "score"), "Score")
    _ensure_metrics(raw, state)
    left, right = req.lists()
    resp_id = _ids("score", req, raw)
    try:
        scores, tokens = await _scores(state, raw, req, left, right, resp_id, ("text_1", "text_2"))
    except ClientDisconnected:
        return Response(status_code=499)
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    body = {"id": resp_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return JSONResponse(body, headers=response_headers(state, resp_id))


async def _rerank(raw: Request, cohere_v2: bool) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, RerankRequest)
    model = state.check_model(req.model, required=False)
    _require_tasks(state, ("embed", "score"), "Rerank")
    _ensure_metrics(raw, state)
    docs = req.texts()
    if req.max_tokens_per_doc is not None:
        docs = [_cut_tokens(state, d, req.max_tokens_per_doc) for d in docs]
    resp_id = _ids("rerank", req, raw)
    try:
        scores, tokens = await _scores(state, raw, req, [req.query], docs, resp_id, ("query", "documents"))
    except ClientDisconnected:
        return Response(status_code=499)
    order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))[: req.top_n or len(docs)]  # 0: all
    return_docs = req.return_documents if req.return_documents is not None else not cohere_v2
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if return_docs:
            item["document"] = {"text": docs[i]}
        results.append(item)
    body: dict[str, Any] = {"id": resp_id, "model": model, "results": results,
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    if cohere_v2:
        body["meta"] = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
    return JSONResponse(body, headers=response_headers(state, resp_id))


@router.post("/v1/rerank")
@router.post("/rerank")
async def create_rerank(raw: Request) -> Response:
    """Jina / vLLM shape (``return_documents`` defaults to true)."""
    return await _rerank(raw, cohere_v2=False)


@router.post("/v2/rerank")
async def create_rerank_v2(raw: Request) -> Response:
    """Cohere v2 shape (``return_documents`` defaults to false, ``meta`` block)."""
    return await _rerank(raw, cohere_v2=True)
