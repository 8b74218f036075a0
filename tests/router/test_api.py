"""The router's HTTP surface against fake backends: errors in OpenAI's shape, API key, pass-through headers,
merged ``/v1/models``, ``/metrics`` (production-stack's names, parsed by prometheus_client) and the log line."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from router_helpers import Proc, start_fake, start_router

# production-stack's log line (src/vllm_router/services/request_service/request.py), with its formatter
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] INFO: Routing request (\S+) with session id (\S+) "
                      r"to (http://\S+) at (\d+\.\d+), process time = (\d+\.\d{4}) \(proxy\.py:\d+:slicelm\.router\)$")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, Proc, Proc]]:
    tmp = tmp_path_factory.mktemp("api")
    a = start_fake(tmp, model="chat")
    b = start_fake(tmp, model="chat")
    e = start_fake(tmp, model="embed")
    router = start_router(tmp, [a.url, b.url, e.url], ["chat", "chat", "embed"], "--api-key", "sekret",
                          "--routing-logic", "session", "--session-key", "x-user-id")
    yield a, b, e, router
    for p in (router, a, b, e):
        p.stop()


AUTH = {"Authorization": "Bearer sekret"}


def post(router: Proc, path: str, body: object, headers: dict | None = None,
         raw: bytes | None = None) -> httpx.Response:
    h = {**AUTH, **(headers or {})}
    if raw is not None:
        return httpx.post(router.url + path, content=raw, headers=h, timeout=10)
    return httpx.post(router.url + path, json=body, headers=h, timeout=10)


def err(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors_have_openai_shape(stack) -> None:  # type: ignore[no-untyped-def]
    router = stack[3]
    assert post(router, "/v1/completions", None, raw=b"{not json").status_code == 400
    assert err(post(router, "/v1/completions", None, raw=b"[1, 2]"))["type"] == "invalid_request_error"
    r = post(router, "/v1/completions", {"prompt": "x"})
    assert r.status_code == 400 and err(r)["param"] == "model"
    r = post(router, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and err(r)["code"] == "model_not_found"
    r = post(router, "/v1/completions", {"model": "chat", "prompt": "x", "priority": "high"})
    assert r.status_code == 400 and err(r)["param"] == "priority"


def test_api_key_is_checked_at_the_router(stack) -> None:  # type: ignore[no-untyped-def]
    router = stack[3]
    r = httpx.post(router.url + "/v1/completions", json={"model": "chat", "prompt": "x"})
    assert r.status_code == 401 and err(r)["code"] == "invalid_api_key"
    r = httpx.get(router.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(router.url + "/health").status_code == 200  # health and metrics stay open
    assert httpx.get(router.url + "/metrics").status_code == 200


def test_models_merged_and_deduplicated(stack) -> None:  # type: ignore[no-untyped-def]
    router = stack[3]
    data = httpx.get(router.url + "/v1/models", headers=AUTH).json()["data"]
    assert sorted(m["id"] for m in data) == ["chat", "embed"]
    assert httpx.get(router.url + "/v1/models/embed", headers=AUTH).json()["id"] == "embed"
    assert httpx.get(router.url + "/v1/models/none", headers=AUTH).status_code == 404
    assert httpx.get(router.url + "/version").json()["version"]
    engines = httpx.get(router.url + "/engines").json()
    assert len(engines) == 3 and all(e["healthy"] for e in engines)


def test_request_id_kept_and_hop_by_hop_stripped(stack) -> None:  # type: ignore[no-untyped-def]
    _a, _b, e, router = stack
    r = post(router, "/v1/embeddings", {"model": "embed", "input": "x"},
             headers={"X-Request-Id": "rid-123", "Proxy-Connection": "keep-alive", "TE": "trailers",
                      "X-Custom": "kept"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "rid-123"
    body = r.json()
    assert body["port"] == e.port and body["id"] == "rid-123"
    seen = {k.lower(): v for k, v in body["headers"].items()}
    assert seen["x-request-id"] == "rid-123" and seen["x-custom"] == "kept"
    assert "proxy-connection" not in seen and "te" not in seen
    assert seen["authorization"] == "Bearer sekret"


def test_session_routing_and_log_line(stack) -> None:  # type: ignore[no-untyped-def]
    a, b, _e, router = stack
    ports = {}
    for user in (f"u{i}" for i in range(24)):  # all 24 on one replica of two: p = 2**-23 (8 users: 0.8%, seen)
        got = {post(router, "/v1/completions", {"model": "chat", "prompt": "x"},
                    headers={"x-user-id": user, "X-Request-Id": f"req-{user}"}).json()["port"] for _ in range(2)}
        assert len(got) == 1
        ports[user] = got.pop()
    assert set(ports.values()) == {a.port, b.port}
    lines = [x for x in router.log().splitlines() if "Routing request req-u" in x]
    assert len(lines) == 48
    for line in lines:
        m = LOG_LINE.match(line)
        assert m, line
        assert m.group(2) == m.group(1).removeprefix("req-")  # the session id is the x-user-id header


def test_metrics_parse_with_production_stack_names(stack) -> None:  # type: ignore[no-untyped-def]
    a, b, e, router = stack
    post(router, "/v1/completions", {"model": "chat", "prompt": "x"})
    text = httpx.get(router.url + "/metrics").text
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append(s.labels)
    for name in ("vllm:current_qps", "vllm:healthy_pods_total", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:avg_latency", "vllm:avg_itl", "vllm:avg_decoding_length",
                 "vllm:num_prefill_requests", "vllm:num_decoding_requests"):
        assert name in samples and all(set(lab) == {"server"} for lab in samples[name]), name
    assert {"model"} == set(samples["vllm:num_incoming_requests_total"][0])
    assert {"server", "model", "status", "le"} == set(samples["vllm:request_latency_seconds_bucket"][0])
    assert {"server", "model"} == set(samples["vllm:input_tokens_total"][0])
    assert "router_cpu_usage_percent" in samples and "router_memory_usage_percent" in samples
    healthy = {lab["server"] for lab in samples["vllm:healthy_pods_total"]}
    assert healthy == {a.url, b.url, e.url}


@pytest.mark.parametrize("path", ["/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank", "/v1/embeddings"])
def test_pooling_routes_are_forwarded_by_model(stack, path: str) -> None:  # type: ignore[no-untyped-def]
    e, router = stack[2], stack[3]
    r = post(router, path, {"model": "embed", "query": "q", "documents": ["a"], "text_1": "a", "text_2": "b"})
    assert r.status_code == 200 and r.json()["port"] == e.port


def test_tokenize_routes_by_model(stack) -> None:  # type: ignore[no-untyped-def]
    a, b, e, router = stack
    assert post(router, "/tokenize", {"model": "embed", "prompt": "x"}).json()["port"] == e.port
    assert post(router, "/detokenize", {"model": "chat", "tokens": [1]}).json()["port"] in (a.port, b.port)
    r = post(router, "/tokenize", {"prompt": "x"})  # two models: which one is ambiguous
    assert r.status_code == 400 and err(r)["param"] == "model"
