"""Tool-call parsers (``--tool-call-parser NAME``, one module each) and their registry.

``--tool-parser-plugin`` (parsers loaded from a user's file) is not supported: the flag is refused.
"""

from __future__ import annotations

from slicelm.entrypoints.server.tools.base import ExtractedToolCalls, ToolCall, ToolParser
from slicelm.entrypoints.server.tools.hermes import HermesToolParser
from slicelm.entrypoints.server.tools.llama3_json import Llama3JsonToolParser
from slicelm.entrypoints.server.tools.mistral import MistralToolParser
from slicelm.entrypoints.server.tools.pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"--tool-call-parser: unknown parser {name!r}; available: {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


__all__ = ["TOOL_PARSERS", "ExtractedToolCalls", "ToolCall", "ToolParser", "get_tool_parser"]
