"""Request ids: the id a response carries (the client's ``request_id`` / ``X-Request-Id``, else a fresh one) and the
unique id the engine runs the request under (``request_tracking.py`` puts ``X-Request-Id`` on responses)."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request

from slicelm.entrypoints.server.errors import bad_request
from slicelm.entrypoints.server.protocol import REQUEST_ID


def request_ids(req: Any, raw: Request, prefix: str) -> tuple[str, str]:
    """``(response id, engine id)``: the client's ``request_id`` / ``X-Request-Id`` (validated up front: 400
    before any work) or a fresh uuid; the engine id is always unique."""
    user = req.request_id
    if user is None:
        header = raw.headers.get("x-request-id")
        if header is not None and not REQUEST_ID.fullmatch(header):
            raise bad_request("X-Request-Id: must be 1 to 256 printable ASCII characters without spaces",
                              param="request_id")
        user = header
    resp_id = f"{prefix}-{user or uuid.uuid4().hex}"
    return resp_id, (f"{resp_id}-{uuid.uuid4().hex[:8]}" if user else resp_id)
