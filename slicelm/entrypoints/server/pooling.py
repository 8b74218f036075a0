"""``/v1/embeddings``, and what every pooling endpoint shares (checks, tokenizing, running); score / rerank are in
``score.py``.

Which model serves what (as vLLM): an embedding model (task "embed") serves embeddings (and score / rerank);
a cross-encoder (task "score") serves score / rerank; a generative model serves none (400).

Every input of a request becomes one engine request; they are all handed to the engine before the first
one is awaited, so the engine loop batches them with whatever else is waiting. Text is tokenized here
(``truncate_prompt_tokens`` cuts text on the right, keeping the special tokens, as transformers does; token
id inputs keep their last tokens, as vLLM does); an input longer than ``max_model_len`` without truncation
is a 400. Batching is visible in ``/metrics`` (``metrics.py``: ``slicelm:pooling_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from tokenizers import Tokenizer as HFTokenizer

from slicelm.engine.request import PoolingOutput
from slicelm.entrypoints.server.chat import convert_messages, render_chat, request_template
from slicelm.entrypoints.server.embed_chunking import run_chunked
from slicelm.entrypoints.server.embed_encoding import encode_vector, vector_bytes
from slicelm.entrypoints.server.errors import APIError, bad_request
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.pooling_protocol import EmbeddingRequest
from slicelm.entrypoints.server.request_ids import request_ids
from slicelm.entrypoints.server.state import (
    TASK_ENDPOINTS,
    ClientDisconnected,
    ServerState,
    get_state,
    wait_for_disconnect,
)
from slicelm.pooling_params import PoolingParams

router = APIRouter()
Prompt = dict[str, list[int]]


# ---------------------------------------------------------------------------------------------- checks
def require_tasks(state: ServerState, tasks: tuple[str, ...], api: str) -> None:
    if state.task in tasks:
        return
    wanted = " or ".join(repr(t) for t in tasks)
    raise bad_request(f"The model `{state.served_model_names[0]}` does not support the {api} API: it is served "
                      f"for {TASK_ENDPOINTS.get(state.task, state.task)} (task {state.task!r}); start a model "
                      f"with task {wanted} for this endpoint", code="wrong_task")


def hf_config(state: ServerState) -> dict[str, Any]:
    return state.engine.model_config.hf_config or {}


def _check_dimensions(state: ServerState, dims: int | None) -> None:
    """As vLLM: ``dimensions`` only for Matryoshka models (config ``is_matryoshka`` / ``matryoshka_dimensions``)."""
    if dims is None:
        return
    cfg = hf_config(state)
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


def prompt_limit(state: ServerState, truncate: int | None) -> int | None:
    if truncate is None:
        return None
    if truncate == -1:
        return state.max_model_len
    if truncate > state.max_model_len:  # vLLM's pooling text
        raise bad_request("truncate_prompt_tokens value is greater than max_model_len. Please request a smaller "
                          "truncation size.", param="truncate_prompt_tokens")
    return truncate


def check_len(state: ServerState, n: int, param: str, max_len: int | None = None) -> None:
    if max_len is not None and max_len != state.max_model_len:  # chunked embeddings (--pooler-config)
        if n > max_len:
            raise bad_request(f"{param}: this model's maximum embedding input length is {max_len} tokens "
                              f"(max_embed_len); the input has {n} tokens", param=param,
                              code="context_length_exceeded")
        return
    if n > state.max_model_len:  # vLLM's text (clients match on its last sentence)
        raise bad_request(f"This model's maximum context length is {state.max_model_len} tokens. However, your "
                          f"prompt contains {n} input tokens, which exceeds this limit even without any output "
                          "tokens. Please reduce the length of the input prompt.", param=param,
                          code="context_length_exceeded")


# ---------------------------------------------------------------------------------------------- tokenizing
_TRUNCATING: dict[tuple[int, int, str], HFTokenizer] = {}


def truncating(hf: HFTokenizer, limit: int, direction: str = "right") -> HFTokenizer:
    """A copy of ``hf`` that truncates to ``limit`` tokens (longest-first for pairs), special tokens kept;
    ``direction`` "left" drops the first tokens instead of the last."""
    key = (id(hf), limit, direction)
    tok = _TRUNCATING.get(key)
    if tok is None:
        tok = HFTokenizer.from_str(hf.to_str())
        tok.no_padding()
        tok.enable_truncation(max_length=limit, strategy="longest_first", direction=direction)
        if len(_TRUNCATING) > 64:
            _TRUNCATING.clear()
        _TRUNCATING[key] = tok
    return tok


def encode_text(state: ServerState, text: str, limit: int | None, special: bool, param: str,
            max_len: int | None = None, side: str | None = None) -> list[int]:
    """``text``'s ids; over ``limit`` tokens, cut on ``side`` (vLLM's ``truncation_side``; default: right)."""
    hf = state.tokenizer.hf
    ids = hf.encode(text, add_special_tokens=special).ids
    if limit is not None and len(ids) > limit:
        ids = truncating(hf, limit, side or "right").encode(text, add_special_tokens=special).ids
    check_len(state, len(ids), param, max_len)
    return list(ids)


def token_ids(state: ServerState, ids: list[int], limit: int | None, param: str,
               max_len: int | None = None, side: str | None = None) -> list[int]:
    """Checked token ids; over ``limit``, the last ones kept (``side`` "right": the first ones)."""
    vocab = int(hf_config(state).get("vocab_size") or 0)
    if ids and min(ids) < 0:  # vLLM's texts: the smallest id if one is negative, else the largest
        raise bad_request(f"Token id {min(ids)} is out of vocabulary", param=param)
    if ids and vocab and max(ids) >= vocab:
        raise bad_request(f"Token id {max(ids)} is out of vocabulary", param=param)
    if limit is not None:
        ids = ids[:limit] if side == "right" else ids[-limit:]
    check_len(state, len(ids), param, max_len)
    return list(ids)


def pad_prompts(state: ServerState, prompts: list[Prompt], padding: str | None, cap: int) -> list[Prompt]:
    """vLLM's ``padding: "max_length"``: each prompt filled with the pad token up to the longest input the
    model takes (for models trained at a fixed length without an attention mask); ``do_not_pad``: as is."""
    if padding != "max_length":
        return prompts
    pad = state.tokenizer.pad_token_id
    if pad is None:
        raise bad_request("padding: the tokenizer has no pad token", param="padding")
    target = min(state.max_model_len, cap)
    return [{**p, "prompt_token_ids": p["prompt_token_ids"] + [pad] * (target - len(p["prompt_token_ids"]))}
            for p in prompts]


# ---------------------------------------------------------------------------------------------- running
async def run_prompts(state: ServerState, raw: Request, prompts: list[Prompt], params: PoolingParams, base_id: str,
               priority: int) -> list[PoolingOutput]:
    """Runs every prompt, at most ``max_num_seqs`` in the engine at once: a request larger than one step
    admits is split across steps instead of overflowing the waiting queue (which would answer 503 on an idle
    server). The engine batches them with whatever else is waiting."""
    window = asyncio.Semaphore(max(1, state.engine.max_num_seqs))

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


def pooling_usage(tokens: int) -> dict[str, Any]:
    """vLLM's ``UsageInfo`` of a pooling response: every field, the ones pooling has no use for at 0 / null."""
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None,
            "completion_tokens_details": None}


def engine_request_id(prefix: str, req: Any, raw: Request) -> str:
    return request_ids(req, raw, prefix)[1]


# ---------------------------------------------------------------------------------------------- endpoints
async def embed_outputs(state: ServerState, raw: Request, req: EmbeddingRequest) -> tuple[str, list[PoolingOutput]]:
    """Tokenizes ``req``'s inputs and runs them; returns ``(response id, outputs)``."""
    require_tasks(state, ("embed",), "Embeddings")
    _check_dimensions(state, req.dimensions)
    limit = prompt_limit(state, req.truncate_prompt_tokens)
    special = req.add_special_tokens is not False
    resp_id = engine_request_id("embd", req, raw)
    items = req.inputs()
    many = isinstance(req.input, list) and not isinstance(req.input[0], int)

    cap = _embed_cap(state)

    side = req.truncation_side

    def tokenize() -> list[Prompt]:
        return [{"prompt_token_ids": encode_text(state, item, limit, special, f"input[{i}]" if many else "input", cap,
                                                 side)
                 if isinstance(item, str) else token_ids(state, item, limit, f"input[{i}]" if many else "input",
                                                          cap, side)}
                for i, item in enumerate(items)]

    prompts = await asyncio.to_thread(tokenize) if req.messages is None else \
        [await chat_pooling_prompt(state, req, limit, cap)]
    prompts = pad_prompts(state, prompts, req.padding, cap)
    normalize = req.normalize if req.normalize is not None else req.use_activation
    if any(len(p["prompt_token_ids"]) > state.max_model_len for p in prompts):
        info = state.engine.info
        return resp_id, await run_chunked(
            prompts, lambda ps, params: run_prompts(state, raw, ps, params, resp_id, req.priority or 0),
            state.max_model_len, info.pooling_type, info.pooling_normalize,
            req.dimensions, normalize, resp_id)
    params = PoolingParams(dimensions=req.dimensions, normalize=normalize, task="embed")
    return resp_id, await run_prompts(state, raw, prompts, params, resp_id, req.priority or 0)


def _embed_cap(state: ServerState) -> int:
    """Most tokens one embedding input may have: max_model_len, or more with chunked processing."""
    pc = state.options.pooler_config
    if not pc.enable_chunked_processing:
        return state.max_model_len
    return pc.max_embed_len if pc.max_embed_len is not None else sys.maxsize


async def chat_pooling_prompt(state: ServerState, req: EmbeddingRequest, limit: int | None, cap: int) -> Prompt:
    """vLLM's chat-style embedding input: the messages rendered with the chat template, then tokenized."""
    assert req.messages is not None
    messages = convert_messages(req.messages)
    state.check_text_size(sum(len(m["content"] or "") for m in messages), "messages",
                    truncating=req.truncate_prompt_tokens is not None or cap > state.max_model_len)
    template = request_template(state, req.chat_template, req.chat_template_kwargs)
    ids = await asyncio.to_thread(
        render_chat, state, messages, add_generation_prompt=bool(req.add_generation_prompt),
        continue_final_message=bool(req.continue_final_message), template=template, kwargs=req.chat_template_kwargs,
        tools=None, documents=None, add_special_tokens=bool(req.add_special_tokens))
    return {"prompt_token_ids": token_ids(state, ids, limit, "messages", cap, req.truncation_side)}


@router.post("/v1/embeddings")
async def create_embeddings(raw: Request) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, EmbeddingRequest)
    model = state.check_model(req.model, required=False)
    try:
        resp_id, outs = await embed_outputs(state, raw, req)
    except ClientDisconnected:
        return Response(status_code=499)
    usage = pooling_usage(sum(len(o.prompt_token_ids) for o in outs))
    headers: dict[str, str] = {}
    if req.encoding_format in ("bytes", "bytes_only"):
        blobs = [vector_bytes(o.data, req.embed_dtype, req.endianness) for o in outs]
        if req.encoding_format == "bytes":  # vLLM's metadata header: each item names its dtype and byte order
            items = [{"index": i, "embed_dtype": req.embed_dtype, "endianness": req.endianness,
                      "start": sum(len(b) for b in blobs[:i]), "end": sum(len(b) for b in blobs[: i + 1]),
                      "shape": [int(o.data.numel())]} for i, o in enumerate(outs)]
            headers["metadata"] = json.dumps({"id": resp_id, "created": int(time.time()), "model": model,
                                              "data": items, "usage": {"prompt_tokens": usage["prompt_tokens"],
                                                                       "total_tokens": usage["total_tokens"]}})
        return Response(b"".join(blobs), media_type="application/octet-stream", headers=headers)
    data = [{"object": "embedding", "index": i,
             "embedding": encode_vector(o.data, req.encoding_format, req.embed_dtype, req.endianness)}
            for i, o in enumerate(outs)]
    body = {"id": resp_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": usage}
    return JSONResponse(body, headers=headers)
