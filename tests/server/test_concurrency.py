"""Concurrent streams, client disconnects and /metrics against the real server."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from conftest import MODEL, Server
from prometheus_client.parser import text_string_to_metric_families

from slicelm.entrypoints.server.metrics import METRIC_NAMES, TTFT_BUCKETS

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "a cat", "Paris", "rain", "a robot", "winter", "coffee", "mountains"]


def prompt(i: int) -> str:
    return f"Tell me one fact about {TOPICS[i % len(TOPICS)]}."


def metrics(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
                out[s.name] = s.value
    return out


async def stream_chat(client: httpx.AsyncClient, i: int, max_tokens: int = 12) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def test_32_concurrent_streams_equal_alone(server: Server) -> None:
    async def main() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            together = await asyncio.gather(*(stream_chat(client, i) for i in range(32)))
            alone = [await stream_chat(client, i) for i in range(len(TOPICS))]
        return list(together), alone

    together, alone = asyncio.run(main())
    assert all(t for t in together)
    for i in range(32):  # 4 copies of each prompt in the batch, each equal to the prompt run alone
        assert together[i] == alone[i % len(TOPICS)], (i, together[i], alone[i % len(TOPICS)])


def test_disconnect_mid_stream_frees_everything(server: Server) -> None:
    idle = metrics(server)
    assert idle["vllm:num_requests_running"] == 0
    body = {"model": MODEL, "prompt": "Count forever: 1, 2, 3,", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection
        seen = 0
        while seen < 3:
            seen += next(lines).startswith("data: ")
        busy = metrics(server)
        assert busy["vllm:num_requests_running"] == 1 and busy["vllm:kv_cache_usage_perc"] > idle[
            "vllm:kv_cache_usage_perc"]
    t0 = time.time()  # the connection is closed here
    while time.time() - t0 < 1.0:
        m = metrics(server)
        if m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == idle["vllm:kv_cache_usage_perc"]:
            break
        time.sleep(0.05)
    assert m["vllm:num_requests_running"] == 0, m
    assert m["vllm:kv_cache_usage_perc"] == idle["vllm:kv_cache_usage_perc"], m
    assert time.time() - t0 < 1.0


def test_non_streaming_disconnect_aborts(server: Server) -> None:
    body = {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
    t0 = time.time()
    while time.time() - t0 < 2.0 and metrics(server)["vllm:num_requests_running"] != 0:
        time.sleep(0.05)
    assert metrics(server)["vllm:num_requests_running"] == 0


def test_metrics_parse_and_carry_every_name(server: Server) -> None:
    httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(METRIC_NAMES) <= set(families), set(METRIC_NAMES) - set(families)
    ttft = families["vllm:time_to_first_token_seconds"]
    buckets = [float(s.labels["le"]) for s in ttft.samples if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    assert buckets == TTFT_BUCKETS
    for s in families["vllm:num_requests_running"].samples:
        assert s.labels == {"model_name": MODEL, "engine": "0"}
    success = {s.labels["finished_reason"]: s.value for s in families["vllm:request_success"].samples
               if s.name.endswith("_total")}
    assert success["length"] >= 1 and set(success) == {"stop", "length", "abort"}
    assert any(s.value > 0 for s in families["vllm:generation_tokens"].samples)
