"""The server's warm-up (``server/warmup.py``) over the real app and ``AsyncLLM`` with a fake core (fast): it
serves one request of each generation kind through the whole app before start-up ends, pays the first-use costs
a first request paid (measured: the core's output reader thread, the event loop's default executor that
tokenization runs on, FastAPI's per-endpoint context), then the core empties its prefix cache and no metric counts
any of it."""

from __future__ import annotations

import threading

import fastapi.routing
from fake_engine import make_fake_engine
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from slicelm.entrypoints.server import chat, completions
from slicelm.entrypoints.server.app import build_app
from slicelm.entrypoints.server.state import ServerState
from slicelm.entrypoints.server.warmup import warmup_calls

KEY = "k"


def counted(text: str, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_generation_warm_up_runs_in_start_up_and_leaves_no_trace() -> None:
    engine, fake = make_fake_engine()
    state = ServerState.from_engine(engine, api_keys=[KEY], log_stats=False)
    calls = warmup_calls(state)
    assert [c.path for c in calls] == ["/v1/completions"] * 2 + ["/v1/chat/completions"] * 3
    assert [c.body.get("stream", False) for c in calls] == [False, True, False, True, False]
    thread_names = {t.name for t in threading.enumerate()}
    assert "slicelm-core-reader" not in thread_names
    with TestClient(build_app(state, warm_up=True)) as client:  # start-up (lifespan) ran the warm-up
        assert fake.resets == 1
        names = {t.name for t in threading.enumerate()}
        assert "slicelm-core-reader" in names  # the core's output reader runs already
        assert any(n.startswith("asyncio_") for n in names - thread_names)  # the loop's default executor
        cache = getattr(fastapi.routing, "_endpoint_context_cache", None)
        if cache is not None:  # FastAPI reads each endpoint's source position on its first request
            assert id(chat.create_chat_completion) in cache and id(completions.create_completion) in cache
        text = client.get("/metrics").text
        for name in ("vllm:request_success_total", "vllm:generation_tokens_total",
                     "vllm:e2e_request_latency_seconds_count", "vllm:request_params_n_count"):
            assert counted(text, name) == 0, name
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        text = client.get("/metrics").text
        assert counted(text, "vllm:request_success_total") == 1 and counted(text, "vllm:request_params_n_count") == 1
        assert counted(text, "vllm:generation_tokens_total") == 3


def test_pooling_and_score_tasks_warm_their_own_endpoints() -> None:
    engine, _ = make_fake_engine()
    state = ServerState.from_engine(engine, log_stats=False)
    state.task = "score"
    assert [c.path for c in warmup_calls(state)] == ["/v1/rerank", "/v1/score"]
    state.task = "embed"
    assert [c.path for c in warmup_calls(state)] == ["/v1/embeddings", "/v1/embeddings", "/v1/score"]
    engine.shutdown()
