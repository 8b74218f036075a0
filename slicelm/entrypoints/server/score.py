"""Score and rerank endpoints: ``/v1/score`` + ``/score``, ``/v1/rerank`` + ``/rerank`` + ``/v2/rerank``.

An embedding model (task "embed") scores a pair as the cosine similarity of the two sides' embeddings (a
single left text is embedded once); a cross-encoder (task "score") scores each (text_1, text_2) pair with
its head's activated output; a generative model serves neither (400). Tokenizing and running are
``pooling.py``'s.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from slicelm.engine.request import PoolingOutput
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.pooling import (
    Prompt,
    chat_pooling_prompt,
    check_len,
    encode_text,
    engine_request_id,
    hf_config,
    pad_prompts,
    pooling_usage,
    prompt_limit,
    require_tasks,
    run_prompts,
    token_ids,
    truncating,
)
from slicelm.entrypoints.server.pooling_protocol import EmbeddingRequest, RerankRequest, ScoreRequest
from slicelm.entrypoints.server.state import ClientDisconnected, ServerState, get_state
from slicelm.layers.pooler import num_labels_of
from slicelm.pooling_params import PoolingParams

router = APIRouter()


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
        enc = truncating(tok.hf, limit).encode(a, b)
        ids, types = list(enc.ids), list(enc.type_ids)
    check_len(state, len(ids), param)
    prompt: Prompt = {"prompt_token_ids": ids}
    if int(hf_config(state).get("type_vocab_size") or 2) > 1:  # XLM-R has a single token type
        prompt["token_type_ids"] = types
    return prompt


def require_score_routes(state: ServerState, api: str) -> None:
    """As vLLM: score / rerank routes exist for embedding models and one-label cross-encoders; a classifier
    with more labels has none (404 ``{"detail": "Not Found"}``, the body of a route that does not exist)."""
    require_tasks(state, ("embed", "score"), api)
    if state.task == "score" and num_labels_of(hf_config(state)) != 1:
        raise StarletteHTTPException(404)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12))


async def _scores(state: ServerState, raw: Request, req: ScoreRequest | RerankRequest, left: list[str],
                  right: list[str], base_id: str, names: tuple[str, str]) -> tuple[list[float], int]:
    """Scores of ``left[i or 0]`` vs ``right[i]``; returns ``(scores, prompt tokens)``. ``names``: the request
    fields of the two sides, for error messages."""
    limit = prompt_limit(state, req.truncate_prompt_tokens)
    priority = req.priority or 0

    def param(side: int, i: int) -> str:
        return names[side] if len((left, right)[side]) == 1 else f"{names[side]}[{i}]"

    if state.task == "embed":  # cosine similarity of embeddings; a single left text is embedded once
        special = req.add_special_tokens is not False
        prompts: list[Prompt] = [{"prompt_token_ids": encode_text(state, t, limit, special, param(side, i))}
                                 for side, texts in enumerate((left, right)) for i, t in enumerate(texts)]
        outs = await run_prompts(state, raw, prompts, PoolingParams(task="embed"), base_id, priority)
        emb = [o.data for o in outs]
        lhs, rhs = emb[: len(left)], emb[len(left):]
        scores = [_cosine(lhs[i if len(lhs) > 1 else 0], r) for i, r in enumerate(rhs)]
        return scores, sum(len(o.prompt_token_ids) for o in outs)
    pairs = [_encode_pair(state, left[i if len(left) > 1 else 0], r, limit, param(1, i)) for i, r in enumerate(right)]
    outs = await run_prompts(state, raw, pairs, PoolingParams(task="score", use_activation=req.use_activation,
                                                       truncate_prompt_tokens=None), base_id, priority)
    return [float(o.data.reshape(-1)[0]) for o in outs], sum(len(o.prompt_token_ids) for o in outs)


async def classify_outputs(state: ServerState, raw: Request, req: EmbeddingRequest, task: str = "classify",
                           prefix: str = "pool") -> tuple[str, list[PoolingOutput]]:
    """A cross-encoder's activated head output (task "classify": class probabilities, or "score") for each
    single-text input of ``req``."""
    require_tasks(state, ("score",), "Classification")
    limit = prompt_limit(state, req.truncate_prompt_tokens)
    resp_id = engine_request_id(prefix, req, raw)
    many = isinstance(req.input, list) and not isinstance(req.input[0], int)
    special = req.add_special_tokens is not False
    prompts: list[Prompt] = []
    if req.messages is not None:  # chat-style input, rendered with the chat template (as vLLM)
        prompts.append(await chat_pooling_prompt(state, req, limit, state.max_model_len))
    for i, item in enumerate(req.inputs() if req.messages is None else []):
        param = f"input[{i}]" if many else "input"
        ids = encode_text(state, item, limit, special, param) if isinstance(item, str) else \
            token_ids(state, item, limit, param)
        prompts.append({"prompt_token_ids": ids})
    prompts = pad_prompts(state, prompts, req.padding, state.max_model_len)
    params = PoolingParams(task=task, use_activation=req.use_activation)
    return resp_id, await run_prompts(state, raw, prompts, params, resp_id, req.priority or 0)


@router.post("/classify")
async def create_classify(raw: Request) -> Response:
    """vLLM's ``/classify``: a sequence classifier's class probabilities and top label per input."""
    state = get_state(raw)
    req = await parse_body(raw, EmbeddingRequest)
    model = state.check_model(req.model, required=False)
    try:
        resp_id, outs = await classify_outputs(state, raw, req, prefix="classify")
    except ClientDisconnected:
        return Response(status_code=499)
    id2label = {int(k): v for k, v in (hf_config(state).get("id2label") or {}).items()}
    data = []
    for i, o in enumerate(outs):
        probs = [float(x) for x in o.data.reshape(-1)]
        best = max(range(len(probs)), key=probs.__getitem__)
        label = id2label.get(best, f"LABEL_{best}")  # transformers' default labels, as vLLM reads them
        data.append({"index": i, "label": label, "probs": probs, "num_classes": len(probs)})
    body = {"id": resp_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": pooling_usage(sum(len(o.prompt_token_ids) for o in outs))}
    return JSONResponse(body)


@router.post("/v1/score")
@router.post("/score")
async def create_score(raw: Request) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, ScoreRequest)
    model = state.check_model(req.model, required=False)
    require_score_routes(state, "Score")
    left, right = req.lists()
    resp_id = engine_request_id("score", req, raw)
    try:
        scores, tokens = await _scores(state, raw, req, left, right, resp_id, ("text_1", "text_2"))
    except ClientDisconnected:
        return Response(status_code=499)
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    body = {"id": resp_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": pooling_usage(tokens)}
    return JSONResponse(body)


async def _rerank(raw: Request, cohere_v2: bool) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, RerankRequest)
    model = state.check_model(req.model, required=False)
    require_score_routes(state, "Rerank")
    docs = req.texts()
    if req.max_tokens_per_doc:
        docs = [_cut_tokens(state, d, req.max_tokens_per_doc) for d in docs]
    resp_id = engine_request_id("rerank", req, raw)
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
    body: dict[str, Any] = {"id": resp_id, "model": model, "results": results, "usage": pooling_usage(tokens)}
    if cohere_v2:
        body["meta"] = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
    return JSONResponse(body)


@router.post("/v1/rerank")
@router.post("/rerank")
async def create_rerank(raw: Request) -> Response:
    """Jina / vLLM shape (``return_documents`` defaults to true)."""
    return await _rerank(raw, cohere_v2=False)


@router.post("/v2/rerank")
async def create_rerank_v2(raw: Request) -> Response:
    """Cohere v2 shape (``return_documents`` defaults to false, ``meta`` block)."""
    return await _rerank(raw, cohere_v2=True)
