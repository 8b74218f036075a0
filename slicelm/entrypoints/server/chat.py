"""``POST /v1/chat/completions`` (stream and non-stream)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slicelm.entrypoints.server.errors import bad_request, from_exception
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.protocol import ROLES, ChatCompletionRequest, ChatMessage
from slicelm.entrypoints.server.sampling import build_sampling_params, chat_logprobs, usage
from slicelm.entrypoints.server.state import ClientDisconnected, ServerState, final_outputs, get_state
from slicelm.entrypoints.server.streaming import SSE_HEADERS, DeltaTracker, sse, sse_done, sse_error

router = APIRouter()


def convert_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Checks roles and content; returns the plain dicts chat templates expect (text parts joined)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if m.role not in ROLES:
            raise bad_request(f"{param}.role: invalid role {m.role!r}; expected one of {', '.join(ROLES)}",
                              param=f"{param}.role", code="invalid_value")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"{param}.content[{j}]: content part type {part.type!r} is not supported "
                                      "(only 'text' with a 'text' field)", param=f"{param}.content[{j}].type")
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None and not (m.role == "assistant" and (m.tool_calls or m.function_call)):
            raise bad_request(f"{param}.content: is required for role {m.role!r}", param=f"{param}.content")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(m, key) is not None:
                msg[key] = getattr(m, key)
        out.append(msg)
    return out


def render_prompt(state: ServerState, req: ChatCompletionRequest, messages: list[dict[str, Any]]) -> list[int]:
    tok = state.tokenizer
    try:
        text = tok.apply_chat_template(
            messages, add_generation_prompt=bool(req.add_generation_prompt),
            continue_final_message=bool(req.continue_final_message),
            chat_template=req.chat_template or state.chat_template, tools=req.tools or None,
            documents=req.documents, **(req.chat_template_kwargs or {}))
    except TypeError as e:
        raise bad_request(f"chat_template_kwargs: {e}", param="chat_template_kwargs") from e
    except ValueError as e:
        raise bad_request(f"messages: {e}", param="messages", code="invalid_chat") from e
    return tok.encode(text, add_special_tokens=bool(req.add_special_tokens))


@router.post("/v1/chat/completions")
async def create_chat_completion(raw: Request) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, ChatCompletionRequest)
    model = state.check_model(req.model)
    state.require_task("generate", "Chat Completions")
    messages = convert_messages(req.messages)
    prompt_ids = render_prompt(state, req, messages)
    if req.truncate_prompt_tokens is not None:
        prompt_ids = prompt_ids[-req.truncate_prompt_tokens:]
    max_tokens = state.check_length(len(prompt_ids), req.effective_max_tokens, param="messages")
    top_n = req.top_logprobs or 0
    params = build_sampling_params(state, req, max_tokens, logprobs=top_n if req.logprobs else None)
    resp_id = f"chatcmpl-{req.request_id or raw.headers.get('x-request-id') or uuid.uuid4().hex}"
    engine_id = resp_id if not (req.request_id or raw.headers.get("x-request-id")) \
        else f"{resp_id}-{uuid.uuid4().hex[:8]}"
    stream = await state.engine.add_request(engine_id, {"prompt_token_ids": prompt_ids}, params,
                                            priority=req.priority or 0)
    echo = ""
    if req.echo and messages and messages[-1]["role"] == "assistant" and isinstance(messages[-1]["content"], str):
        echo = messages[-1]["content"]
    created = int(time.time())
    if req.stream:
        return StreamingResponse(_stream(state, req, stream, resp_id, model, created, len(prompt_ids), echo),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        (final,) = await final_outputs([stream], raw)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        state.engine.release(stream)
    choices = []
    for o in final.outputs:
        choice: dict[str, Any] = {
            "index": o.index,
            "message": {"role": "assistant", "content": echo + o.text, "refusal": None, "tool_calls": []},
            "logprobs": chat_logprobs(state, o.token_ids, o.logprobs, top_n) if req.logprobs else None,
            "finish_reason": o.finish_reason or "abort",
            "stop_reason": o.stop_reason,
        }
        choices.append(choice)
    body = {
        "id": resp_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
        "usage": usage(len(prompt_ids), sum(len(o.token_ids) for o in final.outputs), final.num_cached_tokens),
        "system_fingerprint": None, "service_tier": None,
    }
    return JSONResponse(body, headers={"x-request-id": resp_id})


async def _stream(state: ServerState, req: ChatCompletionRequest, stream: Any, resp_id: str, model: str,
                  created: int, num_prompt: int, echo: str) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    n = req.n or 1
    top_n = req.top_logprobs or 0
    tracker = DeltaTracker(n)

    def chunk(choices: list[dict[str, Any]], completion_tokens: int | None = None) -> str:
        body: dict[str, Any] = {"id": resp_id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "system_fingerprint": None, "choices": choices}
        if include_usage:
            body["usage"] = usage(num_prompt, completion_tokens) if continuous and completion_tokens is not None \
                else None
        return sse(body)

    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": echo}, "logprobs": None,
                      "finish_reason": None} for i in range(n)], 0)
        async for out in stream:
            choices = []
            for o in out.outputs:
                d = tracker.delta(o)
                if d is None:
                    continue
                text, new_ids, new_lps = d
                choice: dict[str, Any] = {"index": o.index, "delta": {"content": text} if text else {},
                                          "logprobs": None, "finish_reason": o.finish_reason,
                                          "stop_reason": o.stop_reason}
                if req.logprobs:
                    choice["logprobs"] = chat_logprobs(state, new_ids, new_lps, top_n)
                choices.append(choice)
            if choices:
                yield chunk(choices, tracker.num_tokens)
        if include_usage:
            yield sse({"id": resp_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage(num_prompt, tracker.num_tokens)})
    except Exception as e:  # the engine died mid-stream: tell the client in-band
        yield sse_error(from_exception(e))
    finally:
        state.engine.release(stream)
    yield sse_done()
