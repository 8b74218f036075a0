"""Backpressure (bounded waiting queue -> fast 503) and SIGTERM draining, each on its own small server."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, start_server, stop_server

pytestmark = pytest.mark.slow


async def _stream(client: httpx.AsyncClient, body: dict) -> tuple[int, float, str | None, int]:
    """(status, seconds to the status line, finish_reason, chunks)."""
    t0 = time.time()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        dt = time.time() - t0
        if r.status_code != 200:
            await r.aread()
            assert r.headers.get("retry-after") and r.json()["error"]["message"]
            return r.status_code, dt, None, 0
        finish, chunks = None, 0
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunks += 1
                finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        return 200, dt, finish, chunks


def test_overload_excess_gets_503_fast(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-num-seqs", "2", "--max-waiting-requests", "2", "--max-model-len", "512")
    try:
        body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 12, "ignore_eos": True,
                "stream": True}

        async def main() -> list[tuple[int, float, str | None, int]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         limits=httpx.Limits(max_connections=100)) as client:
                return list(await asyncio.wait_for(asyncio.gather(*(_stream(client, body) for _ in range(40))),
                                                   timeout=120))

        results = asyncio.run(main())
        accepted = [r for r in results if r[0] == 200]
        rejected = [r for r in results if r[0] != 200]
        assert all(r[0] == 503 for r in rejected)
        assert len(rejected) >= 20 and len(accepted) >= 4, (len(accepted), len(rejected))
        assert max(r[1] for r in rejected) < 3.0
        assert all(r[2] == "length" and r[3] == 12 for r in accepted)
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        stop_server(server)


def test_sigterm_drains_then_aborts_and_exits_0(tmp_path: Path) -> None:
    # a grace period the 8-token request finishes in even on a loaded 2-core machine; the 1900-token one cannot
    server = start_server(tmp_path, "--max-model-len", "2048", "--shutdown-timeout", "10")
    try:
        short = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "stream": True}
        long = {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 1900, "ignore_eos": True, "stream": True}
        results: dict[str, tuple[int, float, str | None, int]] = {}

        async def run(name: str, body: dict) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                results[name] = await _stream(client, body)

        threads = [threading.Thread(target=lambda n=n, b=b: asyncio.run(run(n, b)))
                   for n, b in (("short", short), ("long", long))]
        for t in threads:
            t.start()
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(server.url + "/v1/completions", json={**short, "stream": False}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        for t in threads:
            t.join(60)
        assert results["short"][0] == 200 and results["short"][2] == "length"
        assert results["long"][0] == 200 and results["long"][2] == "abort"
        assert server.proc.wait(30) == 0, server.log()
    finally:
        stop_server(server)
