"""The server's own warm-up (``server/warmup.py``) on the real server: it runs before ``/health`` answers 200,
through the whole app (auth included), and leaves nothing a user sees — every ``vllm:*`` series at zero, no
prefix-cache entry — so the metrics count exactly the user's requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MODEL, Server, start_server, stop_server
from pooling_helpers import MINILM
from prometheus_client.parser import text_string_to_metric_families

from slicelm.entrypoints.server.warmup import WARMUP_TEXT

pytestmark = pytest.mark.slow
KEY = "warm-up-test-key"
COUNTED = ("vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
           "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:e2e_request_latency_seconds_count",
           "vllm:time_to_first_token_seconds_count", "vllm:request_params_n_count",
           "vllm:iteration_tokens_total_count", "vllm:request_prompt_tokens_count")


def metrics(server: Server) -> dict[str, float]:
    """Every sample of ``/metrics``, summed over labels, by sample name."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def warmup_line(server: Server) -> str:
    log = server.log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if "API warm-up: " in line]
    assert len(lines) == 1, log[-3000:]
    assert "API warm-up request failed" not in log and "did not confirm" not in log, log[-3000:]
    assert "HTTP Request: POST http://warm-up" not in log  # nothing that reads like a user's request
    # lifespan start-up (the warm-up) ends before uvicorn binds its socket: before /health can answer at all
    assert log.index(lines[0]) < log.index("Application startup complete"), log[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("warm"), "--api-key", KEY, "--enable-prompt-tokens-details",
                     "--max-model-len", "512", "--max-num-seqs", "4", timeout=600)
    yield s
    stop_server(s)


def test_chat_server_warms_up_before_health_through_auth(chat: Server) -> None:
    line = warmup_line(chat)
    assert "5 requests (/v1/chat/completions, /v1/completions)" in line


def test_metrics_start_at_zero_and_no_warm_up_prefix_is_cached(chat: Server) -> None:
    """The user's first request is the warm-up's own chat: nothing of it is cached, and the metrics hold that one
    request alone; sent again, it hits the cache (so the cache works)."""
    before = metrics(chat)
    assert {name: before.get(name, 0.0) for name in COUNTED} == dict.fromkeys(COUNTED, 0.0)
    assert before["vllm:num_requests_running"] == 0 and before["vllm:kv_cache_usage_perc"] == 0
    client = openai.OpenAI(base_url=f"{chat.url}/v1", api_key=KEY)
    messages = [{"role": "user", "content": WARMUP_TEXT}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 16  # at least one full block could have been cached
    assert not (first.usage.prompt_tokens_details and first.usage.prompt_tokens_details.cached_tokens)
    m = metrics(chat)
    assert m["vllm:request_success_total"] == 1 and m["vllm:e2e_request_latency_seconds_count"] == 1
    assert m["vllm:request_params_n_count"] == 1 and m["vllm:prefix_cache_hits_total"] == 0
    assert m["vllm:prompt_tokens_total"] == first.usage.prompt_tokens
    assert m["vllm:generation_tokens_total"] == first.usage.completion_tokens
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_metrics_count_each_user_request_once(chat: Server) -> None:
    before = metrics(chat)
    client = openai.OpenAI(base_url=f"{chat.url}/v1", api_key=KEY)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                       max_tokens=3, temperature=0)
    chunks = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=2, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert len(list(chunks)) >= 1
    after = metrics(chat)
    for name in ("vllm:request_success_total", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_params_n_count"):
        assert after[name] - before[name] == 2, name
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated == r.usage.completion_tokens + 2


@pytest.fixture(scope="module")
def embed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from utils_models import minilm_dir

    minilm_dir()  # skips when the wheel is missing
    s = start_server(tmp_path_factory.mktemp("warm-embed"), model=MINILM, timeout=600)
    yield s
    stop_server(s)


def test_embedding_server_warms_up_its_pooling_endpoints_only(embed: Server, tmp_path: Path) -> None:
    line = warmup_line(embed)
    assert "3 requests (/v1/embeddings, /v1/score)" in line
    before = metrics(embed)
    assert before.get("vllm:request_success_total", 0) == 0 and before.get("vllm:prompt_tokens_total", 0) == 0
    assert before["slicelm:pooling_requests_total"] == 0  # the series made at start-up, counting nothing
    client = openai.OpenAI(base_url=f"{embed.url}/v1", api_key="unused")
    client.embeddings.create(model=MINILM, input=["one", "two"])
    after = metrics(embed)
    # each input is one engine request (as in vLLM): two, and only these two
    assert after["vllm:request_success_total"] == 2 and after["slicelm:pooling_requests_total"] == 2
