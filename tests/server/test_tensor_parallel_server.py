"""``slicelm serve --tensor-parallel-size 2`` on the CPU (API process, engine-core process = rank 0, one worker
process = rank 1, NVLink multicast off in its env): it serves the official ``openai`` client, and a dead rank
fails the server cleanly — kill -9 of the worker ends every open stream with an error event, ``/health``
answers 503 and the server exits 1 within seconds; kill -9 of the engine core takes the worker down with it
(no orphan)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MODEL, start_server, stop_server
from test_engine_process import tiny_model

from slicelm.distributed.env import MULTICAST_OFF

TP_FLAGS = ("--tensor-parallel-size", "2", "--load-format", "dummy", "--tokenizer", MODEL, "--max-model-len", "8192")


def worker_pid(log: str) -> int:
    m = re.search(r"tensor-parallel worker rank 1 started \(pid (\d+)\)", log)
    assert m, log
    return int(m.group(1))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


@pytest.mark.slow
def test_kill_9_of_a_worker_fails_every_stream_and_the_server_exits_1(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "tiny")
    server = start_server(tmp_path, *TP_FLAGS, model=model)
    try:
        pid = worker_pid(server.log())
        environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        assert MULTICAST_OFF.items() <= environ.items()  # NVLink multicast stays off in every rank
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        done = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
        assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
        results: dict[int, tuple[str, float]] = {}
        started = threading.Barrier(3)

        def stream(i: int) -> None:
            body = {"model": model, "prompt": f"stream {i}", "max_tokens": 8000, "ignore_eos": True, "stream": True}
            kind, first = "ended", True
            try:
                with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
                    for line in r.iter_lines():
                        if first:
                            first = False
                            started.wait(30)
                        if line.startswith("data: ") and '"error"' in line:
                            kind = "error-event: " + line
            except httpx.HTTPError as e:
                kind = f"connection: {type(e).__name__}"
            results[i] = (kind, time.monotonic())

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        started.wait(60)  # both streams are receiving tokens
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        health = []
        while server.proc.poll() is None and time.monotonic() - killed < 10:
            try:
                health.append(httpx.get(f"{server.url}/health", timeout=1).status_code)
            except httpx.HTTPError:
                break
            time.sleep(0.05)
        for t in threads:
            t.join(15)
        assert len(results) == 2, results
        for kind, when in results.values():
            assert kind.startswith("error-event") and "rank 1" in kind, results  # the stream says why it failed
            assert when - killed < 10, results
        assert 503 in health, health
        assert server.proc.wait(15) == 1, server.log()
        assert "tensor-parallel worker rank 1" in server.log() and "SIGKILL" in server.log()
    finally:
        stop_server(server)


@pytest.mark.slow
def test_kill_9_of_the_engine_core_takes_its_worker_down(tmp_path: Path) -> None:
    server = start_server(tmp_path, *TP_FLAGS, model=tiny_model(tmp_path / "tiny"))
    try:
        log = server.log()
        core = int(re.search(r"engine core process started \(pid (\d+)\)", log).group(1))  # type: ignore[union-attr]
        worker = worker_pid(log)
        os.kill(core, signal.SIGKILL)
        assert server.proc.wait(15) == 1, server.log()
        assert wait_gone(worker, 10), "the worker outlived its engine core"
    finally:
        stop_server(server)
