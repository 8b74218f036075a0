"""Faults staged with fake backends in subprocesses: a replica killed under load, one stalled with SIGSTOP, a
backend dying mid-stream, 2,000 concurrent streams, and the queue at 5x its capacity."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import httpx
import pytest
from router_helpers import Proc, engines, restart, scrape, start_fake, start_router, wait_for

from slicelm.router.limits import raise_open_files_limit

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


def _open_files(pid: int) -> tuple[int, int]:
    """(open file descriptors, soft RLIMIT_NOFILE) of process ``pid``."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    soft = next(line.split()[3] for line in limits.splitlines() if line.startswith("Max open files"))
    return len(os.listdir(f"/proc/{pid}/fd")), int(soft)


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def test_router_holds_2000_concurrent_streams(tmp_path: Path, procs: list[Proc]) -> None:
    """2,000 SSE streams open through the router at once (production-stack #448 crashed past 1k): each fake backend
    holds its streams after their first chunk until it has 1,000 open, so every stream is open together; the router
    keeps answering /health meanwhile and every stream ends with all its chunks."""
    n, per = 2000, 1000
    fakes = [start_fake(tmp_path, "--chunks", "3", "--chunk-interval", "3", "--hold-until-running", str(per))
             for _ in range(2)]
    router = start_router(tmp_path, [f.url for f in fakes], ["fake", "fake"], "--routing-logic", "roundrobin",
                          "--max-inflight-per-replica", str(per))
    procs += [*fakes, router]
    raise_open_files_limit()  # this client holds 2,000 sockets too
    first_events = 0
    all_open = asyncio.Event()

    async def stream(s: aiohttp.ClientSession, i: int) -> list[bytes]:
        nonlocal first_events
        await asyncio.sleep(i * 0.004)  # opened over 8 s (a burst in one tick measures a starved loop instead)
        async with s.post(router.url + "/v1/chat/completions", json={"model": "fake", "stream": True}) as r:
            assert r.status == 200, await r.text()
            events = []
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(line.strip())
                    if len(events) == 1:
                        first_events += 1
                        if first_events == n:
                            all_open.set()
            return events

    async def observe() -> tuple[int, float, float]:
        await asyncio.wait_for(all_open.wait(), 180)
        fds, _ = _open_files(router.proc.pid)
        t = time.perf_counter()
        async with httpx.AsyncClient() as c:
            assert (await c.get(router.url + "/health", timeout=5)).status_code == 200
        return fds, time.perf_counter() - t, _rss_mib(router.proc.pid)

    async def run() -> tuple[list[list[bytes]], tuple[int, float, float]]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as s:
            seen = asyncio.create_task(observe())
            results = await asyncio.gather(*(stream(s, i) for i in range(n)))
            return results, await seen

    results, (fds, health_s, rss) = asyncio.run(run())
    assert all(len(e) == 4 and e[-1] == b"data: [DONE]" and b'"error"' not in b"".join(e) for e in results)
    peaks = [scrape(f.url, "fake_peak_running")["fake_peak_running"] for f in fakes]
    assert peaks == [per, per]
    assert fds >= 2 * n, fds  # a client socket and a backend socket per stream, all open together
    assert _open_files(router.proc.pid)[1] > 2 * n + 100  # the router raised its soft open-files limit
    assert health_s < 2.0 and rss < 1024, (health_s, rss)
    assert "Traceback" not in router.log() and "Error" not in router.log()


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
