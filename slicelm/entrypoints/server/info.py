"""Small endpoints: ``/v1/models``, ``/health``, ``/version``, ``/metrics``, ``/tokenize``, ``/detokenize``."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from slicelm.entrypoints.server.chat import convert_messages, render_chat, request_template
from slicelm.entrypoints.server.errors import APIError, bad_request
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.protocol import CONTINUE_AND_GENERATION_PROMPT, DetokenizeRequest, TokenizeRequest
from slicelm.entrypoints.server.state import ServerState, get_state, off_loop

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


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(raw: Request) -> Response:
    state = get_state(raw)
    if state.engine.errored or not state.engine.is_running:
        raise APIError(503, f"the engine loop is not running: {state.engine.dead_error!r}", code="engine_dead")
    if state.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    return Response(status_code=200)


@router.api_route("/ping", methods=["GET", "HEAD", "POST"])
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


def _tokenize(state: ServerState, req: TokenizeRequest, template: str | None) -> list[int]:
    tok = state.tokenizer
    if req.messages is not None:
        if req.continue_final_message and req.add_generation_prompt:
            raise bad_request(CONTINUE_AND_GENERATION_PROMPT, param="continue_final_message")
        return render_chat(state, convert_messages(req.messages), add_generation_prompt=bool(req.add_generation_prompt),
                           continue_final_message=bool(req.continue_final_message), template=template,
                           kwargs=req.chat_template_kwargs, tools=req.tools, documents=None,
                           add_special_tokens=bool(req.add_special_tokens))
    assert req.prompt is not None
    add = True if req.add_special_tokens is None else req.add_special_tokens
    return tok.encode(req.prompt, add_special_tokens=add)


@router.post("/tokenize")
async def tokenize(raw: Request) -> JSONResponse:
    state = get_state(raw)
    req = await parse_body(raw, TokenizeRequest)
    state.check_model(req.model, required=False)
    template = request_template(state, req.chat_template, req.chat_template_kwargs)
    chars = len(req.prompt or "") + sum(len(m.content) if isinstance(m.content, str) else 0
                                        for m in req.messages or [])
    state.check_text_size(chars, "messages" if req.messages is not None else "prompt")
    ids = await off_loop(_tokenize, state, req, template)
    body: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                            "token_strs": state.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs
                            else None}
    return JSONResponse(body)


@router.get("/tokenizer_info")
async def tokenizer_info(raw: Request) -> JSONResponse:
    """vLLM's ``/tokenizer_info`` (only with ``--enable-tokenizer-info-endpoint``)."""
    state = get_state(raw)
    if not state.options.enable_tokenizer_info_endpoint:
        raise APIError(404, "Not Found: start the server with --enable-tokenizer-info-endpoint to serve "
                       "/tokenizer_info")
    tok = state.tokenizer
    added = {str(i): {"content": t.content, "special": bool(t.special), "lstrip": bool(t.lstrip),
                      "rstrip": bool(t.rstrip), "normalized": bool(t.normalized), "single_word": bool(t.single_word)}
             for i, t in tok.hf.get_added_tokens_decoder().items()}
    body = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": state.chat_template
            or tok.chat_template, "model_max_length": state.max_model_len, "vocab_size": tok.vocab_size,
            "added_tokens_decoder": added, "additional_special_tokens": [], "clean_up_tokenization_spaces": False}
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
        raise bad_request(f"tokens: Token id {bad[0]} is out of vocabulary (vocabulary size {vocab})",
                          param="tokens")
    return JSONResponse({"prompt": await off_loop(tok.decode, req.tokens)})
