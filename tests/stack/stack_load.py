"""Chat load through a stack's router while one replica's engine core is SIGKILLed, and what the router's log says
happened to each request (test_stack_cpu.py asserts on both)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import psutil

from slicelm.stack.state import read_state

HEALTH_INTERVAL_S = 2.0  # the router's default --health-check-interval (the stack file sets none)
LOAD_TIMEOUT_S = 180.0  # a request still open after this long hangs (each takes ~1 s on 2 idle cores)
STUCK_S = 60.0  # a request open this long: every process of the stack dumps its threads' stacks to its log
WORKERS = 4
RESTART_TIMEOUT_S = 600.0  # noticing the death takes ~1 s; the rest is loading the model again
MODEL = "smollm2-135m-instruct"
_ROUTED = re.compile(r"Routing request (\S+) with session id \S+ to (\S+) at ([\d.]+),")
_FAILOVER = re.compile(r"^\[([^\]]+)\] WARNING: Failover of request (\S+) to (\S+) ")
_STAMP = re.compile(r"^\[([^\]]+)\] ")


@dataclass
class Outcome:
    rid: str
    stream: bool
    start: float
    end: float
    ok: bool
    error: str | None  # the error event or body a failed request got, or the client's exception


@dataclass
class LoadRun:
    outcomes: list[Outcome]
    killed_at: float


def engine_core_pid(server_pid: int) -> int:
    """The engine-core process ``slicelm serve`` spawned (multiprocessing spawn)."""
    for child in psutil.Process(server_pid).children():
        if "spawn_main" in " ".join(child.cmdline()):
            return child.pid
    raise AssertionError(f"slicelm serve {server_pid} has no engine-core child")


def running(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running{"))


async def one_request(client: httpx.AsyncClient, url: str, rid: str, stream: bool) -> Outcome:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me a story ({rid})."}],
            "max_tokens": 8, "ignore_eos": True, "stream": stream}
    start, ok, error = time.time(), False, None
    try:
        async with asyncio.timeout(LOAD_TIMEOUT_S):
            ok, error = await _send(client, url, rid, body)
    except TimeoutError:
        error = f"no answer in {LOAD_TIMEOUT_S:g} s"
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    return Outcome(rid, stream, start, time.time(), ok, error)


async def _send(client: httpx.AsyncClient, url: str, rid: str, body: dict) -> tuple[bool, str | None]:
    if body["stream"]:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers={"X-Request-Id": rid}) as r:
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        error = next((e for e in events if '"error"' in e), None if r.status_code == 200 else str(events))
        return error is None and events[-1:] == ["data: [DONE]"], error
    r = await client.post(url + "/v1/chat/completions", json=body, headers={"X-Request-Id": rid})
    return r.status_code == 200, None if r.status_code == 200 else r.text


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.2)


def _replica(run_dir: Path, model: str, replica: int) -> dict:
    return next(r for r in read_state(run_dir)["replicas"] if r["model"] == model and r["replica"] == replica)


def dump_stacks(run_dir: Path) -> None:
    """SIGUSR1 to the router, every replica's server and its engine core: each writes every thread's Python stack
    to its log (``faulthandler``), so a stuck request can be read there."""
    st = read_state(run_dir)
    pids = [r["pid"] for r in st["replicas"] if r["pid"]] + ([st["router"]["pid"]] if st.get("router") else [])
    for pid in pids:
        try:  # the server (or router) and its engine core; never multiprocessing's resource tracker (no handler)
            procs = [pid, *(c.pid for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline()))]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGUSR1)


def stuck_report(run_dir: Path, rids: list[str], lines: int = 150) -> str:
    """The router's lines about ``rids``, and from each chat replica's and the router's log the stacks they dumped
    (or the log's end when none was dumped)."""
    logs = run_dir / "logs"
    router = [ln for ln in (logs / "router.log").read_text().splitlines() if any(f" {r} " in ln for r in rids)]
    parts = ["router:", *router]
    for log in [*sorted(logs.glob("chat-*.log")), logs / "router.log"]:
        text = log.read_text(errors="replace").splitlines()
        first = next((i for i, ln in enumerate(text) if ln.startswith(("Thread 0x", "Current thread"))), None)
        part = text[max(0, first - 3): first + lines] if first is not None else text[-lines:]
        parts += [f"--- {log.name}" + (" (stacks)" if first is not None else " (end)"), *part]
    return "\n".join(parts)


async def _load_and_kill(router_url: str, other_url: str, victim: dict, run_dir: Path) -> LoadRun:
    stop, outcomes = asyncio.Event(), []
    open_since: dict[str, float] = {}

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        i = 0
        while not stop.is_set():
            rid = f"w{w}-{i}"
            open_since[rid] = time.time()
            outcomes.append(await one_request(client, router_url, rid, stream=i % 3 != 2))
            del open_since[rid]
            i += 1

    async def watchdog() -> None:
        while not any(time.time() - t > STUCK_S for t in list(open_since.values())):
            await asyncio.sleep(1.0)
        await asyncio.to_thread(dump_stacks, run_dir)

    def restarted() -> bool:
        r = _replica(run_dir, victim["model"], victim["replica"])
        return r["restarts"] == 1 and r["state"] == "ready"

    async with httpx.AsyncClient(timeout=None) as client:
        tasks = [asyncio.create_task(worker(w, client)) for w in range(WORKERS)]
        tasks.append(asyncio.create_task(watchdog()))
        try:
            await _until(lambda: running(victim["url"]) > 0 and running(other_url) > 0, 120,
                         "load on both replicas")
            core = engine_core_pid(victim["pid"])
            killed_at = time.time()
            os.kill(core, signal.SIGKILL)
            await _until(restarted, RESTART_TIMEOUT_S, "the supervisor to restart the replica")
            await asyncio.sleep(2 * HEALTH_INTERVAL_S)  # the router takes it back; traffic reaches it again
            stop.set()
            await asyncio.gather(*tasks[:WORKERS])
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return LoadRun(outcomes, killed_at)


def run_load_and_kill_core(router_url: str, other_url: str, victim: dict, run_dir: Path) -> LoadRun:
    """``WORKERS`` clients send chat requests (2 of 3 streamed) through the router; once both replicas run some,
    the victim replica's engine core is SIGKILLed; the load goes on until the supervisor has restarted it."""
    return asyncio.run(_load_and_kill(router_url, other_url, victim, run_dir))


def _stamp(line: str) -> float:
    m = _STAMP.match(line)
    assert m, line
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def router_events(log: Path, url: str) -> tuple[dict[str, list[tuple[str, float]]], float, float]:
    """From the router's log: each request's hops ``[(replica url, time)]``; when the router stopped sending to
    ``url`` (ejected by a probe or a failed request, or removed by the stack's discovery when the supervisor saw it
    die) and when it took it back."""
    routed: dict[str, list[tuple[str, float]]] = {}
    gone_at = back_at = 0.0
    for line in log.read_text().splitlines():
        if m := _ROUTED.search(line):
            routed.setdefault(m.group(1), []).append((m.group(2), float(m.group(3))))
        elif m := _FAILOVER.match(line):
            routed.setdefault(m.group(2), []).append((m.group(3), _stamp(line)))
        elif f"Ejected backend {url}:" in line or f"Removed backend {url} (" in line:
            gone_at = gone_at or _stamp(line)
        elif gone_at and (f"Re-admitted backend {url} " in line or f"Added backend {url} " in line):
            back_at = back_at or _stamp(line)
    assert gone_at and back_at, f"the router never stopped sending to {url} and took it back"
    return routed, gone_at, back_at
