"""``slicelm serve --tensor-parallel-size 2`` on the CPU (API process, engine-core process = rank 0, one worker
process = rank 1, NVLink multicast off in its env): it serves the official ``openai`` client, and a dead rank
fails the server cleanly — kill -9 of the worker ends every open stream with an error event, ``/health``
answers 503 and the server exits 1 within seconds; kill -9 of the engine core takes the worker down with it
(no orphan)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import openai
import pytest
from conftest import MODEL, kill_during_streams, start_server, stop_server
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
        out = kill_during_streams(server, model, pid, num_streams=2, health_window=10)
        assert len(out.streams) == 2, out.streams
        for kind, when in out.streams:
            assert kind.startswith("error-event") and "rank 1" in kind, out.streams  # the stream says why it failed
            assert when - out.killed < 10, out.streams
        assert 503 in out.health, out.health
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
