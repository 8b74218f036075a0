"""vLLM's extra routes: ``/pooling`` and SageMaker's ``/invocations`` (Cohere's ``/v2/embed``: ``cohere_embed.py``).

``/invocations`` picks the endpoint from the body, as vLLM does: ``messages`` -> chat completions (or
embeddings of a pooling model), ``prompt`` -> completions, ``input`` -> embeddings (``input`` or ``messages``
on a cross-encoder -> classification), ``query`` +
``documents`` -> rerank, ``queries`` / ``data_1`` / ``text_1`` -> score.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from slicelm.entrypoints.server import chat, completions, pooling, score
from slicelm.entrypoints.server.embed_encoding import encode_vector
from slicelm.entrypoints.server.errors import bad_request
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.pooling_protocol import PoolingRequest
from slicelm.entrypoints.server.state import ClientDisconnected, get_state

router = APIRouter()


POOLING_TASKS = {"embed": ("embed",), "score": ("classify", "score")}  # what each kind of pooling model runs
PLUGIN_MISSING = ("No IOProcessor plugin installed. Please refer to the documentation and to the "
                  "'prithvi_geospatial_mae_io_processor' offline inference example for more details.")


def pooling_task(state: Any, task: str | None) -> str:
    """The request's pooling task, checked as vLLM does (its 400 texts): the model's own task by default; a
    task the model can run but is not set up for, one it cannot run, and ``plugin`` are refused."""
    supported = POOLING_TASKS.get(state.task)
    if supported is None:
        pooling.require_tasks(state, ("embed", "score"), "Pooling")
    assert supported is not None
    default = state.options.pooler_config.task or supported[0]
    if default not in supported:  # --pooler-config task the model cannot run
        raise bad_request(f"Unsupported task: {default!r} Supported tasks: {supported}", param="task")
    if task is None or task == default:
        return default
    if task == "plugin":
        raise bad_request(PLUGIN_MISSING, param="task")
    if task not in supported:
        raise bad_request(f"Unsupported task: {task!r} Supported tasks: {supported}", param="task")
    raise bad_request(f"Try switching the model's pooling_task via --pooler-config.task {task}.", param="task")


@router.post("/pooling")
async def create_pooling(raw: Request) -> Response:
    """vLLM's generic pooling endpoint: the model's pooled output per input (embeddings, or a cross-encoder's
    class probabilities)."""
    state = get_state(raw)
    req = await parse_body(raw, PoolingRequest)
    model = state.check_model(req.model, required=False)
    task = pooling_task(state, req.task)
    try:
        if task == "embed":
            resp_id, outs = await pooling.embed_outputs(state, raw, req)
        else:
            resp_id, outs = await score.classify_outputs(state, raw, req, task)
    except ClientDisconnected:
        return Response(status_code=499)
    fmt = req.encoding_format if req.encoding_format in ("float", "base64") else "float"
    data = [{"index": i, "object": "pooling", "data": encode_vector(o.data, fmt, req.embed_dtype, req.endianness)}
            for i, o in enumerate(outs)]
    body = {"id": resp_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": pooling.pooling_usage(sum(len(o.prompt_token_ids) for o in outs))}
    return JSONResponse(body)


def _route_for(state: Any, body: dict[str, Any]) -> Any:
    """As vLLM: by the body's fields, among the routes of the model's task (a cross-encoder classifies
    ``input`` / ``messages``)."""
    if "messages" in body or "input" in body:
        if state.task == "score":
            return score.create_classify
        if "messages" in body:
            return chat.create_chat_completion if state.task == "generate" else pooling.create_embeddings
        return pooling.create_embeddings
    if "prompt" in body:
        return completions.create_completion
    if "query" in body and "documents" in body:
        return score.create_rerank
    if any(k in body for k in ("queries", "data_1", "text_1")):
        return score.create_score
    raise bad_request("the body matches no endpoint: send a chat (messages), completion (prompt), embedding "
                      "(input), rerank (query + documents) or score (queries + documents) request")


@router.post("/invocations")
async def invocations(raw: Request) -> Response:
    state = get_state(raw)
    try:
        body = json.loads(await raw.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return await _route_for(state, body)(raw)
