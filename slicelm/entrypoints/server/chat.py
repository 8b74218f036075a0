"""``POST /v1/chat/completions`` (stream and non-stream)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slicelm.engine.request import CompletionOutput
from slicelm.entrypoints.server.errors import bad_request, from_exception
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.load import load_headers, observe_params
from slicelm.entrypoints.server.protocol import ChatCompletionRequest, ChatMessage
from slicelm.entrypoints.server.request_ids import request_ids
from slicelm.entrypoints.server.sampling import (
    build_sampling_params,
    chat_logprobs,
    prompt_logprobs_json,
    resolve_num_logprobs,
    resolve_prompt_logprobs,
    shown_logprobs,
    tokens_as_ids,
    truncate_prompt,
)
from slicelm.entrypoints.server.state import ClientDisconnected, ServerState, final_outputs, get_state, off_loop
from slicelm.entrypoints.server.streaming import SSE_HEADERS, DeltaTracker, sse, sse_done, sse_error
from slicelm.entrypoints.server.structured import request_structured_outputs
from slicelm.entrypoints.server.tools import get_tool_parser
from slicelm.entrypoints.server.tools.streaming import ToolCallStreamer
from slicelm.entrypoints.server.tools.tool_choice import (
    ToolMode,
    extract_tool_calls,
    finish_reason,
    resolve_tool_mode,
    template_messages,
    tool_structured_outputs,
)
from slicelm.entrypoints.server.usage import chunk_usage, final_chunk_usage, request_metrics, usage
from slicelm.loader.tokenizer import MissingChatTemplateError
from slicelm.sampling_params import SamplingParams, StructuredOutputsParams

router = APIRouter()


def convert_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Checks content; returns the plain dicts chat templates expect (text parts joined). Any role passes
    (as vLLM: a template decides what it renders); ``developer`` becomes ``system``."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type not in ("text", "input_text") or part.text is None:
                    raise bad_request(f"{param}.content[{j}]: content part type {part.type!r} is not supported "
                                      "(only 'text' with a 'text' field)", param=f"{param}.content[{j}].type")
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None and not (m.role == "assistant" and (m.tool_calls or m.function_call)):
            raise bad_request(f"{param}.content: is required for role {m.role!r}", param=f"{param}.content")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": "" if content is None else content}  # as vLLM renders it
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(m, key) is not None:
                msg[key] = getattr(m, key)
        out.append(msg)
    return out


def request_template(state: ServerState, template: str | None, kwargs: dict[str, Any] | None) -> str | None:
    """The request's own chat template: refused unless ``--trust-request-chat-template`` (as vLLM)."""
    given = template if template is not None else (kwargs or {}).get("chat_template")
    if given is not None and not state.options.trust_request_chat_template:
        raise bad_request("chat_template: chat templates in requests are not accepted; the server must be started "
                          "with --trust-request-chat-template to render them", param="chat_template")
    return given


def render_chat(state: ServerState, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
                continue_final_message: bool, template: str | None, kwargs: dict[str, Any] | None,
                tools: list[dict[str, Any]] | None, documents: Any, add_special_tokens: bool) -> list[int]:
    """Chat template + tokenizer (blocking: call it through ``off_loop``)."""
    tok = state.tokenizer
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "chat_template"}
    try:
        text = tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            chat_template=template or state.chat_template, tools=tools or None, documents=documents, **kwargs)
    except TypeError as e:
        raise bad_request(f"chat_template_kwargs: {e}", param="chat_template_kwargs") from e
    except MissingChatTemplateError as e:  # vLLM's 400: its message, no param
        raise bad_request(str(e)) from e
    except ValueError as e:
        raise bad_request(f"messages: {e}", param="messages", code="invalid_chat") from e
    return tok.encode(text, add_special_tokens=add_special_tokens)


def tool_mode(state: ServerState, req: ChatCompletionRequest) -> ToolMode:
    opts = state.options
    parser = get_tool_parser(opts.tool_call_parser) if opts.tool_call_parser else None
    return resolve_tool_mode(req.tools, req.tool_choice, req.parallel_tool_calls, parser, opts.enable_auto_tool_choice)


def template_tools(state: ServerState, mode: ToolMode) -> list[dict[str, Any]] | None:
    """The tools the chat template sees (vLLM: all of them, unless --exclude-tools-when-tool-choice-none)."""
    if mode.kind == "none" and state.options.exclude_tools_when_tool_choice_none:
        return None
    return mode.tools or None


def reused_prompt_ids(state: ServerState, req: ChatCompletionRequest) -> list[int] | None:
    """``kv_transfer_params.prompt_token_ids`` (disaggregated serving: the prefill stage's ids, which the decode
    stage uses instead of rendering the messages again), checked as vLLM does; ignored with ``echo``."""
    ids = (req.kv_transfer_params or {}).get("prompt_token_ids")
    if ids is None or req.echo:
        return None
    param = "kv_transfer_params.prompt_token_ids"
    if not isinstance(ids, list) or not ids or any(type(t) is not int or t < 0 for t in ids):
        raise bad_request(f"{param}: `kv_transfer_params['prompt_token_ids']` must be a non-empty list of "
                          "non-negative integers.", param=param)
    if max(ids) >= state.tokenizer.vocab_size:
        raise bad_request(f"{param}: Token id {max(ids)} is out of vocabulary", param=param)
    return ids


async def chat_prompt_ids(state: ServerState, req: ChatCompletionRequest,
                          tools: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], list[int]]:
    messages = convert_messages(req.messages)
    reused = reused_prompt_ids(state, req)
    if reused is not None:
        return messages, reused
    state.check_text_size(sum(len(m["content"] or "") for m in messages), "messages",
                    truncating=req.truncate_prompt_tokens is not None)
    template = request_template(state, req.chat_template, req.chat_template_kwargs)
    ids = await off_loop(render_chat, state, template_messages(messages),
                         add_generation_prompt=bool(req.add_generation_prompt),
                         continue_final_message=bool(req.continue_final_message), template=template,
                         kwargs=req.chat_template_kwargs, tools=tools,
                         documents=req.documents, add_special_tokens=bool(req.add_special_tokens))
    return messages, truncate_prompt(ids, req)


@router.post("/v1/chat/completions")
async def create_chat_completion(raw: Request) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, ChatCompletionRequest)
    model = state.check_model(req.model, required=False)
    state.require_task("generate", "Chat Completions")
    resp_id, engine_id = request_ids(req, raw, "chatcmpl")
    priority = state.check_priority(req.priority)
    mode = tool_mode(state, req)
    constraint = chat_constraint(state, req, mode)
    messages, prompt_ids = await chat_prompt_ids(state, req, template_tools(state, mode))
    max_tokens = state.check_length(len(prompt_ids), req.effective_max_tokens, param="messages")
    params = chat_sampling_params(state, req, max_tokens, constraint)
    stream = await state.engine.add_request(engine_id, {"prompt_token_ids": prompt_ids}, params, priority=priority)
    observe_params(state, params)
    echo = echo_text(req, messages)
    created = int(time.time())
    if req.stream:
        return StreamingResponse(_stream(state, req, stream, resp_id, model, created, prompt_ids, echo, mode),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        (final,) = await final_outputs([stream], raw)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        state.engine.release(stream)
    top_n = shown_logprobs(state, req, req.top_logprobs, "top_logprobs") or 0
    choices = [chat_choice(state, req, o, o.index, echo, top_n, mode) for o in final.outputs]
    body: dict[str, Any] = {
        "id": resp_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
        "usage": usage(len(prompt_ids), sum(len(o.token_ids) for o in final.outputs), final.num_cached_tokens,
                       state.options.enable_prompt_tokens_details),
        "system_fingerprint": None, "service_tier": None,
        "prompt_logprobs": prompt_logprobs_json(state, final.prompt_logprobs),
        "prompt_token_ids": list(prompt_ids) if req.return_token_ids else None, "kv_transfer_params": None,
        "metrics": None,
    }
    if state.options.enable_per_request_metrics and len(final.outputs) == 1:  # vLLM: not with n > 1
        body["metrics"] = request_metrics(final.metrics, len(final.outputs[0].token_ids))
    return JSONResponse(body, headers=load_headers(state, raw))


def _tool_fragments(streamer: ToolCallStreamer, mode: ToolMode, text: str, reason: str | None
                    ) -> tuple[list[dict[str, Any]], str | None]:
    """A choice's delta objects for new text under a tool mode, and its finish reason (vLLM's)."""
    frags = streamer.feed(text)
    if reason is None:
        return frags, None
    more, called = streamer.finish()
    if (mode.kind == "auto" and called) or (mode.kind == "required" and reason == "stop"):
        reason = "tool_calls"
    return frags + more, reason


def chat_constraint(state: ServerState, req: ChatCompletionRequest, mode: ToolMode) -> StructuredOutputsParams | None:
    """What the output must match: a named / required tool choice's schema, else the request's structured
    outputs (the two cannot be combined)."""
    constraint = request_structured_outputs(req, state.options.structured_outputs_backend)
    if mode.kind in ("named", "required") and constraint is not None:
        raise bad_request("tool_choice: a named or 'required' tool choice cannot be combined with structured "
                          "outputs or response_format", param="tool_choice")
    return tool_structured_outputs(mode) or constraint


def chat_sampling_params(state: ServerState, req: ChatCompletionRequest, max_tokens: int,
                         constraint: StructuredOutputsParams | None) -> SamplingParams:
    top_n = resolve_num_logprobs(state, req.top_logprobs, "top_logprobs") or 0
    params = build_sampling_params(state, req, max_tokens, logprobs=top_n if req.logprobs else None,
                                   prompt_logprobs=resolve_prompt_logprobs(state, req))
    params.structured_outputs = constraint
    return params


def echo_text(req: ChatCompletionRequest, messages: list[dict[str, Any]]) -> str:
    """``echo``: the final assistant message the answer continues (vLLM prepends it to the answer)."""
    if req.echo and messages and messages[-1]["role"] == "assistant" and isinstance(messages[-1]["content"], str):
        return messages[-1]["content"]
    return ""


def chat_choice(state: ServerState, req: ChatCompletionRequest, o: CompletionOutput, index: int, echo: str,
                top_n: int, mode: ToolMode) -> dict[str, Any]:
    """One choice of a chat response, every key vLLM's has; tool calls parsed out of the text under ``mode``."""
    extracted = extract_tool_calls(mode, o.text)
    return {
        "index": index,
        "message": {"role": "assistant",
                    "content": echo + extracted.content if extracted.content is not None else None,
                    "refusal": None, "tool_calls": [c.to_openai() for c in extracted.tool_calls],
                    "reasoning_content": None},
        "logprobs": chat_logprobs(state, o.token_ids, o.logprobs, top_n, tokens_as_ids(state, req)) if req.logprobs
        else None,
        "finish_reason": finish_reason(mode, extracted, o.finish_reason) or "abort",
        "stop_reason": o.stop_reason,
        "token_ids": list(o.token_ids) if req.return_token_ids else None,
    }


async def _stream(state: ServerState, req: ChatCompletionRequest, stream: Any, resp_id: str, model: str,
                  created: int, prompt_ids: list[int], echo: str, mode: ToolMode) -> AsyncIterator[str]:
    """vLLM's chunk sequence: a role chunk per choice, then one choice per chunk, then the usage chunk."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage) or \
        state.options.enable_force_include_usage
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats) or \
        state.options.enable_force_include_usage  # vLLM: forced usage is on every chunk
    n = req.n or 1
    num_prompt = len(prompt_ids)
    top_n = shown_logprobs(state, req, req.top_logprobs, "top_logprobs") or 0
    ids_only = tokens_as_ids(state, req)
    tracker = DeltaTracker(n)
    tools = [ToolCallStreamer(mode) for _ in range(n)] if mode.parses else None
    cached = 0
    metrics = None

    def chunk(choice: dict[str, Any], completion_tokens: int | None = None, first: bool = False) -> str:
        body: dict[str, Any] = {"id": resp_id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "system_fingerprint": None, "choices": [choice]}
        if include_usage:
            body["usage"] = chunk_usage(num_prompt, completion_tokens) if continuous and completion_tokens is not None \
                else None
        if first and req.return_token_ids:
            body["prompt_token_ids"] = list(prompt_ids)
        return sse(body)

    try:
        for i in range(n):
            yield chunk({"index": i, "delta": {"role": "assistant", "content": echo}, "logprobs": None,
                         "finish_reason": None}, 0, first=True)
        async for out in stream:
            cached, metrics = out.num_cached_tokens, out.metrics
            for o in out.outputs:
                d = tracker.delta(o)
                if d is None:
                    continue
                text, new_ids, new_lps = d
                reason, delta = o.finish_reason, {"content": text} if text else {}
                if tools is not None:
                    frags, reason = _tool_fragments(tools[o.index], mode, text, o.finish_reason)
                    for frag in frags[:-1]:
                        yield chunk({"index": o.index, "delta": frag, "logprobs": None, "finish_reason": None},
                                    tracker.num_tokens)
                    delta = frags[-1] if frags else {}
                choice: dict[str, Any] = {"index": o.index, "delta": delta,
                                          "logprobs": None, "finish_reason": reason,
                                          "stop_reason": o.stop_reason}
                if req.logprobs:
                    choice["logprobs"] = chat_logprobs(state, new_ids, new_lps, top_n, ids_only)
                if req.return_token_ids:
                    choice["token_ids"] = list(new_ids)
                yield chunk(choice, tracker.num_tokens)
        if include_usage:
            last: dict[str, Any] = {"id": resp_id, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "choices": [], "usage": final_chunk_usage(
                                        num_prompt, tracker.num_tokens, cached,
                                        state.options.enable_prompt_tokens_details)}
            if state.options.enable_per_request_metrics and n == 1:
                last["metrics"] = request_metrics(metrics, tracker.num_tokens, streamed=True)
            yield sse(last)
    except Exception as e:  # the engine died mid-stream: tell the client in-band
        yield sse_error(from_exception(e))
    finally:
        state.engine.release(stream)
    yield sse_done()
