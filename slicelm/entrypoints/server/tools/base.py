"""Tool calls in OpenAI's shape, and the parser interface every ``--tool-call-parser`` implements.

A parser turns a model's whole output text into ``(content, tool calls)`` (``extract``), says where
tool-call markup may begin (``start_index``) and which calls of a partial output are already closed
(``complete_calls``), so streams send plain content as it comes, hold back what may become a tool call, and
send each call as ``delta.tool_calls`` fragments as soon as it is complete (``ToolCallStreamer``); they
reassemble to what the non-streamed response holds.
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


_DECODER = json.JSONDecoder()


def decode_calls(text: str, pos: int, separators: str, end: str | None,
                 arguments_keys: tuple[str, ...]) -> tuple[list[tuple[str, Any]], int | None]:
    """JSON ``{"name": ..., <arguments key>: {...}}`` objects from ``pos`` on, separated by ``separators``: the
    calls that decode, in order, and where the run stopped at ``end`` or at the end of ``text`` (None when
    something else stopped it: a partial or malformed object, a non-call)."""
    calls: list[tuple[str, Any]] = []
    while True:
        while pos < len(text) and text[pos] in separators:
            pos += 1
        if pos == len(text) or (end is not None and text.startswith(end, pos)):
            return calls, pos
        try:
            item, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return calls, None
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return calls, None
        args = next((item[k] for k in arguments_keys if k in item), {})
        calls.append((item["name"], args))


def json_call_list(text: str, arguments_key: str) -> tuple[list[tuple[str, Any]], bool]:
    """``[{"name": ..., arguments_key: {...}}, ...]`` (``text`` starts at ``[``): the items that decode as calls,
    in order, and whether the list is closed, all calls, and all of ``text`` (a partial output stops early)."""
    assert text.startswith("["), text[:20]
    calls, stop = decode_calls(text, 1, " \n\t\r,", "]", (arguments_key,))
    return calls, stop is not None and text.startswith("]", stop) and not text[stop + 1:].strip()


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

    def complete_calls(self, text: str) -> list[tuple[str, Any]]:
        """The calls already closed in a partial output whose tool-call markup starts ``text`` (streaming sends
        each one as soon as it is complete); a call that does not parse ends the list."""
        raise NotImplementedError

    def extract(self, text: str) -> ExtractedToolCalls:
        """The whole output: content and calls; text that does not parse stays content (as vLLM)."""
        parsed = self.parse(text) if self.start_index(text) is not None else None
        if not parsed or not parsed[1]:
            return ExtractedToolCalls(text, [])
        content, calls = parsed
        return ExtractedToolCalls(content or None, [ToolCall(n, arguments_json(a), make_tool_call_id(self.id_kind))
                                                    for n, a in calls])
