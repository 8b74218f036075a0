"""vLLM's sleep mode through the real server (bundled SmolLM2 on the CPU, ``--enable-sleep-mode --elastic-kv``):
``/sleep`` levels and modes, requests that arrive while asleep (queued, answered after the wake-up),
``/wake_up`` tags, ``/is_sleeping``, the sleep-state gauge; then ``slicelm router --idle-sleep-after``
putting the replica to sleep and waking it for the next request."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, Server, start_server, stop_server
from router.router_helpers import start_router, wait_for

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def sleepy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    os.environ["OMP_NUM_THREADS"] = "1"  # batch-1 CPU decoding: oversubscribed threads only slow it down
    try:
        s = start_server(tmp_path_factory.mktemp("sleepy"), "--enable-sleep-mode", "--elastic-kv",
                         "--max-model-len", "512", "--max-num-seqs", "8", "--kv-cache-memory-bytes", "48MiB")
    finally:
        del os.environ["OMP_NUM_THREADS"]
    yield s
    stop_server(s)


def _complete(url: str, max_tokens: int = 8, **kw: object) -> openai.types.Completion:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=300)
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0, **kw)


def _sleeping(url: str) -> bool:
    return httpx.get(f"{url}/is_sleeping", timeout=30).json()["is_sleeping"]


def _gauge(url: str, state: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:engine_sleep_state{") and f'sleep_state="{state}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no vllm:engine_sleep_state for {state}")


@pytest.fixture(scope="module")
def answer(sleepy: Server) -> str:
    return _complete(sleepy.url).choices[0].text


def test_level1_sleep_queues_requests_and_wake_up_answers_them(sleepy: Server, answer: str) -> None:
    assert not _sleeping(sleepy.url) and _gauge(sleepy.url, "awake") == 1
    assert httpx.post(f"{sleepy.url}/sleep", params={"level": 1}, timeout=120).status_code == 200
    assert _sleeping(sleepy.url)
    assert _gauge(sleepy.url, "awake") == 0 and _gauge(sleepy.url, "weights_offloaded") == 1
    assert httpx.get(f"{sleepy.url}/health", timeout=10).status_code == 200  # alive while asleep
    results: list[str] = []
    asleep_request = threading.Thread(target=lambda: results.append(_complete(sleepy.url).choices[0].text))
    asleep_request.start()
    asleep_request.join(2.0)
    assert asleep_request.is_alive() and not results  # waits in the queue, as in vLLM
    r = httpx.post(f"{sleepy.url}/wake_up", timeout=120)
    assert r.status_code == 200 and float(r.headers["x-slicelm-wake-seconds"]) > 0
    asleep_request.join(120)
    assert results == [answer] and not _sleeping(sleepy.url)


def test_abort_mode_ends_running_streams_and_level2_reloads_the_weights(sleepy: Server, answer: str) -> None:
    client = openai.OpenAI(base_url=f"{sleepy.url}/v1", api_key="x", timeout=300)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    assert httpx.post(f"{sleepy.url}/sleep", params={"level": 2}, timeout=120).status_code == 200
    reasons = [c.choices[0].finish_reason for c in stream if c.choices]
    assert reasons[-1] == "abort"  # ended, not left hanging
    assert _gauge(sleepy.url, "discard_all") == 1
    assert httpx.post(f"{sleepy.url}/wake_up", params={"tags": "weights"}, timeout=300).status_code == 200
    assert _sleeping(sleepy.url)  # the KV cache is still asleep
    assert httpx.post(f"{sleepy.url}/wake_up", params={"tags": "kv_cache"}, timeout=120).status_code == 200
    assert not _sleeping(sleepy.url)
    assert _complete(sleepy.url).choices[0].text == answer  # reloaded from the checkpoint


def test_wait_mode_lets_running_requests_finish(sleepy: Server) -> None:
    results = []
    running = threading.Thread(target=lambda: results.append(
        _complete(sleepy.url, max_tokens=24, extra_body={"ignore_eos": True})))
    running.start()
    wait_for(lambda: "vllm:num_requests_running" in (m := httpx.get(f"{sleepy.url}/metrics").text)
             and 'vllm:num_requests_running{engine="0",model_name="smollm2-135m-instruct"} 1.0' in m, 60,
             "the request to run")
    assert httpx.post(f"{sleepy.url}/sleep", params={"level": 1, "mode": "wait"}, timeout=300).status_code == 200
    running.join(10)
    assert results and results[0].choices[0].finish_reason == "length" and len(results[0].choices[0].text) > 0
    assert httpx.post(f"{sleepy.url}/wake_up", timeout=120).status_code == 200


@pytest.mark.parametrize(("path", "params"), [("/sleep", {"level": 3}), ("/sleep", {"level": "x"}),
                                              ("/sleep", {"mode": "later"}), ("/wake_up", {"tags": "gpu"})])
def test_bad_parameters_are_400(sleepy: Server, path: str, params: dict) -> None:
    r = httpx.post(f"{sleepy.url}{path}", params=params, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


def test_without_the_flag_sleep_is_refused(server: Server) -> None:
    r = httpx.post(f"{server.url}/sleep", timeout=30)
    assert r.status_code == 400 and "--enable-sleep-mode" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/is_sleeping", timeout=30).json() == {"is_sleeping": False}


def test_router_puts_an_idle_replica_to_sleep_and_wakes_it_for_a_request(sleepy: Server, answer: str,
                                                                       tmp_path) -> None:
    router = start_router(tmp_path, [sleepy.url], [MODEL], "--idle-sleep-after", "1",
                          "--health-check-interval", "0.5")
    try:
        wait_for(lambda: _sleeping(sleepy.url), 60, "the router to put the idle replica to sleep")
        models = httpx.get(f"{router.url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == [MODEL]  # still listed while asleep
        assert _complete(router.url).choices[0].text == answer  # this request woke it and waited
        assert "Woke up" in router.log()
    finally:
        router.stop()
    httpx.post(f"{sleepy.url}/wake_up", timeout=120)
