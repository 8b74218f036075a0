"""A corpus of bad requests: each gets the right 4xx with an OpenAI-shaped message; the server stays up.

What vLLM accepts (unknown fields, custom roles, ``"5"`` for an integer) is in ``test_vllm_compat.py``."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from conftest import MODEL, Server

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def chat(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": MSG, "max_tokens": 2}
    body.update(kw)
    return {k: v for k, v in body.items() if v is not ...}


def comp(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    body.update(kw)
    return {k: v for k, v in body.items() if v is not ...}


J = {"Content-Type": "application/json"}
# (name, path, body (dict -> JSON, bytes -> raw), headers, status, param named in the error or None)
CASES: list[tuple[str, str, Any, dict[str, str], int, str | None]] = [
    ("malformed json", CHAT, b'{"model": "x", ', J, 400, None),
    ("trailing garbage", CHAT, b'{"model": "x"} xyz', J, 400, None),
    ("json array body", CHAT, b"[1, 2]", J, 400, None),
    ("json string body", CHAT, b'"hello"', J, 400, None),
    ("empty body", CHAT, b"", J, 400, None),
    ("invalid utf-8", CHAT, b'{"model": "\xff\xfe", "messages": []}', J, 400, None),
    ("wrong content type", CHAT, json.dumps(chat()).encode(), {"Content-Type": "text/plain"}, 415, None),
    ("form content type", CHAT, b"model=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    ("oversized body", CHAT, b'{"model": "' + b"x" * (33 << 20) + b'"}', J, 413, None),
    ("unknown model", CHAT, chat(model="gpt-4o"), J, 404, "model"),
    ("model wrong type", CHAT, chat(model=5), J, 400, "model"),
    ("missing messages", CHAT, chat(messages=...), J, 400, "messages"),
    ("empty messages", CHAT, chat(messages=[]), J, 400, "messages"),
    ("messages not a list", CHAT, chat(messages="hi"), J, 400, "messages"),
    ("missing role", CHAT, chat(messages=[{"content": "hi"}]), J, 400, "messages[0].role"),
    ("content wrong type", CHAT, chat(messages=[{"role": "user", "content": 5}]), J, 400, "messages[0].content"),
    ("missing user content", CHAT, chat(messages=[{"role": "user"}]), J, 400, "messages[0].content"),
    ("image part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), J,
     400, "messages[0].content[0].type"),
    ("max_tokens not a number", CHAT, chat(max_tokens="five"), J, 400, "max_tokens"),
    ("logprobs not a boolean", CHAT, chat(logprobs="perhaps"), J, 400, "logprobs"),
    ("stream not a boolean", CHAT, chat(stream=[1]), J, 400, "stream"),
    ("beam search refused", CHAT, chat(use_beam_search=True), J, 400, None),
    ("structured outputs: unknown field", COMP, comp(structured_outputs={"jsn": {}}), J, 400,
     "structured_outputs.jsn"),
    ("structured outputs: two ways at once", COMP, comp(guided_regex="a+", response_format={"type": "json_object"}),
     J, 400, "structured_outputs"),
    ("completions logprobs list", COMP, comp(logprobs=[1]), J, 400, "logprobs"),
    ("max_tokens zero", CHAT, chat(max_tokens=0), J, 400, "max_tokens"),
    ("max_tokens negative", CHAT, chat(max_tokens=-3), J, 400, "max_tokens"),
    ("huge max_tokens", CHAT, chat(max_tokens=10**9), J, 400, "max_tokens"),
    ("huge max_completion_tokens", CHAT, chat(max_completion_tokens=100000), J, 400, "max_tokens"),
    ("temperature negative", CHAT, chat(temperature=-0.5), J, 400, "temperature"),
    ("temperature string", CHAT, chat(temperature="hot"), J, 400, "temperature"),
    ("top_p zero", CHAT, chat(top_p=0), J, 400, "top_p"),
    ("top_p above one", CHAT, chat(top_p=1.5), J, 400, "top_p"),
    ("n zero", CHAT, chat(n=0), J, 400, "n"),
    ("n float", CHAT, chat(n=1.5), J, 400, "n"),
    ("presence_penalty out of range", CHAT, chat(presence_penalty=3), J, 400, "presence_penalty"),
    ("frequency_penalty out of range", CHAT, chat(frequency_penalty=-2.5), J, 400, "frequency_penalty"),
    ("top_logprobs too large", CHAT, chat(logprobs=True, top_logprobs=50), J, 400, "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), J, 400, "top_logprobs"),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), J, 400,
     "stream_options"),
    ("stop wrong type", CHAT, chat(stop=5), J, 400, "stop"),
    ("empty stop string", CHAT, chat(stop=[""]), J, 400, "stop"),
    ("logit_bias bad key", CHAT, chat(logit_bias={"abc": 1}), J, 400, "logit_bias"),
    ("logit_bias token out of vocab", CHAT, chat(logit_bias={"99999999": 1}), J, 400, "logit_bias"),
    ("seed string", CHAT, chat(seed="x"), J, 400, "seed"),
    ("top_k invalid", CHAT, chat(top_k=-5), J, 400, "top_k"),
    ("min_p out of range", CHAT, chat(min_p=2), J, 400, "min_p"),
    ("repetition_penalty zero", CHAT, chat(repetition_penalty=0), J, 400, "repetition_penalty"),
    ("min_tokens above max_tokens", CHAT, chat(min_tokens=10, max_tokens=2), J, 400, "min_tokens"),
    ("stop_token_ids out of vocab", CHAT, chat(stop_token_ids=[10**8]), J, 400, "stop_token_ids"),
    ("named tool not in tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                           tool_choice={"type": "function", "function": {"name": "g"}}), J, 400,
     "tool_choice"),
    ("response_format json_schema without schema", CHAT, chat(response_format={"type": "json_schema"}), J, 400,
     "response_format.json_schema"),
    ("both generation prompt flags", CHAT, chat(continue_final_message=True), J, 400, "continue_final_message"),
    ("completions missing prompt", COMP, comp(prompt=...), J, 400, "prompt"),
    ("completions empty prompt", COMP, comp(prompt=""), J, 400, "prompt"),
    ("completions empty token list", COMP, comp(prompt=[]), J, 400, "prompt"),
    ("completions mixed prompt list", COMP, comp(prompt=["a", [1]]), J, 400, "prompt"),
    ("completions token out of vocab", COMP, comp(prompt=[1, 99999999]), J, 400, "prompt"),
    ("completions prompt too long", COMP, comp(prompt=[42] * 3000), J, 400, "prompt"),
    ("completions logprobs too large", COMP, comp(logprobs=21), J, 400, "logprobs"),
    ("completions suffix", COMP, comp(suffix="x"), J, 400, "suffix"),
    ("completions best_of", COMP, comp(best_of=3), J, 400, "best_of"),
    ("detokenize bad tokens", "/detokenize", {"tokens": ["a"]}, J, 400, "tokens[0]"),
    ("tokenize both prompt and messages", "/tokenize", {"prompt": "a", "messages": MSG}, J, 400, "prompt"),
]


@pytest.mark.parametrize("name,path,body,headers,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server: Server, name: str, path: str, body: Any, headers: dict[str, str], status: int,
                     param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers=headers, timeout=60)
    assert r.status_code == status, (name, r.status_code, r.text[:500])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and len(err["message"]) > 5
    assert {"message", "type", "param", "code"} <= set(err)
    if param is not None:
        assert err["param"] == param, (name, err)


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40


def test_routing_errors_as_vllm(server: Server) -> None:
    """A route that does not exist / a wrong method: Starlette's body, as vLLM answers them."""
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = httpx.get(server.url + CHAT)
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}


def test_model_is_optional_as_vllm(server: Server) -> None:
    """vLLM's chat / completion requests may leave ``model`` out (or empty): the served model answers."""
    for path, body in ((CHAT, chat(model=...)), (CHAT, chat(model="")), (COMP, comp(model=...))):
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == MODEL, (path, r.text[:300])


def test_server_healthy_after_corpus(server: Server) -> None:
    for _, path, body, headers, _, _ in CASES:  # once more, all in a row
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(server.url + path, content=content, headers=headers, timeout=60)
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(server.url + CHAT, json=chat(max_tokens=3, temperature=0), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
