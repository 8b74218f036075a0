"""Tool-call parsers on real model outputs (the formats Qwen2.5/Hermes, Llama 3.1/3.2, Mistral and pythonic
models write), and streaming: content first, then fragments that reassemble to the non-streamed calls."""

from __future__ import annotations

import json

import pytest

from slicelm.entrypoints.server.tools import TOOL_PARSERS, get_tool_parser
from slicelm.entrypoints.server.tools.streaming import ToolCallStreamer
from slicelm.entrypoints.server.tools.tool_choice import ToolMode

CASES = {
    "hermes": ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
               '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}'
               "\n</tool_call>", "I will check both.\n"),
    "llama3_json": ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                    '{"name": "get_time", "parameters": {"zone": "CET"}}', None),
    "mistral": ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]', None),
    "pythonic": ('[get_weather(city="Paris", unit="celsius"), get_time(zone="CET")]', None),
}
EXPECTED = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "CET"})]


@pytest.mark.parametrize("name", sorted(CASES))
def test_parsers_extract_calls_from_real_outputs(name: str) -> None:
    text, content = CASES[name]
    got = get_tool_parser(name).extract(text)
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == EXPECTED
    assert got.content == content
    ids = [c.id for c in got.tool_calls]
    assert len(set(ids)) == 2 and (name != "mistral" or all(len(i) == 9 and i.isalnum() for i in ids))


def test_other_output_forms() -> None:
    assert [c.name for c in get_tool_parser("mistral").extract('[TOOL_CALLS]get_time{"zone": "UTC"}').tool_calls] \
        == ["get_time"]
    py = get_tool_parser("pythonic").extract("<|python_start|>[lookup(q='x', n=3, exact=true)]<|python_end|>")
    assert json.loads(py.tool_calls[0].arguments) == {"q": "x", "n": 3, "exact": True}
    tagged = get_tool_parser("llama3_json").extract('<|python_tag|>{"name": "f", "parameters": {}}')
    assert [c.name for c in tagged.tool_calls] == ["f"]


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_plain_text_and_broken_calls_stay_content(name: str) -> None:
    parser = get_tool_parser(name)
    for text in ("The weather in Paris is sunny.", '<tool_call>{"name": broken', "[TOOL_CALLS] [{oops",
                 "[not a call(", '{"no_name": 1}'):
        got = parser.extract(text)
        assert got.tool_calls == [] and got.content == text


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_reassembles_to_the_non_streamed_calls(name: str) -> None:
    text, content = CASES[name]
    mode = ToolMode("auto", [], parser=get_tool_parser(name))
    streamer = ToolCallStreamer(mode)
    deltas = []
    for i in range(0, len(text), 3):  # 3-character deltas, as tokens arrive
        deltas += streamer.feed(text[i:i + 3])
    more, called = streamer.finish()
    deltas += more
    assert called
    streamed_content = "".join(d.get("content", "") for d in deltas)
    assert streamed_content == (content or "")
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], ["", ""])
            c[0] += tc.get("function", {}).get("name", "")
            c[1] += tc.get("function", {}).get("arguments", "")
    assert [(n, json.loads(a)) for n, a in calls.values()] == EXPECTED


def test_streaming_plain_text_is_all_content() -> None:
    streamer = ToolCallStreamer(ToolMode("auto", [], parser=get_tool_parser("hermes")))
    out = [d for chunk in ("Hello <", "tool", " friend") for d in streamer.feed(chunk)]
    more, called = streamer.finish()
    assert not called and "".join(d["content"] for d in out + more) == "Hello <tool friend"
