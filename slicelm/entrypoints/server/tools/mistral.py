"""``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (tokenizer v3-v7), or one or more
``name{arguments}`` (v11+). Tool call ids are 9 alphanumeric characters, as Mistral's templates require."""

from __future__ import annotations

import json
from typing import Any

from slicelm.entrypoints.server.tools.base import ToolParser, json_call_list

_TAG = "[TOOL_CALLS]"
_DECODER = json.JSONDecoder()


def _named_call(part: str) -> tuple[list[tuple[str, Any]], bool]:
    """``name{arguments}``."""
    brace = part.find("{")
    if brace <= 0:
        return [], False
    try:
        args, end = _DECODER.raw_decode(part, brace)
    except json.JSONDecodeError:
        return [], False
    return [(part[:brace].strip(), args)], not part[end:].strip()


def _decode(text: str) -> tuple[list[tuple[str, Any]], bool]:
    """The calls after the first ``[TOOL_CALLS]`` that decode, and whether they are all of the text."""
    calls: list[tuple[str, Any]] = []
    for part in (p.strip() for p in text[text.index(_TAG):].split(_TAG)):
        if not part:
            continue
        found, whole = json_call_list(part, "arguments") if part.startswith("[") else _named_call(part)
        calls += found
        if not whole:
            return calls, False
    return calls, True


class MistralToolParser(ToolParser):
    name = "mistral"
    start_markers = (_TAG,)
    id_kind = "mistral"

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, Any]]] | None:
        calls, whole = _decode(text)
        return (text[: text.index(_TAG)], calls) if whole else None

    def complete_calls(self, text: str) -> list[tuple[str, Any]]:
        return _decode(text)[0]
