"""Per streamed choice: plain content as it arrives, tool calls as ``delta.tool_calls`` fragments.

A named tool choice streams its arguments as they are generated (the first fragment carries id and
name); ``required`` and ``auto`` hold back the tool-call part of the text and send each call at the end
as two fragments (id + name, then the arguments), taken from the same parse as the non-streamed
response, so the fragments reassemble to it exactly.
"""

from __future__ import annotations

from typing import Any

from slicelm.entrypoints.server.tools.base import ToolCall, make_tool_call_id
from slicelm.entrypoints.server.tools.tool_choice import ToolMode, extract_tool_calls


class ToolCallStreamer:
    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.in_tools = False
        self.named_started = False
        self.num_calls = 0

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """The ``delta`` objects to send for new text (content and/or tool-call fragments)."""
        if not delta:
            return []
        self.text += delta
        mode = self.mode
        if mode.kind == "named":
            frags = []
            if not self.named_started:
                self.named_started = True
                self.num_calls = 1
                frags.append(_call_header(0, ToolCall(mode.name or "", "", make_tool_call_id())))
            frags.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
            return frags
        if mode.kind == "required" or self.in_tools:
            return []
        assert mode.parser is not None
        start = mode.parser.start_index(self.text)
        end = len(self.text) - mode.parser.held_back(self.text) if start is None else start
        self.in_tools = start is not None
        return self._content(end)

    def finish(self) -> tuple[list[dict[str, Any]], bool]:
        """Fragments still to send when the choice ends, and whether tools were called."""
        if self.mode.kind == "named":
            return [], False
        if self.mode.kind == "auto" and not self.in_tools:
            return self._content(len(self.text)), False
        extracted = extract_tool_calls(self.mode, self.text)
        if not extracted.tools_called:
            return self._content(len(self.text)), False
        frags = []
        for i, call in enumerate(extracted.tool_calls):
            frags.append(_call_header(i, call))
            frags.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})
        self.num_calls = len(extracted.tool_calls)
        return frags, True

    def _content(self, end: int) -> list[dict[str, Any]]:
        if end <= self.sent:
            return []
        text, self.sent = self.text[self.sent:end], end
        return [{"content": text}]


def _call_header(index: int, call: ToolCall) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": ""}}]}
