"""Router benchmarks (CPU is fine; a few minutes on 2 cores).

1. overhead: latency through ``slicelm router`` vs straight to a fast fake backend, one request at a time
   (the router's own cost) and at saturation (closed loop, many in flight); p50/p99 added latency.
2. prefix: prefix-aware vs roundrobin on a multi-turn chat workload against 2 real SmolLM2 replicas (restarted
   per logic); prefix-cache hit rate and TTFT read from the replicas' ``/metrics``, plus the client's TTFT.

    python benchmarks/router.py [--part overhead|prefix|all] [--requests 3000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, save_result

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "router" / "fake_backend.py"
SMOLLM = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list[str], url: str, log: Path, timeout: float = 300) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} not healthy in {timeout} s")


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        p.kill()
        p.wait(30)


def router_cmd(port: int, backends: list[str], models: list[str], *flags: str) -> list[str]:
    return [sys.executable, "-m", "slicelm.entrypoints.cli", "router", "--host", "127.0.0.1", "--port", str(port),
            "--static-backends", ",".join(backends), "--static-models", ",".join(models), "--log-level", "warning",
            *flags]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def closed_loop(url: str, n: int, concurrency: int) -> tuple[list[float], float]:
    body = b'{"model": "fake", "prompt": "hello", "max_tokens": 1}'
    lat: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def worker(count: int) -> None:
            for _ in range(count):
                t = time.perf_counter()
                async with s.post(url + "/v1/completions", data=body,
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200, r.status
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*(worker(max(1, n // concurrency // 10)) for _ in range(concurrency)))  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
        return lat, time.perf_counter() - t0


def overhead_case(tmp: Path, delay: float, requests: int, concurrency: int) -> dict[str, Any]:
    bport, rport = free_port(), free_port()
    burl, rurl = f"http://127.0.0.1:{bport}", f"http://127.0.0.1:{rport}"
    backend = spawn([sys.executable, str(FAKE), "--port", str(bport), "--model", "fake", "--delay", str(delay)],
                    burl, tmp / f"fake-{bport}.log")
    router = spawn(router_cmd(rport, [burl], ["fake"], "--max-inflight-per-replica", "0"), rurl,
                   tmp / f"router-{rport}.log")
    row: dict[str, Any] = {"backend_delay_s": delay, "concurrency": concurrency, "requests": requests}
    try:
        for target, url in (("direct", burl), ("router", rurl)):
            lat, wall = asyncio.run(closed_loop(url, requests, concurrency))
            row[target] = {"p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
                           "throughput_rps": len(lat) / wall}
    finally:
        stop(router, backend)
    row["added_p50_ms"] = row["router"]["p50_ms"] - row["direct"]["p50_ms"]
    row["added_p99_ms"] = row["router"]["p99_ms"] - row["direct"]["p99_ms"]
    return row


def overhead(tmp: Path, requests: int, concurrency: int) -> dict[str, Any]:
    """``sequential``: one request at a time to an instant backend (the router's own per-request cost).
    ``backend_saturated``: ``concurrency`` in flight against a backend that takes 50 ms each (a replica whose
    slots are all busy). ``router_bound``: ``concurrency`` in flight against an instant backend: the router is the
    bottleneck (its throughput ceiling on this machine; latency there is queueing, not per-request cost)."""
    out = {}
    for label, delay, n, conc in (("sequential", 0.0, requests // 3, 1),
                                  ("backend_saturated", 0.05, requests // 2, concurrency // 2),
                                  ("router_bound", 0.0, requests, concurrency)):
        out[label] = overhead_case(tmp, delay, n, conc)
        print(label, {k: round(v, 3) for k, v in out[label].items() if k.startswith("added")},
              "router rps", round(out[label]["router"]["throughput_rps"]))
    return out


def scrape(url: str) -> dict[str, float]:
    vals: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                          "vllm:request_success_total", "vllm:time_to_first_token_seconds_sum",
                          "vllm:time_to_first_token_seconds_count"):
                vals[s.name] = vals.get(s.name, 0.0) + s.value
    return vals


def conversations(users: int, turns: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    words = ["river", "mountain", "engine", "garden", "signal", "copper", "lantern", "harbor", "meadow", "quartz"]
    return [[" ".join(rng.choice(words) for _ in range(60)) + f" (user {u}, turn {t})?" for t in range(turns)]
            for u in range(users)]


async def chat_user(router: str, system: str, questions: list[str], ttfts: list[float]) -> None:
    messages = [{"role": "system", "content": system}]
    async with httpx.AsyncClient(timeout=300) as c:
        for q in questions:
            messages.append({"role": "user", "content": q})
            t = time.perf_counter()
            first = None
            text = []
            async with c.stream("POST", router + "/v1/chat/completions", json={
                    "model": SMOLLM, "messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        first = first or time.perf_counter()
                        ch = json.loads(line[6:])
                        if ch.get("choices"):
                            text.append(ch["choices"][0]["delta"].get("content") or "")
            ttfts.append((first or time.perf_counter()) - t)
            messages.append({"role": "assistant", "content": "".join(text)})


def prefix_run(tmp: Path, logic: str, users: int, turns: int) -> dict[str, Any]:
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    serve = [spawn([sys.executable, "-m", "slicelm.entrypoints.cli", "serve", SMOLLM, "--host", "127.0.0.1",
                    "--port", str(p), "--device", "cpu", "--disable-access-log", "--max-num-seqs", "8",
                    "--max-model-len", "4096", "--seed", "0"], u, tmp / f"serve-{logic}-{p}.log")
             for p, u in zip(ports, urls)]
    rport = free_port()
    rurl = f"http://127.0.0.1:{rport}"
    router = spawn(router_cmd(rport, urls, [SMOLLM, SMOLLM], "--routing-logic", logic, "--engine-stats-interval",
                              "5"), rurl, tmp / f"router-{logic}.log")
    try:
        for u in urls:  # warm-up outside the measurement
            for _ in range(2):
                httpx.post(u + "/v1/chat/completions", timeout=300, json={
                    "model": SMOLLM, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})
        before = [scrape(u) for u in urls]
        system = "You are a terse assistant. " * 20
        ttfts: list[float] = []
        t0 = time.perf_counter()

        async def run() -> None:
            await asyncio.gather(*(chat_user(rurl, system, qs, ttfts) for qs in conversations(users, turns, 1)))

        asyncio.run(run())
        wall = time.perf_counter() - t0
        after = [scrape(u) for u in urls]
    finally:
        stop(router, *serve)

    def delta(name: str) -> float:
        return sum(a.get(name, 0) - b.get(name, 0) for a, b in zip(after, before))

    hits, queries = delta("vllm:prefix_cache_hits_total"), delta("vllm:prefix_cache_queries_total")
    count = delta("vllm:time_to_first_token_seconds_count")
    return {"prefix_cache_hit_rate": hits / queries if queries else 0.0, "prefix_cache_hits": hits,
            "prefix_cache_queries": queries,
            "server_ttft_mean_s": delta("vllm:time_to_first_token_seconds_sum") / count if count else None,
            "client_ttft_p50_s": pct(ttfts, 0.5), "client_ttft_p90_s": pct(ttfts, 0.9), "wall_s": wall,
            "requests": len(ttfts),
            "requests_per_replica": [a.get("vllm:request_success_total", 0) - b.get("vllm:request_success_total", 0)
                                     for a, b in zip(after, before)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("overhead", "prefix", "all"), default="all")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    args = p.parse_args()
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="router-bench-"))
    result: dict[str, Any] = {**environment(), "benchmark": "router"}
    if args.part in ("overhead", "all"):
        result["overhead"] = {"workload": {"backend": "fake (aiohttp, answers at once)", "route": "/v1/completions",
                                           "client": "aiohttp closed loop"},
                              **overhead(tmp, args.requests, args.concurrency)}
    if args.part in ("prefix", "all"):
        result["prefix"] = {"workload": {"replicas": f"2 x slicelm serve {SMOLLM} (CPU)", "users": args.users,
                                         "turns": args.turns, "max_tokens": 16,
                                         "prompt": "shared ~120-token system prompt + ~80 tokens per user turn"}}
        for logic in ("roundrobin", "prefixaware"):
            result["prefix"][logic] = prefix_run(tmp, logic, args.users, args.turns)
            print(logic, result["prefix"][logic])
    save_result("router", result)


if __name__ == "__main__":
    main()
