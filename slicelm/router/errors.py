"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "server_error",
}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    err = {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}
    return json.dumps({"error": err}).encode()


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, code, param),
                        content_type="application/json", headers=headers)


def sse_error_event(status: int, message: str, code: str) -> bytes:
    """The last two events of a stream whose backend died: an error event, then ``[DONE]``."""
    return b"data: " + error_body(status, message, code) + b"\n\ndata: [DONE]\n\n"
