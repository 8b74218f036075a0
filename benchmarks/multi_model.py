"""How many requests can six models on one GPU serve at their SLO? Static slices vs elastic KV vs elastic + sleep.

    python benchmarks/multi_model.py            # H200: ~6-7 minutes, writes multi_model_<device>.json
    python benchmarks/multi_model.py --smoke    # CPU: six tiny random models, short windows (a few minutes)

Six ``slicelm serve`` processes (the shapes of ``multi_model_trace.MODELS``, 0.6B–8B, random weights) start
once, each with an equal slice of the GPU (``--gpu-memory-budget``: the GPU's free memory / 6, HAMi's static
equal slices), ``--elastic-kv --enable-sleep-mode``, under slicelm's MPS daemon (no thread cap), registered
with one memory broker (``slicelm.stack.broker_server``) whose policy is switched at run time:

1. ``static``: ceiling = guarantee (``SetPolicy(0)``): every engine keeps to its slice, as HAMi's slices;
2. ``elastic``: engines borrow whatever is free and give it back when an owner needs it;
3. ``elastic_sleep``: as 2, through a router that puts a model to sleep after ``--idle-sleep-after`` s
   without requests (level 1) and wakes it for the next one (that request waits); a sleeping model's
   memory is lent like any other. Each window starts with one tiny request per model through that router
   (the pause between two windows is not part of the trace; models idle inside a window do sleep).

Per model, its TTFT (two prompt lengths) and TPOT alone on the idle GPU set its SLO (5×). Each policy's
maximum total rate at which 99% of a window's requests meet their SLO is found by doubling then bisecting
(the trace of ``multi_model_trace.make_trace``, the same requests for every policy at a given rate). The
8B model's wake-up time from level-1 sleep is measured on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, save_result
from multi_model_trace import (
    MODELS,
    SMOKE_MODELS,
    Arrival,
    Baseline,
    Lengths,
    make_trace,
    meets_slo,
    popularity,
)
from serving import Record, free_port, one_request

from slicelm.slicing.broker_client import BROKER_ENV, GPU_ENV, REPLICA_ENV, BrokerControl
from slicelm.stack.broker import BrokerState
from slicelm.stack.broker_server import BrokerServer

HEADROOM = 2 << 30  # left free on the GPU beside the six slices
GPU_ID = "gpu0"


# ------------------------------------------------------------------------------------------- processes
def _wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{what} was not healthy after {timeout:.0f} s")


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
    _wait_http(url, proc, 60, f"router {tag}")
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


# ------------------------------------------------------------------------------------------- requests
async def _one(session: aiohttp.ClientSession, url: str, a: Arrival, t0: float, base: Baseline) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + a.t - time.perf_counter()))
    try:
        rec = await one_request(session, url, a.model, a.prompt, a.max_tokens)
    except TimeoutError:  # cut (the session's per-request limit): its disconnect aborts it in the engine
        rec = Record(status=-1)
    ttft = rec.first - rec.start if rec.first is not None else None
    tpot = (rec.end - rec.first) / (rec.output_tokens - 1) if rec.first is not None and rec.output_tokens > 1 \
        else None
    return {"model": a.model, "ok": rec.ok, "status": rec.status, "ttft": ttft, "tpot": tpot,
            "slo": meets_slo(rec.ok, ttft, tpot, len(a.prompt), base)}


async def run_window(router: str, trace: list[Arrival], baselines: dict[str, Baseline], window: float,
                     drain: float) -> list[dict[str, Any]]:
    """Sends the trace on time; a request not done ``window + drain`` s after it was sent is cut (SLO missed)."""
    url = router + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=window + drain)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        t0 = time.perf_counter() + 0.2
        return await asyncio.gather(*(_one(session, url, a, t0, baselines[a.model]) for a in trace))


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


async def measure_alone(urls: dict[str, str], lengths: Lengths, vocab: dict[str, int]) -> dict[str, Baseline]:
    """Each model alone (the others idle): TTFT at the shortest and longest prompt, TPOT; best of two."""
    out = {}
    async with aiohttp.ClientSession() as session:
        for name, url in urls.items():
            runs: dict[int, list[tuple[float, float]]] = {lengths.prompt_min: [], lengths.prompt_max: []}
            for n in list(runs) * 2:
                prompt = [(7 * i + n) % vocab[name] for i in range(n)]
                rec = await one_request(session, url + "/v1/completions", name, prompt, 32)
                assert rec.ok and rec.first is not None, f"{name}: the alone request failed ({rec.status})"
                runs[n].append((rec.first - rec.start, (rec.end - rec.first) / (rec.output_tokens - 1)))
            short, long = (min(runs[k]) for k in (lengths.prompt_min, lengths.prompt_max))
            out[name] = Baseline(lengths.prompt_min, short[0], lengths.prompt_max, long[0],
                                 min(short[1], long[1], *(t for _, t in runs[lengths.prompt_max])))
    return out


def measure_wake(url: str, repeats: int) -> dict[str, Any]:
    """Level-1 sleep, then ``/wake_up``: the server's own figure and the client's round trip."""
    server, client = [], []
    for _ in range(repeats):
        req = urllib.request.Request(url + "/sleep?level=1", method="POST")
        urllib.request.urlopen(req, timeout=300).read()
        t0 = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url + "/wake_up", method="POST"), timeout=300) as r:
            server.append(float(r.headers["x-slicelm-wake-seconds"]))
        client.append(time.perf_counter() - t0)
    return {"level": 1, "server_s": server, "client_s": client, "median_s": sorted(client)[len(client) // 2]}


async def touch_all(router: str, models: list[str]) -> None:
    """One one-token request per model through ``router``: wakes sleeping models and restarts their idle clocks."""
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one_request(session, router + "/v1/completions", m, [1] * 16, 1) for m in models))


def prewarm_sleep(urls: dict[str, str], exclude: str) -> None:
    """One level-1 sleep and wake of every engine, all at once: the pinned host buffer that keeps a sleeping
    engine's weights is allocated at its first sleep and kept, so that cost is not paid inside a window."""

    def cycle(url: str) -> None:
        for path in ("/sleep?level=1", "/wake_up"):
            urllib.request.urlopen(urllib.request.Request(url + path, method="POST"), timeout=300).read()

    with ThreadPoolExecutor(len(urls)) as pool:
        list(pool.map(cycle, [u for m, u in urls.items() if m != exclude]))


# ------------------------------------------------------------------------------------------- search
class Bench:
    def __init__(self, args: argparse.Namespace, models: dict[str, dict], urls: dict[str, str],
                 baselines: dict[str, Baseline], lengths: Lengths, control: BrokerControl) -> None:
        self.args, self.models, self.urls, self.baselines = args, models, urls, baselines
        self.lengths, self.control = lengths, control
        self.vocab = min(int(c["vocab_size"]) for c in models.values())
        self.touch = False  # one tiny request per model before each window (the sleep policy's router)

    def probe(self, router: str, rate: float) -> dict[str, Any]:
        a = self.args
        trace = make_trace(list(self.models), rate, a.window, self.lengths, self.vocab, a.seed)
        if self.touch:  # the gap between two windows is no part of the trace: every model starts awake
            asyncio.run(touch_all(router, list(self.models)))
        results = asyncio.run(run_window(router, trace, self.baselines, a.window, a.drain))
        wait_idle(self.urls)
        attained = sum(r["slo"] for r in results) / max(1, len(results))
        per_model = {m: {"requests": sum(r["model"] == m for r in results),
                         "slo": sum(r["slo"] for r in results if r["model"] == m)} for m in self.models}
        books = self.control.status()["members"]
        out = {"rate": rate, "requests": len(results), "attainment": attained,
               "errors": sum(not r["ok"] for r in results), "per_model": per_model,
               "max_borrowed_gib": max((m["borrowed"] for m in books.values()), default=0) / 2**30}
        print(f"    rate {rate:7.2f}/s: {len(results):4d} requests, SLO met {100 * attained:5.1f}%, "
              f"errors {out['errors']}", flush=True)
        return out

    def search(self, router: str, start: float) -> tuple[float, list[dict[str, Any]]]:
        """Doubling (or halving) from ``start`` until the 99% bar is bracketed, then geometric bisection."""
        lo: float | None = None
        hi: float | None = None
        rate, probes = start, []
        for _ in range(self.args.max_probes):
            p = self.probe(router, rate)
            probes.append(p)
            if p["attainment"] >= 0.99:
                lo = rate
            else:
                hi = rate
            if hi is None:
                rate *= 2
            elif lo is None:
                rate /= 2
            elif hi / lo <= 1.25:
                break
            else:
                rate = math.sqrt(lo * hi)
        return lo or 0.0, probes

    def set_policy(self, max_borrow: int | None) -> None:
        """Switches the broker and waits until every engine is back under its new ceiling."""
        self.control.set_policy(max_borrow)
        deadline = time.time() + 20
        while time.time() < deadline:
            books = self.control.status()["members"]
            if all(m["used"] <= m["ceiling"] for m in books.values()):
                return
            time.sleep(0.1)


# ------------------------------------------------------------------------------------------- main
def _capacity(smoke: bool, n: int) -> tuple[int, int]:
    if smoke:
        budget = 12 << 20  # KV bytes per CPU engine
        return n * budget, budget
    import torch

    free, _ = torch.cuda.mem_get_info(0)
    capacity = free - HEADROOM
    return capacity, capacity // n


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(60)
        if p.poll() is None:
            p.kill()


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    models = SMOKE_MODELS if args.smoke else MODELS
    lengths = Lengths(32, 160, 8, 32) if args.smoke else Lengths()
    logs = root / "logs"
    logs.mkdir()
    capacity, budget = _capacity(args.smoke, len(models))
    daemon, env, mps_note = mps_env(root, args.mps and not args.smoke)
    if args.smoke:
        env = {"OMP_NUM_THREADS": "1"}
    args.broker_address = f"ipc://{root}/broker.ipc"
    broker = BrokerServer(args.broker_address, BrokerState({GPU_ID: capacity}, max_borrow=0,
                                                           reclaim_timeout=args.reclaim_timeout)).start()
    procs: list[subprocess.Popen] = []
    urls: dict[str, str] = {}
    try:
        t0 = time.time()
        for name, cfg in models.items():
            (root / name).mkdir()
            (root / name / "config.json").write_text(json.dumps(cfg))
            proc, urls[name] = start_server(name, str(root / name), budget, args, env, logs)
            procs.append(proc)
        for (name, url), proc in zip(urls.items(), procs):
            _wait_http(url, proc, args.startup_timeout, name)
        print(f"{len(models)} engines up in {time.time() - t0:.0f} s ({mps_note})", flush=True)
        control = BrokerControl(args.broker_address)
        router, router_url = start_router(urls, logs, "plain")
        procs.append(router)
        baselines = asyncio.run(measure_alone(urls, lengths, {m: int(c["vocab_size"]) for m, c in models.items()}))
        biggest = next(iter(models))
        wake = measure_wake(urls[biggest], args.wake_repeats)
        print(f"alone: {json.dumps({m: asdict(b) for m, b in baselines.items()})}\nwake {biggest}: {wake}",
              flush=True)
        bench = Bench(args, models, urls, baselines, lengths, control)
        policies: dict[str, Any] = {}
        bench.set_policy(0)
        print("warm-up window (not counted: first-use kernel compilation)", flush=True)
        bench.probe(router_url, args.start_rate / 2)
        print("static slices", flush=True)
        best, probes = bench.search(router_url, args.start_rate)
        policies["static"] = {"max_rate": best, "probes": probes}
        print("elastic KV", flush=True)
        bench.set_policy(None)
        best_e, probes = bench.search(router_url, 2 * best if best else args.start_rate)
        policies["elastic"] = {"max_rate": best_e, "probes": probes}
        if not args.skip_sleep:
            print(f"elastic KV + sleep after {args.idle_sleep_after} s idle", flush=True)
            prewarm_sleep(urls, exclude=biggest)  # each engine's host copy of its weights is allocated once
            sleepy, sleepy_url = start_router(urls, logs, "sleep", "--idle-sleep-after", str(args.idle_sleep_after))
            procs.append(sleepy)
            bench.touch = True
            best_z, probes = bench.search(sleepy_url, best_e or args.start_rate)
            policies["elastic_sleep"] = {"max_rate": best_z, "probes": probes,
                                         "router_log_wakes": (logs / "router-sleep.log").read_text().count("Woke up")}
        control.close()
    finally:
        _stop(procs)
        broker.stop()
        if daemon is not None:
            daemon.stop()
    static = policies["static"]["max_rate"]
    return {
        "workload": {
            "name": "multi-model SLO trace (benchmarks.md)", "models": {m: c for m, c in models.items()},
            "popularity": popularity(list(models)), "trace": (sys.modules["multi_model_trace"].__doc__ or "").strip(),
            "lengths": asdict(lengths), "window_s": args.window, "drain_s": args.drain, "seed": args.seed,
            "slo": "TTFT <= 5x alone (at that prompt length) and TPOT <= 5x alone; 99% of the window's requests",
            "slices": {"capacity_bytes": capacity, "budget_bytes_each": budget, "equal": True},
            "engines": {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                        "flags": "--elastic-kv --elastic-kv-watermark 0.05 --enable-sleep-mode"},
            "sharing": mps_note, "reclaim_timeout_s": args.reclaim_timeout,
            "idle_sleep_after_s": args.idle_sleep_after, "search": {"start_rate": args.start_rate,
                                                                    "max_probes": args.max_probes}},
        "baselines_alone": {m: asdict(b) for m, b in baselines.items()},
        "policies": policies,
        "elastic_over_static": policies["elastic"]["max_rate"] / static if static else None,
        "elastic_sleep_over_static": (policies["elastic_sleep"]["max_rate"] / static
                                      if static and "elastic_sleep" in policies else None),
        "wake_from_level1": {"model": biggest, **wake},
    }


def _copy_logs(root: Path) -> None:
    """On the GPU machine only what lands under $OUT comes back: the logs go there too."""
    out = os.environ.get("OUT")
    if out and (root / "logs").is_dir():
        shutil.copytree(root / "logs", Path(out) / "multi_model_logs", dirs_exist_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: six tiny random models, short windows")
    ap.add_argument("--window", type=float, default=None, help="seconds of arrivals per probe (12; smoke 3)")
    ap.add_argument("--drain", type=float, default=None, help="seconds after the window before cutting (15)")
    ap.add_argument("--max-probes", type=int, default=None, help="probes per policy (4; smoke 2)")
    ap.add_argument("--start-rate", type=float, default=None, help="first total rate, requests/s (8; smoke 1)")
    ap.add_argument("--idle-sleep-after", type=float, default=None, help="router idle time before sleep (3; smoke 1)")
    ap.add_argument("--skip-sleep", action="store_true", help="leave the elastic + sleep policy out")
    ap.add_argument("--mps", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--reclaim-timeout", type=float, default=2.0)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--wake-repeats", type=int, default=3)
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="multi_model")
    args = ap.parse_args()
    defaults = dict(window=3.0, drain=20.0, max_probes=2, start_rate=1.0, idle_sleep_after=1.0, max_num_seqs=16,
                    max_model_len=512) if args.smoke else \
        dict(window=12.0, drain=15.0, max_probes=4, start_rate=8.0, idle_sleep_after=3.0, max_num_seqs=128,
             max_model_len=4096)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    env = environment()
    root = Path(tempfile.mkdtemp(prefix="slicelm-multi-"))
    try:
        result = run(args, root)
    except BaseException:
        print(f"failed: the engines' and routers' logs are in {root / 'logs'}", file=sys.stderr, flush=True)
        _copy_logs(root)
        raise
    shutil.rmtree(root, ignore_errors=True)
    result = {**env, **result}
    save_result(args.name + ("_smoke" if args.smoke else ""), result)
    pol = result["policies"]
    print("max rate at 99% SLO: " + ", ".join(f"{k} {v['max_rate']:.2f}/s" for k, v in pol.items())
          + f"; elastic / static {result['elastic_over_static']}; wake {result['wake_from_level1']['median_s']:.3f} s")


if __name__ == "__main__":
    main()
