"""``POST /v1/completions`` (stream and non-stream; one or several prompts, text or token ids)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slicelm.engine.request_stream import RequestStream
from slicelm.entrypoints.server.errors import bad_request, from_exception
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.load import load_headers, observe_params
from slicelm.entrypoints.server.protocol import CompletionRequest
from slicelm.entrypoints.server.request_ids import request_ids
from slicelm.entrypoints.server.sampling import (
    build_sampling_params,
    completion_logprobs,
    prompt_logprobs_json,
    resolve_num_logprobs,
    resolve_prompt_logprobs,
    shown_logprobs,
    tokens_as_ids,
    truncate_prompt,
)
from slicelm.entrypoints.server.state import (
    ClientDisconnected,
    ServerState,
    add_requests,
    final_outputs,
    get_state,
    merge_streams,
    off_loop,
)
from slicelm.entrypoints.server.streaming import SSE_HEADERS, DeltaTracker, sse, sse_done, sse_error
from slicelm.entrypoints.server.structured import request_structured_outputs
from slicelm.entrypoints.server.usage import chunk_usage, final_chunk_usage, request_metrics, usage

router = APIRouter()
MAX_PROMPTS = 1024


def tokenize_prompts(state: ServerState, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    """``(text or None, token ids)`` per prompt (blocking: call it through ``off_loop``); 400 for token ids
    outside the vocabulary (vLLM's message)."""
    p = req.prompt
    assert p is not None  # the request's validator refuses a missing prompt
    if isinstance(p, str):
        items: list[Any] = [p]
    elif p and isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    vocab = state.tokenizer.vocab_size if state.engine.tokenizer is not None else None
    out: list[tuple[str | None, list[int]]] = []
    for item in items:
        if isinstance(item, str):
            out.append((item, state.tokenizer.encode(item, add_special_tokens=bool(req.add_special_tokens))))
        else:
            if vocab is not None and any(not 0 <= t < vocab for t in item):
                bad = max(item) if max(item) >= vocab else min(item)
                raise bad_request(f"prompt: Token id {bad} is out of vocabulary (vocabulary size {vocab})",
                                  param="prompt")
            out.append((None, list(item)))
        if req.truncate_prompt_tokens is not None:
            text, ids = out[-1]
            cut = truncate_prompt(ids, req)
            out[-1] = (text if len(cut) == len(ids) else None, cut)
    return out


def _check_prompts(state: ServerState, req: CompletionRequest) -> None:
    p = req.prompt
    assert p is not None
    items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
    state.check_text_size(max((len(x) for x in items if isinstance(x, str)), default=0), "prompt",
                    truncating=req.truncate_prompt_tokens is not None)


def _echo_text(state: ServerState, req: CompletionRequest, text: str | None, ids: list[int]) -> str:
    """The prompt text ``echo`` prepends; none with ``return_token_ids`` (as vLLM: the ids carry the prompt)."""
    if not req.echo or req.return_token_ids:
        return ""
    return text if text is not None else state.tokenizer.decode(ids, skip_special_tokens=False)


@router.post("/v1/completions")
async def create_completion(raw: Request) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, CompletionRequest)
    model = state.check_model(req.model, required=False)
    state.require_task("generate", "Completions")
    resp_id, engine_base = request_ids(req, raw, "cmpl")
    priority = state.check_priority(req.priority)
    _check_prompts(state, req)
    prompts = await off_loop(tokenize_prompts, state, req)
    if any(not ids for _, ids in prompts):
        raise bad_request("prompt: Either prompt or prompt_embeds must be provided and non-empty.", param="prompt",
                          code="empty_prompt")
    num_lp = resolve_num_logprobs(state, req.logprobs, "logprobs")
    num_prompt_lp = resolve_prompt_logprobs(state, req)
    if num_prompt_lp is None and req.echo and num_lp is not None:
        num_prompt_lp = num_lp  # vLLM: echo + logprobs gives the echoed prompt tokens their logprobs
    constraint = request_structured_outputs(req, state.options.structured_outputs_backend)
    params_list = []
    for _, ids in prompts:
        max_tokens = state.check_length(len(ids), req.max_tokens, param="prompt")
        params_list.append(build_sampling_params(state, req, max_tokens, logprobs=num_lp,
                                                 prompt_logprobs=num_prompt_lp))
        params_list[-1].structured_outputs = constraint
    streams = await add_requests(state, engine_base, [ids for _, ids in prompts], params_list, priority)
    for params in params_list:
        observe_params(state, params)
    created = int(time.time())
    echo_texts = [_echo_text(state, req, text, ids) for text, ids in prompts]
    if req.stream:
        return StreamingResponse(_stream(state, req, streams, prompts, echo_texts, resp_id, model, created),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        finals = await final_outputs(streams, raw)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        for s in streams:
            state.engine.release(s)
    n = req.n or 1
    as_ids = tokens_as_ids(state, req)
    shown = shown_logprobs(state, req, req.logprobs, "logprobs")
    choices = []
    for p_idx, final in enumerate(finals):
        prompt_ids = prompts[p_idx][1]
        for o in final.outputs:
            lp = None
            if num_lp is not None:
                lp = completion_logprobs(state, o.token_ids, o.logprobs, shown or 0, 0,
                                         echo_ids=prompt_ids if req.echo else None,
                                         echo_logprobs=final.prompt_logprobs, as_ids=as_ids)
            choice: dict[str, Any] = {"index": p_idx * n + o.index, "text": echo_texts[p_idx] + o.text,
                                      "logprobs": lp, "finish_reason": o.finish_reason or "abort",
                                      "stop_reason": o.stop_reason, "token_ids": None,
                                      "prompt_logprobs": prompt_logprobs_json(state, final.prompt_logprobs),
                                      "prompt_token_ids": None}  # every key, as vLLM's choice has them
            if req.return_token_ids:
                choice["prompt_token_ids"] = list(prompt_ids)
                choice["token_ids"] = list(o.token_ids)
            choices.append(choice)
    num_prompt = sum(len(ids) for _, ids in prompts)
    num_gen = sum(len(o.token_ids) for f in finals for o in f.outputs)
    cached = sum(f.num_cached_tokens for f in finals)
    body = {"id": resp_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(num_prompt, num_gen, cached, state.options.enable_prompt_tokens_details),
            "service_tier": None, "system_fingerprint": None, "kv_transfer_params": None, "metrics": None}
    if state.options.enable_per_request_metrics and len(choices) == 1:  # vLLM: one prompt, n = 1
        body["metrics"] = request_metrics(finals[0].metrics, num_gen)
    return JSONResponse(body, headers=load_headers(state, raw))


async def _stream(state: ServerState, req: CompletionRequest, streams: list[RequestStream],
                  prompts: list[tuple[str | None, list[int]]], echo_texts: list[str], resp_id: str, model: str,
                  created: int) -> AsyncIterator[str]:
    """One choice per chunk, as vLLM streams (``n > 1`` and several prompts included)."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage) or \
        state.options.enable_force_include_usage
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats) or \
        state.options.enable_force_include_usage  # vLLM: forced usage is on every chunk
    n = req.n or 1
    num_lp = shown_logprobs(state, req, req.logprobs, "logprobs")
    as_ids = tokens_as_ids(state, req)
    num_prompt = sum(len(ids) for _, ids in prompts)
    trackers = [DeltaTracker(n) for _ in prompts]
    offsets = [[0] * n for _ in prompts]
    started = [[False] * n for _ in prompts]
    cached = [0] * len(prompts)
    metrics = None

    def chunk(choice: dict[str, Any]) -> str:
        body: dict[str, Any] = {"id": resp_id, "object": "text_completion", "created": created, "model": model,
                                "choices": [choice], "system_fingerprint": None}
        if include_usage:
            body["usage"] = chunk_usage(num_prompt, sum(t.num_tokens for t in trackers)) if continuous else None
        return sse(body)

    try:
        async for p_idx, out in merge_streams(streams):
            cached[p_idx], metrics = out.num_cached_tokens, out.metrics
            for o in out.outputs:
                d = trackers[p_idx].delta(o)
                if d is None:
                    continue
                text, new_ids, new_lps = d
                i = o.index
                echo_ids = None
                first = not started[p_idx][i]
                if first:
                    started[p_idx][i] = True
                    if req.echo:
                        text = echo_texts[p_idx] + text
                        echo_ids = prompts[p_idx][1]
                lp = None
                if num_lp is not None:
                    lp = completion_logprobs(state, new_ids, new_lps, num_lp, offsets[p_idx][i], echo_ids,
                                             echo_logprobs=out.prompt_logprobs, as_ids=as_ids)
                    if lp["text_offset"]:
                        offsets[p_idx][i] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                choice: dict[str, Any] = {"index": p_idx * n + i, "text": text, "logprobs": lp,
                                          "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                if req.return_token_ids:
                    choice["token_ids"] = list(new_ids)
                    if first:
                        choice["prompt_token_ids"] = list(prompts[p_idx][1])
                yield chunk(choice)
        if include_usage:
            num_gen = sum(t.num_tokens for t in trackers)
            final = final_chunk_usage(num_prompt, num_gen, sum(cached), state.options.enable_prompt_tokens_details)
            last: dict[str, Any] = {"id": resp_id, "object": "text_completion", "created": created, "model": model,
                                    "choices": [], "usage": final}
            if state.options.enable_per_request_metrics and len(prompts) * n == 1:
                last["metrics"] = request_metrics(metrics, num_gen, streamed=True)
            yield sse(last)
    except Exception as e:
        yield sse_error(from_exception(e))
    finally:
        for s in streams:
            state.engine.release(s)
    yield sse_done()
