"""``llama3_json`` (Llama 3.1 / 3.2 JSON tool calls): ``{"name": ..., "parameters": {...}}`` objects, one or
more separated by ``;``, optionally after ``<|python_tag|>``; the output must start with the call."""

from __future__ import annotations

from typing import Any

from slicelm.entrypoints.server.tools.base import ToolParser, decode_calls

_TAG = "<|python_tag|>"


def _decode(text: str) -> tuple[list[tuple[str, Any]], bool]:
    """The calls at the start of ``text`` that decode, and whether they are all of it."""
    body = text.strip()
    body = body[len(_TAG):] if body.startswith(_TAG) else body
    calls, stop = decode_calls(body, 0, " \n\t;", None, ("parameters", "arguments"))
    return calls, stop is not None


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_markers = (_TAG, "{")

    def start_index(self, text: str) -> int | None:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith(self.start_markers) else None

    def held_back(self, text: str) -> int:
        return len(text) if _TAG.startswith(text.lstrip()) and text.strip() else 0

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, Any]]] | None:
        calls, whole = _decode(text)
        return (None, calls) if whole else None

    def complete_calls(self, text: str) -> list[tuple[str, Any]]:
        return _decode(text)[0]
