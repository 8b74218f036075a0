"""Processes for the router tests: ``slicelm router``, small fake backends and real ``slicelm serve``, each in a
subprocess on a free port (conftest.py holds the fixtures)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).resolve().parent / "fake_backend.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    cmd: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(30)


def _spawn(cmd: list[str], port: int, log_path: Path, health: str = "/health", timeout: float = 60.0) -> Proc:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLLM_API_KEY", None)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    p = Proc(proc, port, log_path, cmd)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}:\n{p.log()[-3000:]}")
        try:
            if httpx.get(p.url + health, timeout=1.0).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    p.stop()
    raise RuntimeError(f"{cmd} did not become healthy in {timeout} s:\n{p.log()[-3000:]}")


def start_fake(tmp: Path, *flags: str, model: str = "fake", port: int | None = None) -> Proc:
    port = port or free_port()
    cmd = [sys.executable, str(FAKE), "--port", str(port), "--model", model, *flags]
    return _spawn(cmd, port, tmp / f"fake-{port}.log")


def restart(p: Proc) -> Proc:
    p.stop()
    return _spawn(p.cmd, p.port, p.log_path)


def start_router(tmp: Path, backends: list[str], models: list[str], *flags: str) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "slicelm.entrypoints.cli", "router", "--host", "127.0.0.1", "--port", str(port),
           "--static-backends", ",".join(backends), "--static-models", ",".join(models), *flags]
    return _spawn(cmd, port, tmp / f"router-{port}.log")


def engines(router: Proc) -> dict[str, dict]:
    return {e["url"]: e for e in httpx.get(router.url + "/engines", timeout=5).json()}


def send_and_hold(url: str, path: str, body: dict) -> socket.socket:
    """POSTs ``body`` and returns the open connection without reading the answer: closing it is the client
    leaving (what a client timeout does)."""
    parts = urlsplit(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def scrape(url: str, prefix: str) -> dict[str, float]:
    """``/metrics`` samples whose line starts with ``prefix``, keyed by the sample with its labels."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(prefix)}


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _load_server_launcher():  # type: ignore[no-untyped-def]
    """tests/server's launcher of the real ``slicelm serve`` (loaded by path: its file is a conftest)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("server_launcher", ROOT / "tests" / "server" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["server_launcher"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


server_launcher = _load_server_launcher()
MINILM = "all-minilm-l6-v2"
SMOLLM = server_launcher.MODEL
