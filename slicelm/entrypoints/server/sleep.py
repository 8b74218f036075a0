"""vLLM's sleep-mode routes: ``POST /sleep?level=&mode=``, ``POST /wake_up?tags=``, ``GET /is_sleeping``.

``--enable-sleep-mode`` turns sleeping on (vLLM also wants ``VLLM_SERVER_DEV_MODE=1`` for the routes;
slicelm serves them whenever the flag is given, since ``slicelm up`` and its router use them). Without the
flag ``/sleep`` and ``/wake_up`` answer 400 naming it and ``/is_sleeping`` answers false. Requests that
arrive while the engine sleeps wait in its queue and run after the wake-up (vLLM's behaviour); the
router of a stack wakes a sleeping replica when a request for it arrives. ``/wake_up`` answers with the
engine's wake-up time in ``x-slicelm-wake-seconds``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from slicelm.entrypoints.server.errors import APIError, bad_request
from slicelm.entrypoints.server.state import get_state

router = APIRouter()
T = TypeVar("T")


async def _checked(call: Awaitable[T]) -> T:
    """An ``EngineClient`` sleep-mode call: the engine's ``ValueError`` is a 400, its ``RuntimeError`` a 503."""
    try:
        return await call
    except ValueError as e:
        raise bad_request(str(e)) from None
    except RuntimeError as e:  # e.g. the memory broker did not give the memory back in time: retry later
        raise APIError(503, str(e), code="sleep_mode_unavailable") from None


@router.post("/sleep")
async def sleep(raw: Request) -> Response:
    level_s = raw.query_params.get("level", "1")
    if not level_s.lstrip("-").isdigit():
        raise bad_request(f"level: must be 0, 1 or 2, got {level_s!r}", param="level")
    await _checked(get_state(raw).engine.sleep(int(level_s), raw.query_params.get("mode", "abort")))
    return Response(status_code=200)


@router.post("/wake_up")
async def wake_up(raw: Request) -> Response:
    tags = raw.query_params.getlist("tags") or None
    seconds = await _checked(get_state(raw).engine.wake_up(tags))
    return Response(status_code=200, headers={"x-slicelm-wake-seconds": f"{seconds:.4f}"})


@router.get("/is_sleeping")
async def is_sleeping(raw: Request) -> JSONResponse:
    return JSONResponse({"is_sleeping": await get_state(raw).engine.is_sleeping()})
