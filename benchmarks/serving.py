"""Workload C: online serving. Workload A's requests streamed to ``/v1/completions`` as a Poisson process.

    python benchmarks/serving.py                                   # Qwen3-0.6B shape, random weights, GPU
    python benchmarks/serving.py --model smollm2-135m-instruct --device cpu --num-requests 8 \\
        --max-prompt-tokens 64 --max-output-tokens 16 --rates 1,inf   # a quick look on a CPU
    python benchmarks/serving.py --base-url http://host:8000 --model NAME   # an already running server

Launches ``slicelm serve`` in its own process (unless ``--base-url``), sends the requests (token-id
prompts, ``ignore_eos``, exactly the workload's output lengths, greedy) at each rate, and reports TTFT,
TPOT, ITL and e2e p50/p90/p99, throughput, and the first rate at which p99 TTFT exceeds twice its
low-load value. Results go to ``benchmarks/results/serving_<device>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, environment, save_result, workload_a, write_config_dir


@dataclass
class Record:
    ok: bool = False
    status: int = 0
    start: float = 0.0
    first: float | None = None
    end: float = 0.0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float | None]:
    return {"mean": sum(values) / len(values) if values else None, "p50": pct(values, 50), "p90": pct(values, 90),
            "p99": pct(values, 99)}


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
                      max_tokens: int) -> Record:
    rec = Record(start=time.perf_counter())
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with session.post(url, json=body) as r:
            rec.status = r.status
            if r.status != 200:
                await r.read()
                rec.end = time.perf_counter()
                return rec
            async for raw in r.content:  # one SSE line at a time
                if not raw.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(raw[6:])
                if chunk.get("choices"):
                    rec.first = rec.first or now
                    rec.chunk_times.append(now)
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
        rec.end = time.perf_counter()
        rec.ok = rec.first is not None and rec.output_tokens == max_tokens
    except aiohttp.ClientError:
        rec.end = time.perf_counter()
    return rec


async def run_rate(base_url: str, model: str, reqs: list[tuple[list[int], int]], rate: float,
                   seed: int) -> dict[str, Any]:
    """Sends ``reqs`` at ``rate`` (Poisson; inf = all at once) from one aiohttp session (as vLLM's
    benchmark client: httpx's pool costs O(connections) per event and saturated the client here)."""
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=3600)
    url = base_url.rstrip("/") + "/v1/completions"
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=2**18) as session:
        tasks = []
        t0 = time.perf_counter()
        for prompt, out_len in reqs:
            tasks.append(asyncio.create_task(one_request(session, url, model, prompt, out_len)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
    elapsed = max(r.end for r in records) - t0
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(len(p) for (p, _), r in zip(reqs, records) if r.ok)
    ttft = [r.first - r.start for r in ok if r.first is not None]
    tpot = [(r.end - r.first) / (r.output_tokens - 1) for r in ok if r.first is not None and r.output_tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    return {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "completed": len(ok), "failed": len(records) - len(ok),
        "failed_statuses": sorted({r.status for r in records if not r.ok}),
        "elapsed_s": elapsed, "request_throughput": len(ok) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (out_tokens + prompt_tokens) / elapsed,
        "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
        "ttft_s": summary(ttft), "tpot_s": summary(tpot), "itl_s": summary(itl),
        "e2e_s": summary([r.end - r.start for r in ok]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, model_path: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "slicelm.entrypoints.cli", "serve", model_path, "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", args.model, "--max-model-len", str(args.max_model_len),
           "--max-num-seqs", str(args.max_num_seqs), "--disable-access-log", "--uvicorn-log-level", "warning",
           "--max-waiting-requests", str(max(4 * args.max_num_seqs, args.num_requests)),
           "--engine-process", *extra]  # the engine core in its own process (the default, said explicitly)
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become healthy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b",
                    help="a shape name (random weights) or any model slicelm serve accepts")
    ap.add_argument("--base-url", default=None, help="use a running server instead of launching one")
    ap.add_argument("--device", default=None)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="truncate workload prompts (CPU runs)")
    ap.add_argument("--max-output-tokens", type=int, default=None, help="cap workload outputs (CPU runs)")
    ap.add_argument("--rates", default="2,4,8,16,32,inf", help="requests/s, comma separated; inf = all at once")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--server-args", default="", help="extra flags for slicelm serve")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="serving")
    args = ap.parse_args()

    reqs = [(p[: args.max_prompt_tokens] if args.max_prompt_tokens else p,
             min(o, args.max_output_tokens) if args.max_output_tokens else o)
            for p, o in workload_a(args.num_requests)]
    rates = [float(r) for r in args.rates.split(",")]
    env = environment()
    proc = None
    with tempfile.TemporaryDirectory() as root:
        url = args.base_url
        if url is None:
            extra = args.server_args.split()
            if args.model in SHAPES:
                model_path = write_config_dir(args.model, root)
                extra += ["--load-format", "dummy", "--skip-tokenizer-init"]
            else:
                model_path = args.model
            proc, url = launch(args, model_path, extra)
        try:
            asyncio.run(run_rate(url, args.model, reqs[:2], math.inf, args.seed))  # warm-up
            runs = []
            for k, rate in enumerate(rates):
                # Each rate gets prompts of its own (same lengths), so that no rate rides on the prefix
                # cache warmed by the one before it.
                shifted = [([(t + 7919 * k) % 10000 for t in p], o) for p, o in reqs]
                res = asyncio.run(run_rate(url, args.model, shifted, rate, args.seed))
                runs.append(res)
                print(json.dumps({k: res[k] for k in ("request_rate", "completed", "failed", "output_tokens_per_s")}
                                 | {"ttft_p99": res["ttft_s"]["p99"], "tpot_p50": res["tpot_s"]["p50"]}), flush=True)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    low = runs[0]["ttft_s"]["p99"]
    knee = next((r["request_rate"] for r in runs[1:] if low and r["ttft_s"]["p99"] and r["ttft_s"]["p99"] > 2 * low),
                None)
    best = max(runs, key=lambda r: r["output_tokens_per_s"])
    result = {
        **env,
        "workload": {"name": "C (online serving)", "model": args.model, "num_requests": len(reqs),
                     "prompt_tokens": sum(len(p) for p, _ in reqs), "output_tokens": sum(o for _, o in reqs),
                     "max_prompt_tokens": args.max_prompt_tokens, "max_output_tokens": args.max_output_tokens,
                     "rates": args.rates, "arrivals": "Poisson, random.Random(seed)", "seed": args.seed,
                     "prompts_per_rate": "workload A prompts, token ids shifted by 7919*k mod 10000 at rate k",
                     "sampling": {"temperature": 0.0, "ignore_eos": True}, "endpoint": "/v1/completions stream",
                     "server": {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                                "engine_core": "own process (pyzmq + msgpack deltas)", "extra": args.server_args}},
        "runs": runs,
        "output_tokens_per_s": best["output_tokens_per_s"], "total_tokens_per_s": best["total_tokens_per_s"],
        "ttft_p99_knee_rate": knee,
    }
    save_result(args.name, result)


if __name__ == "__main__":
    main()
