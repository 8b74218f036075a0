"""vLLM's per-request bookkeeping around every route: ``X-Request-Id`` headers and the ``/load`` counter.

- ``--enable-request-id-headers``: every response (errors, 401s, empty bodies and streams included) carries
  ``X-Request-Id``: the request's own header, else a fresh uuid4 hex, as vLLM's middleware answers.
- ``--enable-server-load-tracking``: ``GET /load`` answers ``{"server_load": N}``, N being the requests in
  flight on the routes that use the engine (vLLM's list); a request counts until its response (a stream
  included) has been sent or its client has gone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slicelm.entrypoints.server.gateway import app_path, first_header

router = APIRouter()
LOAD_TRACKED_PATHS = frozenset({
    "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/completions", "/v1/embeddings", "/pooling",
    "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/v2/embed", "/invocations",
})


@dataclass
class ServerLoad:
    enabled: bool = False
    in_flight: int = 0


class RequestTrackingMiddleware:
    """Pure ASGI (streams pass through): adds ``X-Request-Id`` and counts tracked requests in flight."""

    def __init__(self, app: ASGIApp, request_id_headers: bool, load: ServerLoad) -> None:
        self.app = app
        self.request_id_headers = request_id_headers
        self.load = load

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = app_path(scope)
        tracked = self.load.enabled and scope.get("method") == "POST" and path in LOAD_TRACKED_PATHS
        outer_send = send
        if self.request_id_headers:
            given = first_header(scope, b"x-request-id")
            request_id = given if given is not None else uuid.uuid4().hex.encode()

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                    message["headers"] = [*headers, (b"x-request-id", request_id)]
                await send(message)

            outer_send = send_with_id
        if not tracked:
            await self.app(scope, receive, outer_send)
            return
        self.load.in_flight += 1
        try:
            await self.app(scope, receive, outer_send)
        finally:
            self.load.in_flight -= 1


@router.get("/load")
async def server_load(raw: Request) -> JSONResponse:
    """As vLLM: 0 unless ``--enable-server-load-tracking``."""
    load: ServerLoad = raw.app.state.server_load
    return JSONResponse({"server_load": load.in_flight})
