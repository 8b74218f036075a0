"""What every request passes before an endpoint: auth, body-size limit, draining; JSON body parsing.

``GatewayMiddleware`` is pure ASGI (no buffering, streaming responses and disconnects pass through).
With an API key every route needs it except ``PUBLIC_PATHS`` (health, metrics, version, docs); when a
request carries several ``Authorization`` headers the first one counts (as Starlette and vLLM read it).
``parse_body`` refuses what no endpoint can use: invalid JSON, NaN / Infinity, lone surrogates in any string.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slicelm.entrypoints.server.errors import APIError, bad_request, from_validation_error

M = TypeVar("M", bound=BaseModel)


PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics", "/version", "/load", "/docs", "/redoc", "/openapi.json",
                          "/docs/oauth2-redirect"})


def first_header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), as Starlette's ``Headers.get`` reads it."""
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value
    return None



def app_path(scope: Scope) -> str:
    """The request's path inside the app (``--root-path`` stripped when the proxy left it on)."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path

class GatewayMiddleware:
    """401 without the API key (except ``PUBLIC_PATHS``), 413 for bodies over ``max_body_bytes``, 503 while
    draining."""

    def __init__(self, app: ASGIApp, api_keys: list[str] | None, max_body_bytes: int,
                 is_draining: Any = None) -> None:
        self.app = app
        self.api_keys = [k.encode() for k in (api_keys or []) if k]
        self.max_body_bytes = max_body_bytes
        self.is_draining = is_draining or (lambda: False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = app_path(scope)
        method: str = scope.get("method", "GET")
        if self.api_keys and path not in PUBLIC_PATHS and method != "OPTIONS":
            auth = first_header(scope, b"authorization") or b""
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not any(hmac.compare_digest(token, k) for k in self.api_keys):
                await _send_error(send, scope, APIError(
                    401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
                return
        if method == "POST" and self.is_draining():
            await _send_error(send, scope, APIError(
                503, "the server is shutting down and accepts no new requests", code="shutting_down",
                headers={"Retry-After": "5", "Connection": "close"}))
            return
        length = first_header(scope, b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                await _send_error(send, scope, bad_request("invalid Content-Length header"))
                return
            if too_big:
                await _send_error(send, scope, self._too_large())
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body too large: the limit is {self.max_body_bytes} bytes",
                        code="request_too_large", headers={"Connection": "close"})


async def _send_error(send: Send, scope: Scope, err: APIError) -> None:
    response = err.response()
    await response(scope, _noop_receive, send)


async def _noop_receive() -> Message:
    return {"type": "http.disconnect"}


_OFF_LOOP_BYTES = 256 << 10  # bodies this large are decoded and validated in a worker thread


async def parse_body(request: Request, model: type[M]) -> M:
    """Reads and validates a JSON body: 415 wrong content type, 400 invalid UTF-8 / JSON / fields."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        mime = ctype.split(";", 1)[0].strip().lower()
        if not (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))):
            raise APIError(415, f"unsupported Content-Type {ctype!r}: send 'application/json'",
                           code="unsupported_media_type")
    raw = await request.body()
    if len(raw) > _OFF_LOOP_BYTES:  # a large body must not hold up /health and the streams of others
        return await asyncio.to_thread(decode_body, raw, model)
    return decode_body(raw, model)


def decode_body(raw: bytes, model: type[M]) -> M:
    if not raw.strip():
        raise bad_request("the request body is empty: send a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from e
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          code="invalid_json") from e
    except RecursionError as e:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from e
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}",
                          code="invalid_json")
    try:
        _check_values(data, "")
    except RecursionError as e:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from e


def _no_constant(name: str) -> Any:
    raise bad_request(f"the request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


def _check_values(value: Any, path: str) -> None:
    """400 naming the field for strings with lone surrogates (no tokenizer can take them) and numbers that
    overflow to infinity (``1e999``)."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise bad_request(f"{path or 'body'}: the text contains a lone UTF-16 surrogate (invalid Unicode)",
                              param=path or None, code="invalid_encoding")
    elif isinstance(value, dict):
        for k, v in value.items():
            if _SURROGATE.search(k):
                raise bad_request(f"{path or 'body'}: a key contains a lone UTF-16 surrogate (invalid Unicode)",
                                  param=path or None, code="invalid_encoding")
            _check_values(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_values(v, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise bad_request(f"{path}: {value} is not a finite number", param=path or None, code="invalid_value")


_SURROGATE = re.compile("[\ud800-\udfff]")
