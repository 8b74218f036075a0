"""Faults staged with fake backends in subprocesses: a replica killed under load, one stalled with SIGSTOP, a
backend dying mid-stream, 500 concurrent streams, and the queue at 5x its capacity."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from router_helpers import Proc, engines, restart, start_fake, start_router, wait_for

pytestmark = pytest.mark.slow

FAST_HEALTH = ("--health-check-interval", "0.3", "--health-check-timeout", "1", "--health-failure-threshold", "1")


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float, httpx.Response]:
    t = time.perf_counter()
    r = await client.post(url, json=body)
    return r.status_code, time.perf_counter() - t, r


def test_killed_replica_loses_no_request_and_is_readmitted(tmp_path: Path, procs: list[Proc]) -> None:
    a = start_fake(tmp_path, "--delay", "0.2")
    b = start_fake(tmp_path, "--delay", "0.2")
    router = start_router(tmp_path, [a.url, b.url], ["fake", "fake"], *FAST_HEALTH)
    procs += [a, b, router]

    async def load() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as c:
            tasks = []
            for i in range(120):
                tasks.append(asyncio.create_task(_post(c, router.url + "/v1/completions",
                                                       {"model": "fake", "prompt": f"p{i}"})))
                if i == 40:
                    os.kill(a.proc.pid, signal.SIGKILL)  # with requests in flight on it
                await asyncio.sleep(0.01)
            return [s for s, _, _ in await asyncio.gather(*tasks)]

    statuses = asyncio.run(load())
    assert statuses.count(200) == 120, statuses  # non-streamed: none had started, so none fails
    wait_for(lambda: not engines(router)[a.url]["healthy"], 5, "the killed replica to be ejected")
    a2 = restart(a)
    procs.append(a2)
    wait_for(lambda: engines(router)[a.url]["healthy"], 10, "the restarted replica to be re-admitted")
    ports = {httpx.post(router.url + "/v1/completions", json={"model": "fake", "prompt": "x"}).json()["port"]
             for _ in range(4)}
    assert a.port in ports
    log = router.log()
    assert "Ejected backend " + a.url in log and "Re-admitted backend " + a.url in log
    assert "Failover of request" in log  # requests that were in flight on the killed replica were retried


def test_stalled_replica_times_out_and_reroutes(tmp_path: Path, procs: list[Proc]) -> None:
    a = start_fake(tmp_path, "--delay", "0.05")
    b = start_fake(tmp_path, "--delay", "0.05")
    timeout = 2.0
    router = start_router(tmp_path, [a.url, b.url], ["fake", "fake"], "--first-byte-timeout", str(timeout),
                          "--health-check-interval", "5", "--health-check-timeout", "1",
                          "--health-failure-threshold", "1")
    procs += [a, b, router]
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        async def load() -> list[tuple[int, float, httpx.Response]]:
            async with httpx.AsyncClient(timeout=30) as c:
                return await asyncio.gather(*(_post(c, router.url + "/v1/completions",
                                                    {"model": "fake", "prompt": f"p{i}"}) for i in range(20)))

        results = asyncio.run(load())
        assert [s for s, _, _ in results] == [200] * 20
        assert all(r.json()["port"] == b.port for _, _, r in results)
        assert max(t for _, t, _ in results) < timeout + 1.5  # none waits much beyond the first-byte timeout
        wait_for(lambda: not engines(router)[a.url]["healthy"], 5, "the stalled replica to be ejected")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    wait_for(lambda: engines(router)[a.url]["healthy"], 10, "the resumed replica to be re-admitted")
    assert "Failover of request" in router.log()


def test_backend_dying_mid_stream_ends_it_with_an_error_event(tmp_path: Path, procs: list[Proc]) -> None:
    a = start_fake(tmp_path, "--chunks", "10", "--chunk-interval", "0.05", "--die-after-chunks", "3")
    router = start_router(tmp_path, [a.url], ["fake"])
    procs += [a, router]
    t = time.perf_counter()
    with httpx.stream("POST", router.url + "/v1/chat/completions", timeout=20,
                      json={"model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert time.perf_counter() - t < 5
    assert len(events) == 5 and events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "backend_failed" in events[-2]
    # a known model whose only replica is gone: 503 in OpenAI's error shape
    wait_for(lambda: not engines(router)[a.url]["healthy"], 10, "the dead replica to be ejected")
    r2 = httpx.post(router.url + "/v1/chat/completions", json={"model": "fake", "messages": []})
    assert r2.status_code == 503 and r2.json()["error"]["code"] == "no_live_replica"


def test_500_concurrent_streams_are_not_capped(tmp_path: Path, procs: list[Proc]) -> None:
    a = start_fake(tmp_path, "--chunks", "3", "--chunk-interval", "1.0")
    b = start_fake(tmp_path, "--chunks", "3", "--chunk-interval", "1.0")
    router = start_router(tmp_path, [a.url, b.url], ["fake", "fake"])
    procs += [a, b, router]

    async def stream(c: httpx.AsyncClient, i: int) -> bool:
        async with c.stream("POST", router.url + "/v1/chat/completions",
                            json={"model": "fake", "stream": True, "messages": []}) as r:
            lines = [x async for x in r.aiter_lines() if x.startswith("data: ")]
        return r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) == 4

    async def run() -> list[bool]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            return await asyncio.gather(*(stream(c, i) for i in range(500)))

    t = time.perf_counter()
    ok = asyncio.run(run())
    wall = time.perf_counter() - t
    assert all(ok)

    def peak(p: Proc) -> float:
        text = httpx.get(p.url + "/metrics").text
        return float(next(x.split()[-1] for x in text.splitlines() if x.startswith("fake_peak_running")))

    assert peak(a) + peak(b) >= 450, (peak(a), peak(b))  # (nearly) all 500 streams were open at once
    assert wall < 25


def test_queue_at_five_times_capacity_waits_or_429s(tmp_path: Path, procs: list[Proc]) -> None:
    a = start_fake(tmp_path, "--delay", "0.5")
    b = start_fake(tmp_path, "--delay", "0.5")
    router = start_router(tmp_path, [a.url, b.url], ["fake", "fake"], "--max-inflight-per-replica", "2",
                          "--max-queue-size", "6", "--queue-timeout", "20")
    procs += [a, b, router]

    async def run() -> list[tuple[int, float, httpx.Response]]:
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(*(_post(c, router.url + "/v1/completions", {"model": "fake", "prompt": "p"})
                                          for _ in range(20)))  # capacity 4: 5x

    results = asyncio.run(run())
    statuses = sorted(s for s, _, _ in results)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 10  # 4 running + 6 queued at least
    for s, _, r in results:
        if s == 429:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
    served = sorted(t for s, t, _ in results if s == 200)
    assert served[-1] > 1.0  # the queued ones waited for a slot (3 waves of 0.5 s)


def test_queue_honours_priority(tmp_path: Path, procs: list[Proc]) -> None:
    a = start_fake(tmp_path, "--delay", "0.6")
    router = start_router(tmp_path, [a.url], ["fake"], "--max-inflight-per-replica", "1")
    procs += [a, router]

    async def run() -> dict[int, int]:
        async with httpx.AsyncClient(timeout=30) as c:
            first = asyncio.create_task(_post(c, router.url + "/v1/completions", {"model": "fake", "prompt": "x"}))
            await asyncio.sleep(0.2)
            tasks = {}
            for prio in (5, 0, 3):
                tasks[prio] = asyncio.create_task(_post(c, router.url + "/v1/completions",
                                                        {"model": "fake", "prompt": "x", "priority": prio}))
                await asyncio.sleep(0.05)
            await first
            return {p: (await t)[2].json()["seq"] for p, t in tasks.items()}

    seq = asyncio.run(run())
    assert seq[0] < seq[3] < seq[5], seq
