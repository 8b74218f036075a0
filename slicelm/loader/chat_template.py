"""Chat-template rendering as transformers' ``apply_chat_template`` does it (trim_blocks/lstrip_blocks,
``raise_exception``, ``strftime_now``, non-escaping ``tojson``), in jinja2's immutable sandbox with limits:
``range()`` size, ``*`` results, output size and render time (a request can send a template)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# Limits of one chat-template rendering: output size, wall time, and the size of one `*` / range().
MAX_RENDER_CHARS = 8 << 20
MAX_RENDER_SECONDS = 5.0
MAX_RANGE = 10_000


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus caps on `range()` and on `'x' * n` / `[..] * n` results."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                limit = MAX_RENDER_CHARS if isinstance(seq, str) else MAX_RANGE
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > limit:
                    raise jinja2.exceptions.SecurityError(
                        f"the chat template builds a sequence of {len(seq) * n} items (limit {limit})")
        if operator == "**" and isinstance(right, int) and abs(right) > 1000:
            raise jinja2.exceptions.SecurityError("the chat template raises to a power above 1000")
        return super().call_binop(context, operator, left, right)


_render_deadline = threading.local()


class _CheckedRange:
    """``range()`` for templates: at most ``MAX_RANGE`` items, and iterating stops at the render deadline."""

    def __init__(self, *args: int) -> None:
        self.r = range(*args)
        if len(self.r) > MAX_RANGE:
            raise jinja2.exceptions.SecurityError(f"range() of {len(self.r)} items in a chat template "
                                                  f"(limit {MAX_RANGE})")

    def __len__(self) -> int:
        return len(self.r)

    def __iter__(self) -> Iterator[int]:
        deadline = getattr(_render_deadline, "value", None)
        for i in self.r:
            if deadline is not None and not i & 255 and time.monotonic() > deadline:
                raise jinja2.exceptions.SecurityError(f"the chat template took more than {MAX_RENDER_SECONDS:.0f} "
                                                      "s to render")
            yield i


def render_limited(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """Renders piecewise: stops with a TemplateError past ``MAX_RENDER_CHARS`` or ``MAX_RENDER_SECONDS``."""
    deadline = time.monotonic() + MAX_RENDER_SECONDS
    _render_deadline.value = deadline
    parts: list[str] = []
    size = 0
    for piece in template.generate(**variables):
        parts.append(piece)
        size += len(piece)
        if size > MAX_RENDER_CHARS:
            raise jinja2.exceptions.SecurityError(f"the chat template rendered more than {MAX_RENDER_CHARS} "
                                                  "characters")
        if time.monotonic() > deadline:
            raise jinja2.exceptions.SecurityError(f"the chat template took more than {MAX_RENDER_SECONDS:.0f} s "
                                                  "to render")
    return "".join(parts)


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    env = _LimitedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["range"] = _CheckedRange
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
