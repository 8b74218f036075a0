"""Cohere's ``/v2/embed`` as vLLM serves it: ``texts`` -> ``embeddings`` by type.

- ``input_type`` picks one of the model's task instructions (``task_instructions`` in config.json, or the
  ``prompts`` of config_sentence_transformers.json): rendered as a system message through the chat template
  when the model has one, else put in front of each text. A type the model does not define is a 400.
- ``truncate``: ``END`` (default) cuts the end of an over-long text, ``START`` its beginning, ``NONE`` answers
  400; ``max_tokens`` lowers the limit (with ``NONE``: a longer input is a 400).
- ``embedding_types``: ``float``, ``base64`` (little-endian float32), ``binary`` / ``ubinary`` (one bit per
  value, positive -> 1, packed eight per byte, most significant bit first; ``binary`` shifted to int8).
- ``images`` / ``inputs`` (multimodal) are refused with a 400.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import model_validator

from slicelm.engine.request import PoolingOutput
from slicelm.entrypoints.server import pooling
from slicelm.entrypoints.server.embed_encoding import encode_vector
from slicelm.entrypoints.server.errors import bad_request
from slicelm.entrypoints.server.gateway import parse_body
from slicelm.entrypoints.server.pooling_protocol import EmbeddingRequest
from slicelm.entrypoints.server.protocol import LaxModel
from slicelm.entrypoints.server.state import ClientDisconnected, ServerState, get_state

router = APIRouter()


class CohereEmbedRequest(LaxModel):
    model: str | None = None
    input_type: str | None = None
    texts: list[str] | None = None
    images: list[str] | None = None
    inputs: list[dict[str, Any]] | None = None
    output_dimension: int | None = None
    embedding_types: list[Literal["float", "binary", "ubinary", "base64"]] | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    max_tokens: int | None = None
    priority: int | None = 0
    request_id: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> CohereEmbedRequest:
        given = [f for f in (self.texts, self.images, self.inputs) if f is not None]
        if len(given) != 1 or not given[0]:  # vLLM's text
            raise ValueError("Exactly one of texts, images, or inputs must be provided, and it must be non-empty")
        return self


def task_instructions(state: ServerState) -> dict[str, str]:
    cfg = pooling.hf_config(state).get("task_instructions")
    if isinstance(cfg, dict) and cfg:
        return {k: v for k, v in cfg.items() if isinstance(v, str)}
    return dict(state.tokenizer.prompts)


def instruction(state: ServerState, input_type: str | None) -> str | None:
    """The prefix of ``input_type`` (None without one); 400 for a type the model does not define."""
    if input_type is None:
        return None
    known = task_instructions(state)
    if not known:
        raise bad_request(f"Unsupported input_type {input_type!r}. This model does not define any input_type task "
                          "instructions.", param="input_type")
    if input_type not in known:
        raise bad_request(f"Unsupported input_type {input_type!r}. Supported values: {', '.join(sorted(known))}",
                          param="input_type")
    return known[input_type] or None


def pack_bits(vectors: list[list[float]], signed: bool) -> list[list[int]]:
    array = np.asarray(vectors, dtype=np.float64)
    if array.shape[-1] % 8:
        raise bad_request("Embedding dimension must be a multiple of 8 for binary embedding types, but got "
                          f"{array.shape[-1]}.", param="embedding_types")
    packed = np.packbits(array >= 0, axis=-1).astype(np.int16)
    return (packed - 128 if signed else packed).tolist()


def typed_embeddings(outs: list[PoolingOutput], types: list[str]) -> dict[str, Any]:
    floats = [[float(x) for x in o.data.reshape(-1)] for o in outs]
    by_type: dict[str, Any] = {}
    for kind in types:
        if kind == "float":
            by_type[kind] = floats
        elif kind == "base64":
            by_type[kind] = [encode_vector(o.data, "base64", "float32", "little") for o in outs]
        else:
            by_type[kind] = pack_bits(floats, signed=kind == "binary")
    return by_type


def inner_requests(state: ServerState, req: CohereEmbedRequest) -> list[EmbeddingRequest]:
    """The embedding request(s) that compute ``req``: one for plain texts, one per text when the task
    instruction is a system message of the chat template."""
    assert req.texts is not None
    limit = None if req.truncate == "NONE" else (req.max_tokens if req.max_tokens is not None else -1)
    common: dict[str, Any] = {"model": req.model, "dimensions": req.output_dimension, "priority": req.priority,
                              "truncate_prompt_tokens": limit,
                              "truncation_side": "left" if req.truncate == "START" else None}
    prefix = instruction(state, req.input_type)
    if prefix is None or not state.tokenizer.chat_template:
        texts = [prefix + t for t in req.texts] if prefix else req.texts
        return [EmbeddingRequest(input=texts, request_id=req.request_id, **common)]
    return [EmbeddingRequest(messages=[{"role": "system", "content": prefix}, {"role": "user", "content": t}],
                             **common) for t in req.texts]


@router.post("/v2/embed")
async def create_cohere_embed(raw: Request) -> Response:
    state = get_state(raw)
    req = await parse_body(raw, CohereEmbedRequest)
    state.check_model(req.model, required=False)
    if req.texts is None:
        raise bad_request("images / inputs: multimodal inputs are not supported", param="images"
                          if req.images is not None else "inputs")
    try:
        results = await asyncio.gather(*(pooling.embed_outputs(state, raw, r) for r in inner_requests(state, req)))
    except ClientDisconnected:
        return Response(status_code=499)
    outs = [o for _, part in results for o in part]
    if req.truncate == "NONE" and req.max_tokens is not None:
        for o in outs:
            if len(o.prompt_token_ids) > req.max_tokens:
                raise bad_request(f"Input of {len(o.prompt_token_ids)} tokens exceeds max_tokens={req.max_tokens} "
                                  "with truncate=NONE. Set truncate to END or START to allow truncation.",
                                  param="max_tokens")
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    body = {"id": results[0][0], "embeddings": typed_embeddings(outs, req.embedding_types or ["float"]),
            "texts": req.texts, "meta": {"api_version": {"version": "2"},
                                         "billed_units": {"input_tokens": tokens, "image_tokens": 0}},
            "response_type": "embeddings_by_type"}
    return JSONResponse(body)
