"""Structured outputs and tool calling through the official ``openai`` client against a real server (SmolLM2 on
the CPU): the grammar makes even a 135M model produce valid output; bad constraints are 400s naming the
field and leave the engine core serving."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from conftest import MODEL, Server, start_server, stop_server

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"enum": ["Paris", "London", "Rome"]}}, "required": ["name", "age", "city"],
    "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 12},
               "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
               "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("so"), "--max-num-seqs", "8", "--max-model-len", "1024",
                     "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                     "--structured-outputs-config", '{"disable_any_whitespace": true}', timeout=600)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def chat(client: openai.OpenAI, **kw):
    return client.chat.completions.create(**{"model": MODEL, "temperature": 0, "max_tokens": 48, **kw})


def test_json_schema_response_format_validates(client: openai.OpenAI) -> None:
    r = chat(client, messages=[{"role": "user", "content": "Describe a person as JSON."}],
             response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert r.choices[0].finish_reason == "stop"


def test_regex_and_choice_and_guided_aliases(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=16, temperature=0.7, seed=3, n=2,
                                  extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}})
    assert len(r.choices) == 2 and all(re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.text) for c in r.choices)
    r = chat(client, messages=[{"role": "user", "content": "Which city is the capital of Italy?"}],
             extra_body={"guided_choice": ["Paris", "London", "Rome"], "guided_decoding_backend": "auto"})
    assert r.choices[0].message.content in ("Paris", "London", "Rome")
    r = chat(client, messages=[{"role": "user", "content": "Give a person."}], extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_named_tool_call_has_the_declared_arguments(client: openai.OpenAI) -> None:
    r = chat(client, messages=ASK, tools=[WEATHER, TIME],
             tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_always_calls_a_tool(client: openai.OpenAI) -> None:
    def ask(content: str):
        return chat(client, messages=[{"role": "user", "content": content}], tools=[WEATHER, TIME],
                    tool_choice="required", parallel_tool_calls=False, max_tokens=64)

    with ThreadPoolExecutor(3) as pool:  # at once: one batch in the engine
        answers = list(pool.map(ask, ("What is the weather in Rome?", "Tell me a joke.", "What time is it?")))
    for r in answers:
        (call,) = r.choices[0].message.tool_calls
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        assert r.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_streamed_tool_call_deltas_reassemble(client: openai.OpenAI, choice) -> None:
    kw = dict(messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=64)
    full = chat(client, **kw).choices[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in chat(client, **kw, stream=True):
        delta = chunk.choices[0].delta
        reasons.append(chunk.choices[0].finish_reason)
        for tc in delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = c["id"] or tc.id
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in full.message.tool_calls]
    assert all(c["id"] for c in calls.values())
    assert [r for r in reasons if r] == [full.finish_reason]


def test_tool_messages_render_through_the_template(client: openai.OpenAI) -> None:
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    r = chat(client, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert r.choices[0].message.tool_calls in (None, [])
    assert r.usage.prompt_tokens > 20


@pytest.mark.parametrize(("body", "param"), [
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}},
     "structured_outputs.json"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_grammar": "root ::= ( unclosed"}, "guided_grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                                        "minimum": "low"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"guided_choice": ["a", "b"], "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
])
def test_bad_constraints_are_400_naming_the_field_and_the_core_survives(server: Server, body, param) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "BadRequestError", err
    ok = httpx.post(f"{server.url}/v1/completions", timeout=120,
                    json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "guided_choice": ["yes", "no"]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("yes", "no")
    assert server.proc.poll() is None


def streamed_calls(chunks) -> list[tuple[str, str]]:
    """(name, arguments) per call of a streamed chat answer, from its ``delta.tool_calls`` fragments."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for tc in chunk.choices[0].delta.tool_calls or []:
            c = calls.setdefault(tc.index, ["", ""])
            c[0] += tc.function.name or ""
            c[1] += tc.function.arguments or ""
    return [(name, args) for _, (name, args) in sorted(calls.items())]


def test_router_passes_structured_and_tool_requests_through(server: Server, client: openai.OpenAI,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """`slicelm router` in front of the server: response_format, tools and tool_choice reach the replica unchanged
    (greedy: the same answers as the server gives directly, streamed and not), and the backend's 400 body too."""
    from router.router_helpers import start_router

    router = start_router(tmp_path_factory.mktemp("router"), [server.url], [MODEL])
    try:
        routed = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=300)
        fmt = dict(messages=[{"role": "user", "content": "Describe a person as JSON."}],
                   response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        assert chat(routed, **fmt).choices[0].message.content == chat(client, **fmt).choices[0].message.content
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            kw = dict(messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False)
            direct = [(t.function.name, t.function.arguments) for t in chat(client, **kw).choices[0].message.tool_calls]
            via = chat(routed, **kw).choices[0]
            assert [(t.function.name, t.function.arguments) for t in via.message.tool_calls] == direct
            assert streamed_calls(chat(routed, **kw, stream=True)) == direct, choice
        bad = {"model": MODEL, "messages": ASK, "guided_regex": "[a-"}
        via, to = (httpx.post(f"{u}/v1/chat/completions", json=bad, timeout=60) for u in (router.url, server.url))
        assert via.status_code == to.status_code == 400 and via.json() == to.json()
    finally:
        router.stop()
