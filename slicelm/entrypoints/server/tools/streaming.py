"""Per streamed choice: plain content as it arrives, tool calls as ``delta.tool_calls`` fragments.

A named tool choice streams its arguments as they are generated (the first fragment carries id and
name). ``required`` and ``auto`` send each call as soon as the text closes it (the parser's
``complete_calls``): two fragments, id + name then the arguments. The arguments are re-serialized from the
parsed call, as in the non-streamed response, so a call is not split below that (vLLM diffs a partial-JSON
parse to send argument pieces earlier; the re-serialized text would change under such pieces). Content
before ``auto``'s tool-call markup streams as it comes, holding back what may start a marker. When the
choice ends, the calls that the whole-output parse finds beyond those sent follow; if the whole output
does not parse (a later call is malformed), the calls already sent stand and the rest is dropped.
"""

from __future__ import annotations

from typing import Any

from slicelm.entrypoints.server.tools.base import ToolCall, make_tool_call_id
from slicelm.entrypoints.server.tools.tool_choice import ToolMode, complete_tool_calls, extract_tool_calls


class ToolCallStreamer:
    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.tools_start: int | None = None  # where the tool-call markup (auto) or the calls (required) begin
        self.named_started = False
        self.num_calls = 0  # calls sent

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """The ``delta`` objects to send for new text (content and/or tool-call fragments)."""
        if not delta:
            return []
        self.text += delta
        if self.mode.kind == "named":
            return self._named(delta)
        frags: list[dict[str, Any]] = []
        if self.tools_start is None:
            if self.mode.kind == "required":
                self.tools_start = 0
            else:
                assert self.mode.parser is not None
                self.tools_start = self.mode.parser.start_index(self.text)
                held = self.mode.parser.held_back(self.text)
                frags = self._content(len(self.text) - held if self.tools_start is None else self.tools_start)
                if self.tools_start is None:
                    return frags
        return frags + self._calls(complete_tool_calls(self.mode, self.text[self.tools_start:]))

    def finish(self) -> tuple[list[dict[str, Any]], bool]:
        """Fragments still to send when the choice ends, and whether tools were called."""
        if self.mode.kind == "named":
            return [], False
        if self.mode.kind == "auto" and self.tools_start is None:
            return self._content(len(self.text)), False
        extracted = extract_tool_calls(self.mode, self.text)
        if not extracted.tools_called:
            return ([], True) if self.num_calls else (self._content(len(self.text)), False)
        return self._calls(extracted.tool_calls), True

    def _named(self, delta: str) -> list[dict[str, Any]]:
        frags = []
        if not self.named_started:
            self.named_started = True
            self.num_calls = 1
            frags.append(_call_header(0, ToolCall(self.mode.name or "", "", make_tool_call_id())))
        frags.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
        return frags

    def _calls(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """Fragments for the calls of ``calls`` not sent yet."""
        frags = []
        for i in range(self.num_calls, len(calls)):
            frags.append(_call_header(i, calls[i]))
            frags.append({"tool_calls": [{"index": i, "function": {"arguments": calls[i].arguments}}]})
        self.num_calls = max(self.num_calls, len(calls))
        return frags

    def _content(self, end: int) -> list[dict[str, Any]]:
        if end <= self.sent:
            return []
        text, self.sent = self.text[self.sent:end], end
        return [{"content": text}]


def _call_header(index: int, call: ToolCall) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": ""}}]}
