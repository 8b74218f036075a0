"""``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (tokenizer v3-v7), or one or more
``name{arguments}`` (v11+). Tool call ids are 9 alphanumeric characters, as Mistral's templates require."""

from __future__ import annotations

import json
from typing import Any

from slicelm.entrypoints.server.tools.base import ToolParser

_TAG = "[TOOL_CALLS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    start_markers = (_TAG,)
    id_kind = "mistral"

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, Any]]] | None:
        start = text.index(_TAG)
        parts = [p.strip() for p in text[start:].split(_TAG) if p.strip()]
        calls: list[tuple[str, Any]] = []
        decoder = json.JSONDecoder()
        for part in parts:
            if part.startswith("["):
                try:
                    items = json.loads(part)
                except json.JSONDecodeError:
                    return None
                if not isinstance(items, list) or not all(isinstance(c, dict) and "name" in c for c in items):
                    return None
                calls += [(c["name"], c.get("arguments", {})) for c in items]
                continue
            brace = part.find("{")
            if brace <= 0:
                return None
            try:
                args, end = decoder.raw_decode(part, brace)
            except json.JSONDecodeError:
                return None
            if part[end:].strip():
                return None
            calls.append((part[:brace].strip(), args))
        return text[:start], calls
