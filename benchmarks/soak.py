"""Soak: a real CPU stack (``slicelm up``: the router + SmolLM2 replicas) under steady load for N minutes.

1. saturation: a closed loop with every replica's ``max_num_seqs`` slots busy; completed requests/s after warm-up;
2. soak: Poisson arrivals at ``--load`` (0.8) x that rate for ``--minutes``, half of them streamed, through the
   router; every ``--interval`` s a sample of the RSS and open fds of the router, each API server and each engine
   core, each replica's KV blocks in use, requests done / failed and their latency, the machine's load average;
3. idle: once the last request ended, every replica must hold 0 KV blocks.

Judgement, "flat after warm-up": ``RULE`` below (also written into the result file).

    python benchmarks/soak.py [--minutes 30] [--replicas 2] [--load 0.8] [--interval 10] [--out FILE]

Writes benchmarks/results/soak_<device>.json (or ``--out``); exit code 0 when flat, 1 when not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, save_result

from slicelm.stack.procs import spawn, stop_group
from slicelm.stack.state import read_state

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
MAX_NUM_SEQS = 8
CLIENT_TIMEOUT_S = 600.0  # a request unanswered this long counts as failed (one takes seconds on an idle machine)
TOPICS = ["the sea", "a cat", "Paris", "rain", "a robot", "winter", "coffee", "mountains", "a library", "trains"]
WARMUP_FRACTION = 0.2
RSS_REL, RSS_FLOOR_MIB, FDS_LIMIT, KV_REL = 0.02, 8.0, 2.0, 0.10
RULE = ("The first fifth of the soak is warm-up and not judged. For each process's RSS and open fds, and each "
        "replica's KV blocks in use, the least-squares slope over the rest times its length (the drift) must stay "
        f"within a limit: RSS max({RSS_REL:.0%} of its median, {RSS_FLOOR_MIB:g} MiB), fds {FDS_LIMIT:g}, KV blocks "
        f"{KV_REL:.0%} of the replica's blocks. No request may fail, no replica restart (every sampled process "
        "lives throughout), and no KV block stay in use once the load has stopped.")
SHARED_NOTE = ("2 CPU cores shared with up to 8 concurrent development sessions (their tests and servers ran "
               "meanwhile): absolute rates are low and noisy; the load average is recorded with every sample")


# ------------------------------------------------------------------------------------------------ the stack
@dataclass
class Stack:
    run_dir: Path
    router_url: str
    pids: dict[str, int]  # "router", "server-0", "core-0", ...
    replica_urls: list[str]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_core_pid(server_pid: int) -> int:
    for child in psutil.Process(server_pid).children():
        if "spawn_main" in " ".join(child.cmdline()):
            return child.pid
    raise RuntimeError(f"slicelm serve {server_pid} has no engine-core child")


def start_stack(run_dir: Path, replicas: int) -> tuple[Stack, subprocess.Popen[bytes]]:
    """``slicelm up`` in the foreground, as a child that gets SIGTERM (and drains the stack) if this script dies."""
    spec = {"servingEngineSpec": {"modelSpec": [{
                "name": "chat", "modelURL": MODEL, "replicaCount": replicas,
                "vllmConfig": {"maxModelLen": 1024, "maxNumSeqs": MAX_NUM_SEQS, "enablePrefixCaching": True}}]},
            "routerSpec": {"routingLogic": "roundrobin", "containerPort": _free_port()},
            "slicelm": {"runDir": str(run_dir), "startupTimeout": 600}}
    path = run_dir / "stack.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    up = spawn([sys.executable, "-m", "slicelm.entrypoints.cli", "up", str(path)], _env(), run_dir / "up.log")
    state = None
    while state is None or state.get("phase") != "ready":
        if up.poll() is not None:
            raise RuntimeError(f"slicelm up exited with {up.returncode}:\n{(run_dir / 'up.log').read_text()[-3000:]}")
        time.sleep(1.0)
        state = read_state(run_dir)
    pids = {"router": state["router"]["pid"]}
    for i, rep in enumerate(state["replicas"]):
        pids[f"server-{i}"] = rep["pid"]
        pids[f"core-{i}"] = engine_core_pid(rep["pid"])
    return Stack(run_dir, state["router"]["url"], pids, [rep["url"] for rep in state["replicas"]]), up


def restarts(stack: Stack) -> int:
    return sum(r["restarts"] for r in read_state(stack.run_dir)["replicas"])


# ------------------------------------------------------------------------------------------------- the load
@dataclass
class Tally:
    done: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def fail(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def request_body(i: int, rng: random.Random) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": rng.randint(16, 48), "temperature": 0.7, "seed": i, "stream": i % 2 == 0}


async def one_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any], tally: Tally) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            data = await r.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        tally.fail(type(e).__name__)
        return
    if r.status != 200:
        tally.fail(f"http_{r.status}")
    elif body["stream"] and (b'"error"' in data or not data.rstrip().endswith(b"data: [DONE]")):
        tally.fail("stream_error")
    else:
        tally.done += 1
    tally.latencies.append(time.perf_counter() - t0)


async def closed_loop(session: aiohttp.ClientSession, url: str, concurrency: int, seconds: float,
                      tally: Tally) -> None:
    deadline = time.perf_counter() + seconds
    rng = random.Random(1)

    async def client(c: int) -> None:
        i = c
        while time.perf_counter() < deadline:
            await one_request(session, url, request_body(i, rng), tally)
            i += concurrency

    await asyncio.gather(*(client(c) for c in range(concurrency)))


async def open_loop(session: aiohttp.ClientSession, url: str, rate: float, seconds: float, tally: Tally) -> None:
    """Poisson arrivals at ``rate`` requests/s for ``seconds``; returns once the last one ended."""
    rng = random.Random(0)
    end = time.perf_counter() + seconds
    tasks: set[asyncio.Task[None]] = set()
    i = 0
    while (now := time.perf_counter()) < end:
        task = asyncio.create_task(one_request(session, url, request_body(i, rng), tally))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        await asyncio.sleep(min(rng.expovariate(rate), end - now))
    await asyncio.gather(*tasks)


# ---------------------------------------------------------------------------------------------- sampling
def kv_blocks_in_use(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=30).text
    usage = blocks = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:kv_cache_usage_perc{"):
            usage = float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:cache_config_info{"):
            blocks = float(line.split('num_gpu_blocks="')[1].split('"')[0])
    return round(usage * blocks)


def num_blocks(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=30).text
    line = next(x for x in text.splitlines() if x.startswith("vllm:cache_config_info{"))
    return int(line.split('num_gpu_blocks="')[1].split('"')[0])


def _process(pid: int) -> tuple[float | None, int | None]:
    """(RSS in MiB, open fds) of ``pid``, or Nones once it is gone (a restarted replica has a new pid)."""
    try:
        p = psutil.Process(pid)
        return round(p.memory_info().rss / 2**20, 1), p.num_fds()
    except psutil.NoSuchProcess:
        return None, None


def _kv(url: str) -> int | None:
    try:
        return kv_blocks_in_use(url)
    except httpx.HTTPError:
        return None


def sample(stack: Stack) -> dict[str, Any]:
    procs = {name: _process(pid) for name, pid in stack.pids.items()}
    return {"t": time.time(), "load_avg_1m": os.getloadavg()[0],
            "rss_mib": {n: rss for n, (rss, _) in procs.items()}, "fds": {n: fds for n, (_, fds) in procs.items()},
            "kv_blocks": {f"replica-{i}": _kv(u) for i, u in enumerate(stack.replica_urls)}}


async def sampler(stack: Stack, interval: float, tally: Tally, out: list[dict[str, Any]], stop: asyncio.Event) -> None:
    seen_done = seen_errors = seen_lat = 0
    while not stop.is_set():
        s = await asyncio.to_thread(sample, stack)
        lat = sorted(tally.latencies[seen_lat:])
        s.update(done=tally.done - seen_done, errors=tally.errors - seen_errors,
                 p50_s=round(lat[len(lat) // 2], 3) if lat else None,
                 p99_s=round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3) if lat else None)
        seen_done, seen_errors, seen_lat = tally.done, tally.errors, len(tally.latencies)
        out.append(s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


# --------------------------------------------------------------------------------------------- judgement
def drift(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``ts``, times the span of ``ts``: how much the series grew."""
    if len(ts) < 3:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0
    return slope * (ts[-1] - ts[0])


def judge_series(ts: list[float], ys: list[float | None], limit: float) -> dict[str, Any]:
    if any(y is None for y in ys):
        return {"drift": None, "limit": limit, "flat": False, "why": "the process or replica went away"}
    d = drift(ts, ys)  # type: ignore[arg-type]
    return {"drift": round(d, 2), "limit": round(limit, 2), "first": ys[0], "last": ys[-1],
            "median": statistics.median(ys), "flat": d <= limit}  # type: ignore[type-var]


def judge(samples: list[dict[str, Any]], blocks: dict[str, int], idle: dict[str, Any], errors: int,
          restarted: int) -> dict[str, Any]:
    start = samples[0]["t"] + WARMUP_FRACTION * (samples[-1]["t"] - samples[0]["t"])
    kept = [s for s in samples if s["t"] >= start]
    ts = [s["t"] for s in kept]
    series: dict[str, dict[str, Any]] = {}
    for name in kept[0]["rss_mib"]:
        ys = [s["rss_mib"][name] for s in kept]
        limit = max(RSS_REL * statistics.median(y or 0.0 for y in ys), RSS_FLOOR_MIB)
        series[f"rss_mib:{name}"] = judge_series(ts, ys, limit)
        series[f"fds:{name}"] = judge_series(ts, [s["fds"][name] for s in kept], FDS_LIMIT)
    for name, total in blocks.items():
        series[f"kv_blocks:{name}"] = judge_series(ts, [s["kv_blocks"][name] for s in kept], KV_REL * total)
    idle_kv = sum(v if v is not None else 1 for v in idle["kv_blocks"].values())
    flat = all(s["flat"] for s in series.values()) and errors == 0 and restarted == 0 and idle_kv == 0
    return {"rule": RULE, "warmup_s": round(start - samples[0]["t"], 1), "judged_samples": len(kept),
            "series": series, "errors": errors, "replica_restarts": restarted, "idle_kv_blocks": idle_kv,
            "flat": flat}


# -------------------------------------------------------------------------------------------------- main
async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        concurrency = args.replicas * MAX_NUM_SEQS
        await closed_loop(session, stack.router_url, concurrency, args.saturation_s / 4, Tally())  # warm-up
        sat = Tally()
        t0 = time.perf_counter()
        await closed_loop(session, stack.router_url, concurrency, args.saturation_s, sat)
        if sat.done == 0:
            raise SystemExit(f"saturation: no request completed ({sat.error_kinds or 'no errors'}); nothing to soak at")
        sat_rate = sat.done / (time.perf_counter() - t0)
        rate = args.load * sat_rate
        print(f"saturation {sat_rate:.2f} req/s ({concurrency} in flight); soaking at {rate:.2f} req/s "
              f"for {args.minutes:g} min", flush=True)
        tally, samples, stop = Tally(), [], asyncio.Event()
        sampling = asyncio.create_task(sampler(stack, args.interval, tally, samples, stop))
        await open_loop(session, stack.router_url, rate, args.minutes * 60, tally)
        stop.set()
        await sampling
    await asyncio.sleep(2.0)  # the last outputs reach the API servers, the engines free the last blocks
    idle = await asyncio.to_thread(sample, stack)
    lat = sorted(tally.latencies) or [0.0]
    return {"saturation": {"concurrency": concurrency, "seconds": args.saturation_s, "requests": sat.done,
                           "errors": sat.errors, "error_kinds": sat.error_kinds, "rate_rps": round(sat_rate, 3)},
            "soak": {"rate_rps": round(rate, 3), "minutes": args.minutes, "requests": tally.done,
                     "errors": tally.errors, "error_kinds": tally.error_kinds,
                     "p50_s": round(lat[len(lat) // 2], 3), "p99_s": round(lat[int(len(lat) * 0.99)], 3)},
            "samples": samples, "idle_after": idle}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--load", type=float, default=0.8, help="fraction of the measured saturation rate")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--saturation-s", type=float, default=60.0, help="seconds of the saturation measurement")
    p.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/soak_<device>.json)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="slicelm-soak-") as tmp:
        run_dir = Path(tmp)
        stack, up = start_stack(run_dir, args.replicas)
        try:
            blocks = {f"replica-{i}": num_blocks(u) for i, u in enumerate(stack.replica_urls)}
            idle_before = sample(stack)
            measured = asyncio.run(measure(stack, args))
            restarted = restarts(stack)
        finally:
            stop_group(up, 60.0)  # SIGTERM: the supervisor drains and stops the router and every replica
    result = {**environment(), "benchmark": "soak", "machine_note": SHARED_NOTE,
              "workload": {"model": MODEL, "replicas": args.replicas, "max_num_seqs": MAX_NUM_SEQS,
                           "max_model_len": 1024, "routing": "roundrobin", "route": "/v1/chat/completions",
                           "max_tokens": "uniform 16..48", "streamed": "every other request", "load": args.load,
                           "arrivals": "Poisson", "interval_s": args.interval},
              "kv_blocks_total": blocks, "idle_before": idle_before, **measured}
    loads = [s["load_avg_1m"] for s in result["samples"]]
    result["load_avg_1m"] = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
    result["judgement"] = judge(result["samples"], blocks, result["idle_after"], result["soak"]["errors"],
                                restarted)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {args.out}")
    else:
        save_result("soak", result)
    verdict = result["judgement"]
    print(json.dumps({k: verdict[k] for k in ("flat", "errors", "replica_restarts", "idle_kv_blocks")}))
    for name, s in verdict["series"].items():
        print(f"  {name}: drift {s['drift']} (limit {s['limit']}) {'flat' if s['flat'] else 'GROWING'}")
    return 0 if verdict["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
