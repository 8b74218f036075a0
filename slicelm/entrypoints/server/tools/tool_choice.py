"""``tools`` + ``tool_choice`` of a chat request: validation, the structured output that enforces ``required``
and a named function (as vLLM), and the tool calls read back from the generated text.

* ``none``: tools are rendered, nothing is parsed.   * ``auto``: the ``--tool-call-parser`` reads calls out of
  free text (needs ``--enable-auto-tool-choice``).   * named function: the output is forced to that function's
  ``parameters`` schema and becomes its arguments.   * ``required``: the output is forced to a JSON list of
  ``{"name", "parameters"}`` (one item unless ``parallel_tool_calls``), each a call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from slicelm.engine.structured_output.guidance import to_llguidance
from slicelm.engine.structured_output.spec import GrammarError, grammar_spec
from slicelm.entrypoints.server.errors import bad_request
from slicelm.entrypoints.server.tools.base import (
    ExtractedToolCalls,
    ToolCall,
    ToolParser,
    arguments_json,
    json_call_list,
    make_tool_call_id,
)
from slicelm.sampling_params import StructuredOutputsParams

_EMPTY_PARAMS = {"type": "object", "properties": {}}


@dataclass
class ToolMode:
    kind: str  # none | auto | required | named
    tools: list[dict[str, Any]]
    name: str | None = None  # the named function
    parser: ToolParser | None = None  # auto
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return self.kind in ("auto", "required", "named")


def check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI's ``[{"type": "function", "function": {"name", "description", "parameters"}}]``, checked."""
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request(f"tools[{i}].type: only 'function' tools are supported", param=f"tools[{i}].type")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}].function.name: a function tool needs a non-empty name",
                              param=f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is not None:
            try:
                to_llguidance(grammar_spec(StructuredOutputsParams(json=params)))
            except GrammarError as e:
                raise bad_request(f"tools[{i}].function.parameters: not a usable JSON schema: "
                                  f"{str(e).split(': ', 1)[-1]}", param=f"tools[{i}].function.parameters") from e
    return list(tools or [])


def resolve_tool_mode(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                      parallel: bool | None, parser: ToolParser | None, auto_enabled: bool) -> ToolMode:
    tools = check_tools(tools)
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if tool_choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad_request("tool_choice: a named tool choice is {'type': 'function', 'function': {'name': ...}}",
                              param="tool_choice")
        if name not in {t["function"]["name"] for t in tools}:
            raise bad_request(f"tool_choice: function {name!r} is not among the request's tools", param="tool_choice")
        return ToolMode("named", tools, name=name, parallel=parallel is not False)
    if tool_choice not in ("none", "auto", "required"):
        raise bad_request(f"tool_choice: must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}",
                          param="tool_choice")
    if tool_choice != "none" and not tools:
        raise bad_request(f"tool_choice: {tool_choice!r} needs tools", param="tool_choice")
    if tool_choice == "auto" and (not auto_enabled or parser is None):
        raise bad_request('tool_choice: "auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                          "to be set", param="tool_choice")
    return ToolMode(tool_choice, tools, parser=parser if tool_choice == "auto" else None,
                    parallel=parallel is not False)


def _function(mode: ToolMode, name: str) -> dict[str, Any]:
    return next(t["function"] for t in mode.tools if t["function"]["name"] == name)


def tool_structured_outputs(mode: ToolMode) -> StructuredOutputsParams | None:
    """The constraint that enforces a named or required tool choice (None for none / auto)."""
    if mode.kind == "named":
        assert mode.name is not None
        return StructuredOutputsParams(json=_function(mode, mode.name).get("parameters") or _EMPTY_PARAMS)
    if mode.kind != "required":
        return None
    # Closed items (as xgrammar's strict mode makes them in vLLM): nothing but the call may be generated.
    options = [{"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                               "parameters": t["function"].get("parameters") or _EMPTY_PARAMS},
                "required": ["name", "parameters"], "additionalProperties": False} for t in mode.tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}
    if not mode.parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def extract_tool_calls(mode: ToolMode, text: str) -> ExtractedToolCalls:
    """Content and tool calls of a finished output under ``mode``."""
    if mode.kind == "named":
        assert mode.name is not None
        return ExtractedToolCalls("", [ToolCall(mode.name, text)])
    if mode.kind == "required":
        calls, whole = _required_calls(text)
        if not whole:  # cut short by max_tokens: no complete list of calls
            return ExtractedToolCalls(text, [])
        return ExtractedToolCalls("", calls)
    if mode.kind == "auto":
        assert mode.parser is not None
        return mode.parser.extract(text)
    return ExtractedToolCalls(text, [])


def _required_calls(text: str) -> tuple[list[ToolCall], bool]:
    """The calls of a ``required`` output (the JSON list its schema forces), and whether the list is whole."""
    body = text.strip()
    if not body.startswith("["):
        return [], False
    calls, whole = json_call_list(body, "parameters")
    return [ToolCall(name, arguments_json(args)) for name, args in calls], whole


def complete_tool_calls(mode: ToolMode, text: str) -> list[ToolCall]:
    """The calls already closed in a partial output (``auto``: ``text`` starts at the tool-call markup)."""
    if mode.kind == "required":
        return _required_calls(text)[0]
    assert mode.kind == "auto" and mode.parser is not None
    return [ToolCall(name, arguments_json(args), make_tool_call_id(mode.parser.id_kind))
            for name, args in mode.parser.complete_calls(text)]


def finish_reason(mode: ToolMode, extracted: ExtractedToolCalls, reason: str | None) -> str | None:
    """vLLM's: ``tool_calls`` when auto found calls, or a ``required`` output that ended normally."""
    if (mode.kind == "auto" and extracted.tools_called) or (mode.kind == "required" and reason == "stop"):
        return "tool_calls"
    return reason


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls as chat templates expect them (vLLM): ``arguments`` as objects, not JSON text."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = dict(m)
            m["tool_calls"] = [_call_for_template(c) for c in calls]
        out.append(m)
    return out


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**fn, "arguments": args}}
