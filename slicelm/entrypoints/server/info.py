"""Small endpoints: ``/v1/models``, ``/health``, ``/version``, ``/metrics``, ``/tokenize``, ``/detokenize``."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from slicelm.entrypoints.server.chat import convert_messages
from slicelm.entrypoints.server.errors import APIError, bad_request
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.protocol import DetokenizeRequest, TokenizeRequest
from slicelm.entrypoints.server.state import get_state

router = APIRouter()


def _version() -> str:
    try:
        return metadata.version("slicelm")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@router.get("/v1/models")
async def list_models(raw: Request) -> JSONResponse:
    state = get_state(raw)
    data = [{"id": name, "object": "model", "created": state.created, "owned_by": "slicelm",
             "root": state.model_path, "parent": None, "max_model_len": state.max_model_len,
             "permission": []} for name in state.served_model_names]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, raw: Request) -> JSONResponse:
    state = get_state(raw)
    state.check_model(model_id)
    return JSONResponse({"id": model_id, "object": "model", "created": state.created, "owned_by": "slicelm",
                         "root": state.model_path, "parent": None, "max_model_len": state.max_model_len,
                         "permission": []})


@router.get("/health")
async def health(raw: Request) -> Response:
    state = get_state(raw)
    if state.engine.errored or not state.engine.is_running:
        raise APIError(503, f"the engine loop is not running: {state.engine.dead_error!r}", code="engine_dead")
    if state.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    return Response(status_code=200)


@router.get("/ping")
async def ping(raw: Request) -> Response:
    return await health(raw)


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": _version()})


@router.get("/metrics")
async def metrics(raw: Request) -> Response:
    state = get_state(raw)
    assert state.metrics is not None
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize")
async def tokenize(raw: Request) -> JSONResponse:
    state = get_state(raw)
    req = await parse_body(raw, TokenizeRequest)
    state.check_model(req.model, required=False)
    tok = state.tokenizer
    if req.messages is not None:
        if req.continue_final_message and req.add_generation_prompt:
            raise bad_request("continue_final_message: cannot be combined with add_generation_prompt=true",
                              param="continue_final_message")
        try:
            text = tok.apply_chat_template(
                convert_messages(req.messages), add_generation_prompt=bool(req.add_generation_prompt),
                continue_final_message=bool(req.continue_final_message),
                chat_template=req.chat_template or state.chat_template, **(req.chat_template_kwargs or {}))
        except (ValueError, TypeError) as e:
            raise bad_request(f"messages: {e}", param="messages") from e
        ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
    else:
        assert req.prompt is not None
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tok.encode(req.prompt, add_special_tokens=add)
    body: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = tok.convert_ids_to_tokens(ids)
    return JSONResponse(body)


@router.post("/detokenize")
async def detokenize(raw: Request) -> JSONResponse:
    state = get_state(raw)
    req = await parse_body(raw, DetokenizeRequest)
    state.check_model(req.model, required=False)
    tok = state.tokenizer
    vocab = tok.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"tokens: token id {bad[0]} is out of range [0, {vocab})", param="tokens")
    return JSONResponse({"prompt": tok.decode(req.tokens)})
