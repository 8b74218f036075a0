"""Nothing a request sends can stall the server or run code (the audit's exact inputs); it stays healthy."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, Server, start_server, stop_server

pytestmark = pytest.mark.slow
KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("hard"), "--api-key", KEY, "--max-num-seqs", "8",
                     "--max-model-len", "1024")
    yield s
    stop_server(s)


def healthy(s: Server) -> None:
    assert httpx.get(s.url + "/health", timeout=5).status_code == 200
    r = httpx.post(s.url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def post(s: Server, path: str, body: dict | bytes, **kw: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(s.url + path, content=content, timeout=60,
                      headers={**AUTH, "Content-Type": "application/json", **kw.get("headers", {})})  # type: ignore


@pytest.mark.parametrize("rid", ["abc\r\nX-Evil: 1", "caf\u00e9-\u6f22"])
def test_bad_request_ids_are_refused_up_front(srv: Server, rid: str) -> None:
    t0 = time.time()
    r = post(srv, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "max_tokens": 500, "request_id": rid,
                                           "ignore_eos": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id"
    assert time.time() - t0 < 5  # refused before generating 500 tokens
    healthy(srv)


def test_request_chat_templates_are_refused(srv: Server) -> None:
    nested = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    body = {"messages": MSG, "chat_template": nested}
    assert len(json.dumps(body)) < 160
    for path, b in (("/tokenize", body), ("/v1/chat/completions", {**body, "model": MODEL}),
                    ("/tokenize", {"messages": MSG, "chat_template": "{{ 'x' * 1000000 }}"}),
                    ("/tokenize", {"messages": MSG, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}})):
        t0 = time.time()
        r = post(srv, path, b)
        assert r.status_code == 400 and "--trust-request-chat-template" in r.json()["error"]["message"], r.text
        assert time.time() - t0 < 2
    healthy(srv)


def test_template_limits_when_trusted() -> None:
    """With --trust-request-chat-template the sandbox caps output, range() and render time."""
    import jinja2

    from slicelm.loader.chat_template import compile_template as _compile
    from slicelm.loader.chat_template import render_limited as _render_limited

    for t in ("{{ 'x' * 1000000000 }}", "{% for i in range(100000) %}{% endfor %}",
              "{{ ().__class__.__base__.__subclasses__() }}", "{{ [1] * 100000000 }}"):
        with pytest.raises(jinja2.TemplateError):
            _render_limited(_compile(t), {})


def test_huge_chat_body_does_not_block_health(srv: Server) -> None:
    body = json.dumps({"model": MODEL, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "word " * 4_000_000}]}).encode()
    assert len(body) > 20_000_000
    result: dict[str, httpx.Response] = {}
    th = threading.Thread(target=lambda: result.setdefault("r", post(srv, "/v1/chat/completions", body)))
    th.start()
    worst = 0.0
    while th.is_alive():
        t0 = time.time()
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        worst = max(worst, time.time() - t0)
        time.sleep(0.05)
    th.join()
    assert result["r"].status_code in (400, 413) and result["r"].json()["error"]["message"]
    assert worst < 1.5, worst
    healthy(srv)


def test_api_key_on_every_computing_route(srv: Server) -> None:
    for path in ("/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/tokenize", "/detokenize",
                 "/pooling", "/invocations", "/v2/embed", "/v1/embeddings", "/v1/completions", "/v1/models"):
        method = httpx.get if path == "/v1/models" else httpx.post
        r = method(srv.url + path, **({} if path == "/v1/models" else {"json": {"prompt": "x"}}))  # type: ignore
        assert r.status_code == 401, (path, r.status_code)
    for path in ("/health", "/metrics", "/version", "/ping"):
        assert httpx.get(srv.url + path).status_code == 200, path
    assert httpx.head(srv.url + "/health").status_code == 200
    first_ok = [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer wrong")]
    body = {"model": MODEL, "prompt": "Hi"}
    assert httpx.post(srv.url + "/tokenize", json=body, headers=first_ok).status_code == 200
    assert httpx.post(srv.url + "/tokenize", json=body, headers=first_ok[::-1]).status_code == 401


@pytest.mark.parametrize("name,raw,param", [
    ("lone surrogate", b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("non-ASCII digit logit_bias key", '{"model": "%s", "messages": [{"role": "user", "content": "a"}], '
     '"logit_bias": {"\u00b2": 1}}'.encode(), "logit_bias"),
    ("NaN temperature", b'{"model": "%s", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}', None),
    ("infinite temperature", b'{"model": "%s", "messages": [{"role": "user", "content": "a"}], "temperature": 1e999}',
     "temperature"),
    ("infinite presence_penalty", b'{"model": "%s", "prompt": "a", "presence_penalty": -1e999}', "presence_penalty"),
    ("underflowing repetition_penalty", b'{"model": "%s", "prompt": "a", "repetition_penalty": 1e-320}',
     "repetition_penalty"),
    ("priority under fcfs", b'{"model": "%s", "prompt": "a", "priority": 5}', "priority"),
])
def test_clear_400s(srv: Server, name: str, raw: bytes, param: str | None) -> None:
    path = "/v1/completions" if b'"prompt"' in raw else "/v1/chat/completions"
    r = post(srv, path, raw.replace(b"%s", MODEL.encode()))
    assert r.status_code == 400, (name, r.text)
    err = r.json()["error"]
    assert err["type"] == "BadRequestError"
    if param is not None:
        assert err["param"] == param, (name, err)
    healthy(srv)


def test_assistant_tool_calls_with_null_content(srv: Server) -> None:
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = post(srv, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_sigterm_with_half_sent_body_exits(tmp_path: Path) -> None:
    s = start_server(tmp_path, "--shutdown-timeout", "2", "--max-model-len", "512")
    try:
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        time.sleep(0.5)
        t0 = time.time()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(30)
        assert time.time() - t0 < 15
        sock.close()
    finally:
        stop_server(s)
