"""The real ``slicelm serve`` (bundled SmolLM2) in a subprocess, on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_dir: Path, *flags: str, timeout: float = 180.0, model: str = MODEL) -> Server:
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLLM_API_KEY", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slicelm.entrypoints.cli", "serve", model, "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu", "--disable-access-log", *flags],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = Server(proc, port, log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"server did not become healthy in {timeout} s:\n{server.log()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)


@dataclass
class KillOutcome:
    streams: list[tuple[str, float]]  # per stream: "ended" | "error-event: <line>" | "connection: <error>", and when
    health: list[int]  # /health answers after the kill, until the server exited or the window passed
    killed: float  # time.monotonic() of the kill


def kill_during_streams(server: Server, model: str, pid: int, num_streams: int = 4,
                        health_window: float = 5.0) -> KillOutcome:
    """Opens ``num_streams`` long streaming completions, SIGKILLs ``pid`` once every one receives tokens, polls
    ``/health`` until the server exits (or ``health_window`` s), then waits for the streams to end."""
    results: dict[int, tuple[str, float]] = {}
    started = threading.Barrier(num_streams + 1)

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
                        kind = f"error-event: {line}"
        except httpx.HTTPError as e:
            kind = f"connection: {type(e).__name__}"
        results[i] = (kind, time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(num_streams)]
    for t in threads:
        t.start()
    started.wait(60)  # every stream is receiving tokens
    time.sleep(0.3)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    health = []
    while server.proc.poll() is None and time.monotonic() - killed < health_window:
        try:
            health.append(httpx.get(f"{server.url}/health", timeout=1).status_code)
        except httpx.HTTPError:
            break
        time.sleep(0.05)
    for t in threads:
        t.join(10)
    return KillOutcome([results[i] for i in sorted(results)], health, killed)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One shared server for the functional tests (32 sequences at once, 16-token blocks)."""
    s = start_server(tmp_path_factory.mktemp("server"), "--max-num-seqs", "32", "--max-model-len", "2048",
                     "--seed", "0")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real all-MiniLM-L6-v2 embedding server, one per test module."""
    from pooling_helpers import MINILM
    from utils_models import minilm_dir

    minilm_dir()  # skips when the wheel is missing
    server = start_server(tmp_path_factory.mktemp("minilm"), model=MINILM)
    yield server
    stop_server(server)
