"""``POST /v1/chat/completions/batch``: vLLM's batched chat route.

``messages`` is a list of conversations; each becomes one engine request with the shared sampling fields,
and the response is one ``chat.completion`` whose choice ``i`` answers conversation ``i`` (usage summed).
No streaming and ``n`` = 1, as vLLM's.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from slicelm.entrypoints.server.chat import (
    chat_choice,
    chat_constraint,
    chat_prompt_ids,
    chat_sampling_params,
    echo_text,
    template_tools,
    tool_mode,
)
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.load import load_headers, observe_params
from slicelm.entrypoints.server.protocol import BatchChatCompletionRequest, ChatCompletionRequest
from slicelm.entrypoints.server.request_ids import request_ids
from slicelm.entrypoints.server.sampling import shown_logprobs
from slicelm.entrypoints.server.state import ClientDisconnected, add_requests, final_outputs, get_state
from slicelm.entrypoints.server.usage import usage

router = APIRouter()


@router.post("/v1/chat/completions/batch")
async def create_batch_chat_completion(raw: Request) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, BatchChatCompletionRequest)
    model = state.check_model(req.model, required=False)
    state.require_task("generate", "Chat Completions")
    resp_id, engine_base = request_ids(req, raw, "chatcmpl")
    priority = state.check_priority(req.priority)
    singles: list[ChatCompletionRequest] = [req.conversation(i) for i in range(len(req.messages))]
    modes = [tool_mode(state, single) for single in singles]
    constraints = [chat_constraint(state, single, mode) for single, mode in zip(singles, modes)]
    rendered = [await chat_prompt_ids(state, single, template_tools(state, mode))
                for single, mode in zip(singles, modes)]
    params_list = [chat_sampling_params(state, single, state.check_length(len(ids), single.effective_max_tokens,
                                                                          param=f"messages[{i}]"), constraint)
                   for i, (single, (_, ids), constraint) in enumerate(zip(singles, rendered, constraints))]
    streams = await add_requests(state, engine_base, [ids for _, ids in rendered], params_list, priority)
    for params in params_list:
        observe_params(state, params)
    created = int(time.time())
    try:
        finals = await final_outputs(streams, raw)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        for s in streams:
            state.engine.release(s)
    top_n = shown_logprobs(state, req, req.top_logprobs, "top_logprobs") or 0
    choices: list[dict[str, Any]] = [
        chat_choice(state, single, final.outputs[0], i, echo_text(single, messages), top_n, mode)
        for i, (single, (messages, _), final, mode) in enumerate(zip(singles, rendered, finals, modes))]
    num_prompt = sum(len(ids) for _, ids in rendered)
    num_gen = sum(len(f.outputs[0].token_ids) for f in finals)
    body = {"id": resp_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(num_prompt, num_gen), "system_fingerprint": None, "service_tier": None,
            "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None, "metrics": None}
    return JSONResponse(body, headers=load_headers(state, raw))
