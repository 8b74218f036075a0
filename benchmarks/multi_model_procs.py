"""The processes of ``multi_model.py``: six ``slicelm serve`` engines, routers, the MPS daemon, and what is
asked of the servers directly (idle check, level-1 sleep and wake-up)."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serving import free_port

from slicelm.slicing.broker_client import BROKER_ENV, GPU_ENV, REPLICA_ENV

GPU_ID = "gpu0"  # the broker's name for the one GPU


def wait_http(url: str, proc: subprocess.Popen, deadline: float, what: str) -> None:
    """Until ``url``/health answers 200; ``deadline`` is a ``time.monotonic()`` value."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{what} was not healthy in time")


def start_server(name: str, model_dir: str, budget: int, args: argparse.Namespace, env: dict[str, str],
                 logs: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "slicelm.entrypoints.cli", "serve", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", name, "--load-format", "dummy", "--skip-tokenizer-init",
           "--elastic-kv", "--elastic-kv-watermark", "0.05", "--enable-sleep-mode", "--max-model-len",
           str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs), "--max-waiting-requests", "100000",
           "--disable-access-log", "--uvicorn-log-level", "warning"]
    if args.smoke:
        cmd += ["--device", "cpu", "--kv-cache-memory-bytes", str(budget)]
    else:
        cmd += ["--gpu-memory-budget", f"{budget >> 20}MiB"]
    full_env = {**os.environ, **env, BROKER_ENV: args.broker_address, REPLICA_ENV: name, GPU_ENV: GPU_ID}
    with open(logs / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    return proc, f"http://127.0.0.1:{port}"


def start_router(urls: dict[str, str], logs: Path, tag: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "slicelm.entrypoints.cli", "router", "--host", "127.0.0.1", "--port", str(port),
           "--static-backends", ",".join(urls.values()), "--static-models", ",".join(urls),
           "--health-check-interval", "0.5", "--max-inflight-per-replica", "0", *flags]
    with open(logs / f"router-{tag}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc, time.monotonic() + 60, f"router {tag}")
    return proc, url


def mps_env(run_dir: Path, enabled: bool) -> tuple[Any, dict[str, str], str]:
    """slicelm's MPS daemon (no thread cap, no memory limit: the broker bounds memory), if VMM works under it."""
    if not enabled:
        return None, {}, "off (--no-mps)"
    from slicelm.slicing.mps import MPSDaemon, mps_available
    from slicelm.slicing.spec import Slice

    if not mps_available():
        return None, {}, "unavailable: time slicing"
    daemon = MPSDaemon(0, run_dir / "mps")
    if not daemon.start().ok:
        return None, {}, "did not start: time slicing"
    env = daemon.client_env(Slice(device_index=0, device_uuid=None, memory_bytes=None, sm_percent=None,
                                  source="stack"))
    probe = ("import torch; from slicelm.engine.vmm import CudaVirtualRange; r = CudaVirtualRange(8 << 20, "
             "torch.device('cuda', 0)); r.map(0, r.granularity); t = r.tensor(0, (16,), torch.float32); t.fill_(1); "
             "assert float(t.sum()) == 16")
    ok = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True).returncode == 0
    if not ok:
        daemon.stop()
        return None, {}, "CUDA virtual memory failed under MPS: time slicing"
    return daemon, env, "slicelm's MPS daemon, no thread cap"


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(60)
        if p.poll() is None:
            p.kill()


def wait_idle(urls: dict[str, str], timeout: float = 60) -> None:
    """Until no server has a request running or waiting (cut requests are aborted by their disconnect)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        busy = 0.0
        for url in urls.values():
            with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
                        busy += float(line.rsplit(" ", 1)[1])
        if busy == 0:
            return
        time.sleep(0.2)


def _post(url: str) -> http.client.HTTPResponse:
    return urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=300)


def measure_wake(url: str, repeats: int) -> dict[str, Any]:
    """Level-1 sleep, then ``/wake_up``: the server's own figure and the client's round trip."""
    server, client = [], []
    for _ in range(repeats):
        _post(url + "/sleep?level=1").read()
        t0 = time.perf_counter()
        with _post(url + "/wake_up") as r:
            server.append(float(r.headers["x-slicelm-wake-seconds"]))
        client.append(time.perf_counter() - t0)
    return {"level": 1, "server_s": server, "client_s": client, "median_s": sorted(client)[len(client) // 2]}


def prewarm_sleep(urls: dict[str, str], exclude: str) -> None:
    """One level-1 sleep and wake of every engine, all at once: the pinned host buffer that keeps a sleeping
    engine's weights is allocated at its first sleep and kept, so that cost is not paid inside a window."""

    def cycle(url: str) -> None:
        for path in ("/sleep?level=1", "/wake_up"):
            _post(url + path).read()

    with ThreadPoolExecutor(len(urls)) as pool:
        list(pool.map(cycle, [u for m, u in urls.items() if m != exclude]))
