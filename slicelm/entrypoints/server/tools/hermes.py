"""``hermes`` (Hermes 2 Pro, Qwen2.5 / Qwen3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks."""

from __future__ import annotations

import json
import re
from typing import Any

from slicelm.entrypoints.server.tools.base import ToolParser

_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_CLOSED = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _call(body: str) -> tuple[str, Any] | None:
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return call["name"], call.get("arguments", {})


class HermesToolParser(ToolParser):
    name = "hermes"
    start_markers = ("<tool_call>",)

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, Any]]] | None:
        calls = []
        for body in _BLOCK.findall(text):
            if (call := _call(body)) is None:
                return None
            calls.append(call)
        return text[: text.index("<tool_call>")], calls

    def complete_calls(self, text: str) -> list[tuple[str, Any]]:
        calls = []
        for body in _CLOSED.findall(text):
            if (call := _call(body)) is None:
                break
            calls.append(call)
        return calls
