"""Tool-call parsers on real model outputs (the formats Qwen2.5/Hermes, Llama 3.1/3.2, Mistral and pythonic
models write), and streaming: content first, then each call's fragments as soon as the text closes it, which
reassemble to the non-streamed calls."""

from __future__ import annotations

import json

import pytest

from slicelm.entrypoints.server.tools import TOOL_PARSERS, get_tool_parser
from slicelm.entrypoints.server.tools.streaming import ToolCallStreamer
from slicelm.entrypoints.server.tools.tool_choice import ToolMode, extract_tool_calls

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


def _headers_at(mode: ToolMode, text: str) -> tuple[dict[int, int], list[dict]]:
    """Feeds ``text`` one character at a time: where each call's header went out, and all deltas."""
    streamer = ToolCallStreamer(mode)
    sent_at: dict[int, int] = {}
    deltas = []
    for i, ch in enumerate(text):
        for d in streamer.feed(ch):
            deltas.append(d)
            for tc in d.get("tool_calls", []):
                if "id" in tc:
                    sent_at[tc["index"]] = i
    deltas += streamer.finish()[0]
    return sent_at, deltas


REQUIRED_TEXT = ('[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, '
                 '{"name": "get_time", "parameters": {"zone": "CET"}}]')


@pytest.mark.parametrize("name", [*sorted(CASES), "required"])
def test_each_call_streams_as_soon_as_it_is_closed(name: str) -> None:
    if name == "required":
        mode, text = ToolMode("required", []), REQUIRED_TEXT
    else:
        mode, text = ToolMode("auto", [], parser=get_tool_parser(name)), CASES[name][0]
    sent_at, deltas = _headers_at(mode, text)
    # the first call went out before the second call's name was generated, the second one before the end
    assert sent_at[0] < text.index("get_time") and sent_at[1] < len(text)
    full = extract_tool_calls(mode, text).tool_calls
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], ["", ""])
            c[0] += tc["function"].get("name", "")
            c[1] += tc["function"].get("arguments", "")
    assert [tuple(c) for c in calls.values()] == [(c.name, c.arguments) for c in full]


def test_a_malformed_later_call_keeps_the_calls_already_streamed() -> None:
    text = '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call><tool_call>{"name": oops'
    mode = ToolMode("auto", [], parser=get_tool_parser("hermes"))
    assert extract_tool_calls(mode, text).tool_calls == []  # not streamed: the whole output is content (vLLM)
    streamer = ToolCallStreamer(mode)
    deltas = [d for i in range(0, len(text), 5) for d in streamer.feed(text[i:i + 5])]
    more, called = streamer.finish()
    assert called and more == [] and not any("content" in d for d in deltas)
    assert [tc["function"].get("name") for d in deltas for tc in d["tool_calls"] if "id" in tc] == ["get_time"]


def test_partial_outputs_hold_only_closed_calls() -> None:
    assert get_tool_parser("pythonic").complete_calls('[f(a="x)", b=1), g(c=') == [("f", {"a": "x)", "b": 1})]
    assert get_tool_parser("mistral").complete_calls('[TOOL_CALLS] [{"name": "f", "arguments": {}}, {"na') == \
        [("f", {})]
    assert get_tool_parser("llama3_json").complete_calls('{"name": "f", "parameters": {"a": 1}}; {"name": "g"') == \
        [("f", {"a": 1})]
    assert get_tool_parser("hermes").complete_calls('<tool_call>{"name": "f", "arguments": {}}\n</tool_') == []
