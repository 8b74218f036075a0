"""``slicelm serve --api-server-count 2``: two real API server processes, one engine core, one port.

A tiny random Llama (``--load-format dummy``) with SmolLM2's tokenizer keeps steps fast. Responses carry
the answering process's pid (``SLICELM_DEBUG_PID_HEADER=1``), so the tests see both servers serve; the
processes are killed for real (kill -9) and the tests check that nothing is left running.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import httpx
import openai
import psutil
import pytest
from conftest import MODEL, Server, start_server, stop_server
from test_engine_process import tiny_model


def start_multi(tmp: Path, *flags: str) -> Server:
    with mock.patch.dict(os.environ, {"SLICELM_DEBUG_PID_HEADER": "1"}):
        server = start_server(tmp, "--load-format", "dummy", "--tokenizer", MODEL, "--max-model-len", "8192",
                              "--api-server-count", "2", *flags, model=tiny_model(tmp / "tiny"))
    deadline = time.monotonic() + 60
    while server.log().count("Application startup complete") < 2:  # the first one answered /health
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    return server


def pids(server: Server) -> tuple[int, list[int]]:
    """(engine core pid, API server pids) from the parent's log."""
    log = server.log_path.read_text(errors="replace")
    core = int(re.search(r"engine core process started \(pid (\d+)\)", log).group(1))  # type: ignore[union-attr]
    servers = [int(p) for _, p in sorted(re.findall(r"API server (\d+) started \(pid (\d+)\)", log))]
    assert len(servers) == 2, log
    return core, servers


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_all_gone(pid_list: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pid_list):
        assert time.monotonic() < deadline, [p for p in pid_list if not gone(p)]
        time.sleep(0.1)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_multi(tmp_path_factory.mktemp("asc"))
    yield server
    stop_server(server)


def test_concurrent_requests_are_served_by_both_api_servers(multi: Server) -> None:
    model = str(Path(multi.log_path).parent / "tiny")
    _, server_pids = pids(multi)
    before = httpx.get(multi.url + "/metrics").text

    def one(i: int) -> tuple[int, int, str]:
        with openai.OpenAI(base_url=multi.url + "/v1", api_key="x", max_retries=0) as client:  # own connection
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=6, temperature=0,
                extra_body={"ignore_eos": True})
            out = raw.parse()
            return int(raw.headers["x-slicelm-pid"]), out.usage.completion_tokens, out.choices[0].finish_reason

    seen: set[int] = set()
    results: list[tuple[int, int, str]] = []
    with ThreadPoolExecutor(8) as pool:
        for _ in range(6):  # rounds of 8 concurrent requests until both servers answered
            batch = list(pool.map(one, range(8)))
            results += batch
            seen |= {pid for pid, _, _ in batch}
            if seen == set(server_pids):
                break
    assert seen == set(server_pids), (seen, server_pids)
    assert all(tokens == 6 and reason == "length" for _, tokens, reason in results), results
    after = httpx.get(multi.url + "/metrics").text
    # request counters from both servers are summed; engine counters are counted once, not once per server
    ok = metric(after, "vllm:request_success_total", finished_reason="length") \
        - metric(before, "vllm:request_success_total", finished_reason="length")
    assert ok == len(results)
    gen = metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total")
    assert gen == 6 * len(results)
    assert metric(after, "vllm:e2e_request_latency_seconds_count") >= len(results)
    assert after.count("vllm:num_requests_running{") == 1 and after.count("vllm:cache_config_info{") == 1


def test_client_disconnect_aborts_in_the_shared_core(multi: Server) -> None:
    model = str(Path(multi.log_path).parent / "tiny")
    aborted0 = metric(httpx.get(multi.url + "/metrics").text, "vllm:request_success_total", finished_reason="abort")
    for i in range(4):  # fresh connections: some land on each API server
        body = {"model": model, "prompt": f"stream {i}", "max_tokens": 8000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", multi.url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n >= 4:
                    break  # leave mid-stream: the connection closes
    deadline = time.monotonic() + 3  # 4 x 8000 tokens would take far longer: the core really aborted them
    while True:
        text = httpx.get(multi.url + "/metrics").text
        running = metric(text, "vllm:num_requests_running")
        aborted = metric(text, "vllm:request_success_total", finished_reason="abort") - aborted0
        if running == 0 and aborted == 4:
            break
        assert time.monotonic() < deadline, (running, aborted)
        time.sleep(0.1)


def test_kill_9_of_one_api_server_stops_everything(multi: Server) -> None:
    """(Last in the module: it ends the shared server.)"""
    core, server_pids = pids(multi)
    os.kill(server_pids[1], signal.SIGKILL)
    code = multi.proc.wait(30)
    assert code != 0, multi.log()
    assert "API server 1" in multi.log() and "stopping the others" in multi.log()
    assert_all_gone([core, *server_pids])


@pytest.mark.slow
def test_kill_9_of_the_core_ends_streams_and_every_process(tmp_path: Path) -> None:
    server = start_multi(tmp_path)
    try:
        core, server_pids = pids(server)
        model = str(tmp_path / "tiny")
        results: list[str] = []
        started = threading.Barrier(3)

        def stream(i: int) -> None:
            body = {"model": model, "prompt": f"s{i}", "max_tokens": 8000, "ignore_eos": True, "stream": True}
            kind = "ended"
            try:
                with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
                    for n, line in enumerate(r.iter_lines()):
                        if n == 0:
                            started.wait(30)
                        if line.startswith("data: ") and '"error"' in line:
                            kind = "error-event"
            except httpx.HTTPError as e:
                kind = type(e).__name__
            results.append(kind)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        started.wait(30)
        killed = time.monotonic()
        os.kill(core, signal.SIGKILL)
        code = server.proc.wait(20)
        for t in threads:
            t.join(10)
        assert code != 0 and time.monotonic() - killed < 15, server.log()
        assert len(results) == 2 and "ended" not in results, results
        assert_all_gone(server_pids)
        exits = re.findall(r"API server \d+ \(pid \d+\) exited", server.log())
        assert not exits or "engine core died" in server.log()
    finally:
        stop_server(server)


def test_sigterm_stops_all_processes_with_status_0(tmp_path: Path) -> None:
    server = start_multi(tmp_path)
    try:
        core, server_pids = pids(server)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log()
        assert_all_gone([core, *server_pids])
    finally:
        stop_server(server)
