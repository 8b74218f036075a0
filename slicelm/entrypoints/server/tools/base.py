"""Tool calls in OpenAI's shape, and the parser interface every ``--tool-call-parser`` implements.

A parser turns a model's whole output text into ``(content, tool calls)`` (``extract``) and says where
tool-call markup may begin (``start_index``), so streams send plain content as it comes, hold back what
may become a tool call, and send each call as ``delta.tool_calls`` fragments (``ToolCallStreamer``) that
reassemble to exactly what the non-streamed response holds.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any


def make_tool_call_id(kind: str = "random") -> str:
    if kind == "mistral":  # Mistral's templates want 9 alphanumeric characters
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"chatcmpl-tool-{secrets.token_hex(16)}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = field(default_factory=make_tool_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ExtractedToolCalls:
    content: str | None
    tool_calls: list[ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


def arguments_json(value: Any) -> str:
    """Arguments as OpenAI sends them: a JSON object's text (a string that already is one is kept)."""
    if isinstance(value, str):
        return value
    return json.dumps({} if value is None else value, ensure_ascii=False)


class ToolParser:
    """Base: subclasses set ``start_markers`` and implement ``parse`` (text -> content, calls or None)."""

    name = ""
    start_markers: tuple[str, ...] = ()
    id_kind = "random"

    def start_index(self, text: str) -> int | None:
        """Where tool-call markup begins in ``text`` (None: nowhere yet)."""
        found = [i for m in self.start_markers if (i := text.find(m)) >= 0]
        return min(found) if found else None

    def held_back(self, text: str) -> int:
        """How many trailing characters of ``text`` could be the start of a marker (kept out of content)."""
        best = 0
        for m in self.start_markers:
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    best = max(best, k)
                    break
        return best

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, Any]]] | None:
        raise NotImplementedError

    def extract(self, text: str) -> ExtractedToolCalls:
        """The whole output: content and calls; text that does not parse stays content (as vLLM)."""
        parsed = self.parse(text) if self.start_index(text) is not None else None
        if not parsed or not parsed[1]:
            return ExtractedToolCalls(text, [])
        content, calls = parsed
        return ExtractedToolCalls(content or None, [ToolCall(n, arguments_json(a), make_tool_call_id(self.id_kind))
                                                    for n, a in calls])
