"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` and the exception mapping."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slicelm.engine.async_llm import EngineDeadError, EngineOverloadedError
from slicelm.engine.request import EmptyPromptError, PromptTooLongError

logger = logging.getLogger(__name__)

# vLLM's ``type`` values (the names of the openai client's exception classes)
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
_PARAM_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
# pydantic puts union members / validator names into ``loc``; they are not part of the parameter path
_LOC_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "function-after", "function-before",
             "function-wrap", "function-plain", "constrained-str", "constrained-int", "constrained-float", "union",
             "tagged-union", "nullable", "default", "chain", "lax-or-strict", "json-or-python"}


class APIError(Exception):
    """An error with an HTTP status that becomes an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _param_from_message(message: str) -> str | None:
    m = _PARAM_PREFIX.match(message)
    return m.group(1) if m else None


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        item = str(item)
        if item in _LOC_TAGS or "[" in item or "-" in item:
            break
        parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def from_validation_error(e: ValidationError | RequestValidationError) -> APIError:
    errors = e.errors()
    if not errors:
        return bad_request(str(e))
    first = errors[0]
    loc = tuple(x for x in first.get("loc", ()) if x != "body")
    param = _loc_to_param(loc)
    msg = str(first.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        param = param or _param_from_message(msg)
        return bad_request(msg, param=param)
    if first.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter")
    if first.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return bad_request(validation_message(errors), param=param, code="invalid_value")


_MAX_REPORTED_ERRORS = 10
_MAX_INPUT_CHARS = 200


def validation_message(errors: list[Any]) -> str:
    """vLLM's text for pydantic errors: ``N validation error(s):`` then one line per error with pydantic's
    ``type`` (``literal_error``, ``int_parsing`` …), ``loc``, ``msg`` and a bounded ``input`` — clients
    match on these names."""
    lines = []
    for err in errors[:_MAX_REPORTED_ERRORS]:
        item = {k: v for k, v in err.items() if k != "url"}
        item["loc"] = ".".join(str(x) for x in err.get("loc", ()) if not _internal_loc(str(x)))
        if "input" in item:
            item["input"] = _bounded(item["input"])
        if "ctx" in item:
            item["ctx"] = {k: (v if isinstance(v, str | int | float) else str(v)) for k, v in item["ctx"].items()}
        lines.append(f"  {item}")
    if len(errors) > _MAX_REPORTED_ERRORS:
        lines.append(f"  ...and {len(errors) - _MAX_REPORTED_ERRORS} more errors")
    return f"{len(errors)} validation {'error' if len(errors) == 1 else 'errors'}:\n" + "\n".join(lines)


def _internal_loc(part: str) -> bool:
    return part.lower() in _LOC_TAGS or any(c in part for c in "[](){}")


def _bounded(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= _MAX_INPUT_CHARS else value[:_MAX_INPUT_CHARS] + "...[truncated]"
    if isinstance(value, list | tuple | dict | set):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text if len(text) <= _MAX_INPUT_CHARS else text[:_MAX_INPUT_CHARS] + "...[truncated]"


def from_exception(e: BaseException) -> APIError:
    """Maps engine / validation exceptions to API errors (unknown exceptions -> 500)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValidationError | RequestValidationError):
        return from_validation_error(e)
    if isinstance(e, EngineOverloadedError):
        return APIError(503, str(e), code="overloaded", headers={"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_dead")
    if isinstance(e, PromptTooLongError):
        return bad_request(str(e), param="messages" if "messages" in str(e) else None,
                           code="context_length_exceeded")
    if isinstance(e, EmptyPromptError):
        return bad_request(str(e) or "the prompt is empty", code="empty_prompt")
    if isinstance(e, ValueError | TypeError):
        msg = str(e)
        param = getattr(e, "field", None) or getattr(e, "param", None) or _param_from_message(msg)
        return bad_request(msg, param=param)
    logger.error("internal error: %r", e, exc_info=e)
    return APIError(500, f"internal server error: {type(e).__name__}: {e}")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """A route that does not exist (404) or a wrong method (405): Starlette's ``{"detail": ...}`` body, as
        vLLM answers them (its handler covers FastAPI's ``HTTPException`` only, never raised here)."""
        phrase = HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else ""
        detail = exc.detail if isinstance(exc.detail, str) else phrase
        return JSONResponse({"detail": detail or phrase}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def _mapped(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    # handled in ExceptionMiddleware (an ``Exception`` handler would run in ServerErrorMiddleware, which
    # re-raises after answering)
    for cls in (EngineOverloadedError, EngineDeadError, ValueError, ValidationError):
        app.add_exception_handler(cls, _mapped)
    app.add_exception_handler(Exception, _mapped)
