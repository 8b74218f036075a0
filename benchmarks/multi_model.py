"""How many requests can six models on one GPU serve at their SLO? Static slices vs elastic KV vs elastic + sleep.

    python benchmarks/multi_model.py            # H200: under 6 minutes (--time-budget 320 s, then it stops)
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
(the trace of ``multi_model_trace.make_trace``, the same requests for every policy at a given rate); the
elastic search starts at twice the static rate. The 8B model's wake-up time from level-1 sleep is measured
on its own. Each probe records, per model, why requests missed (``missed``: error / ttft / tpot) and the peak
memory each engine borrowed during the window (the broker's books, read every ``BORROW_SAMPLE_S``).

Time: the whole run keeps to ``--time-budget`` seconds. What is left after start-up, the alone and wake-up
figures and one warm-up window is shared by the three policies (time one leaves unused passes to the next);
a probe that would not end inside its policy's share is not started, and the policy's result says
``"stopped": "time budget"`` (``"bracketed": false`` when no rate failed: the maximum is then at least the
figure given). The result file is written after every stage and every probe (``"complete": false`` until
the end), so a run killed by a time limit still leaves its figures.
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
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, save_result
from multi_model_procs import (
    GPU_ID,
    measure_wake,
    mps_env,
    prewarm_sleep,
    start_router,
    start_server,
    stop_all,
    wait_http,
    wait_idle,
)
from multi_model_requests import measure_alone, run_window, touch_all
from multi_model_trace import (
    MODELS,
    SMOKE_MODELS,
    Arrival,
    Baseline,
    Lengths,
    make_trace,
    popularity,
)

from slicelm.slicing.broker_client import BrokerControl
from slicelm.stack.broker import BrokerState
from slicelm.stack.broker_server import BrokerServer

HEADROOM = 2 << 30  # left free on the GPU beside the six slices
BORROW_SAMPLE_S = 0.25  # how often a probe reads the broker's books
POLICIES = ("static", "elastic", "elastic_sleep")


class Progress:
    """The result so far, written after every stage (a run cut short still leaves its figures), and the clock
    of the whole run's time budget."""

    def __init__(self, name: str, budget_s: float, result: dict[str, Any]) -> None:
        self.name, self.budget_s, self.result = name, budget_s, {**result, "complete": False}
        self.t0 = time.monotonic()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def save(self, **parts: Any) -> None:
        self.result.update(parts)
        self.result["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        pol = self.result.get("policies", {})
        static = pol.get("static", {}).get("max_rate")
        for key in POLICIES[1:]:
            if key in pol:
                self.result[f"{key}_over_static"] = pol[key]["max_rate"] / static if static else None
        save_result(self.name, self.result)


# ------------------------------------------------------------------------------------------- search
class Bench:
    def __init__(self, args: argparse.Namespace, models: dict[str, dict], urls: dict[str, str],
                 baselines: dict[str, Baseline], lengths: Lengths, control: BrokerControl, router: str,
                 progress: Progress) -> None:
        self.args, self.models, self.urls, self.baselines = args, models, urls, baselines
        self.lengths, self.control, self.router, self.progress = lengths, control, router, progress
        self.vocab = min(int(c["vocab_size"]) for c in models.values())
        self.touch = False  # one tiny request per model before each window (the sleep policy's router)
        self.probe_s = args.window + min(args.drain, args.window) + 2  # a probe's expected length, then the longest

    def probe(self, router: str, rate: float) -> dict[str, Any]:
        a = self.args
        t0 = time.monotonic()
        trace = make_trace(list(self.models), rate, a.window, self.lengths, self.vocab, a.seed)
        if self.touch:  # the gap between two windows is no part of the trace: every model starts awake
            asyncio.run(touch_all(router, list(self.models)))
        results, peak = asyncio.run(self._window(router, trace))
        wait_idle(self.urls)
        attained = sum(r["slo"] for r in results) / len(results) if results else 1.0  # none: nothing missed
        per_model = {m: {"requests": sum(r["model"] == m for r in results),
                         "slo": sum(r["slo"] for r in results if r["model"] == m),
                         "missed": dict(Counter(x for r in results if r["model"] == m for x in r["misses"])),
                         "max_borrowed_gib": peak.get(m, 0) / 2**30} for m in self.models}
        took = time.monotonic() - t0
        self.probe_s = max(self.probe_s, took)
        out = {"rate": rate, "requests": len(results), "attainment": attained,
               "errors": sum(not r["ok"] for r in results), "per_model": per_model, "seconds": round(took, 1),
               "max_borrowed_gib": max(peak.values(), default=0) / 2**30}
        print(f"    rate {rate:7.2f}/s: {len(results):4d} requests, SLO met {100 * attained:5.1f}%, "
              f"errors {out['errors']} ({took:.0f} s; {self.progress.left():.0f} s of the budget left)", flush=True)
        return out

    async def _window(self, router: str, trace: list[Arrival]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The window's results and each engine's peak borrowed bytes, read from the broker every
        ``BORROW_SAMPLE_S`` while the window runs (an idle engine gives its borrowed chunks back at once)."""
        peak: dict[str, int] = {}
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                for name, m in (await asyncio.to_thread(self.control.status))["members"].items():
                    peak[name] = max(peak.get(name, 0), m["borrowed"])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), BORROW_SAMPLE_S)

        sampler = asyncio.create_task(sample())
        try:
            results = await run_window(router, trace, self.baselines, self.args.window, self.args.drain)
        finally:
            done.set()
            await sampler
        return results, peak

    def search(self, policy: str, router: str, start: float, deadline: float) -> float:
        """Doubling (or halving) from ``start`` until the 99% bar is bracketed, then geometric bisection; no probe
        starts that would end after ``deadline`` (monotonic). Saves the policy's figures after every probe."""
        lo: float | None = None
        hi: float | None = None
        rate, probes = start, []
        entry: dict[str, Any] = {"max_rate": 0.0, "bracketed": False, "probes": probes, "stopped": None}
        for _ in range(self.args.max_probes):
            if time.monotonic() + self.probe_s > deadline:
                entry["stopped"] = "time budget"
                break
            p = self.probe(router, rate)
            probes.append(p)
            if p["attainment"] >= 0.99:
                lo = rate
            else:
                hi = rate
            entry.update(max_rate=lo or 0.0, bracketed=hi is not None)
            self.progress.save(policies={**self.progress.result.get("policies", {}), policy: entry})
            if hi is None:
                rate *= 2
            elif lo is None:
                rate /= 2
            elif hi / lo <= 1.25:
                break
            else:
                rate = math.sqrt(lo * hi)
        self.progress.save(policies={**self.progress.result.get("policies", {}), policy: entry})
        return entry["max_rate"]

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


def start_engines(args: argparse.Namespace, models: dict[str, dict], root: Path, budget: int,
                  env: dict[str, str], procs: list[subprocess.Popen], progress: Progress) -> dict[str, str]:
    """The six servers, started together; their URLs once all are healthy."""
    t0 = time.monotonic()
    urls: dict[str, str] = {}
    for name, cfg in models.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
        proc, urls[name] = start_server(name, str(root / name), budget, args, env, root / "logs")
        procs.append(proc)
    for (name, url), proc in zip(urls.items(), procs):
        wait_http(url, proc, t0 + min(args.startup_timeout, progress.left()), name)
    progress.save(startup_s=round(time.monotonic() - t0, 1))
    print(f"{len(models)} engines up in {time.monotonic() - t0:.0f} s", flush=True)
    return urls


def run_policies(bench: Bench, urls: dict[str, str], root: Path, procs: list[subprocess.Popen]) -> None:
    """Static, elastic, elastic + sleep, each in its share of the time left."""
    args, progress = bench.args, bench.progress
    names = POLICIES[:2] if args.skip_sleep else POLICIES
    best: dict[str, float] = {}
    for i, policy in enumerate(names):
        deadline = time.monotonic() + progress.left() / (len(names) - i)
        print(f"{policy} ({progress.left() / (len(names) - i):.0f} s)", flush=True)
        if policy == "static":
            bench.set_policy(0)
            best[policy] = bench.search(policy, bench.router, args.start_rate, deadline)
        elif policy == "elastic":
            bench.set_policy(None)
            best[policy] = bench.search(policy, bench.router, 2 * best["static"] or args.start_rate, deadline)
        else:
            prewarm_sleep(urls, exclude=next(iter(urls)))  # each engine's host copy of its weights, allocated once
            sleepy, sleepy_url = start_router(urls, root / "logs", "sleep", "--idle-sleep-after",
                                              str(args.idle_sleep_after))
            procs.append(sleepy)
            bench.touch = True
            best[policy] = bench.search(policy, sleepy_url, best["elastic"] or args.start_rate, deadline)
            wakes = (root / "logs" / "router-sleep.log").read_text().count("Woke up")
            progress.result["policies"][policy]["router_log_wakes"] = wakes
            progress.save()


def run(args: argparse.Namespace, root: Path, progress: Progress) -> None:
    models = SMOKE_MODELS if args.smoke else MODELS
    lengths = Lengths(*args.lengths) if args.lengths else Lengths(32, 160, 8, 32) if args.smoke else Lengths()
    assert lengths.prompt_max + lengths.out_max <= args.max_model_len, ("--lengths beyond --max-model-len", lengths)
    (root / "logs").mkdir()
    capacity, budget = _capacity(args.smoke, len(models))
    daemon, env, mps_note = mps_env(root, args.mps and not args.smoke)
    if args.smoke:
        env = {"OMP_NUM_THREADS": "1"}
    progress.save(workload=_workload(args, models, lengths, capacity, budget, mps_note))
    args.broker_address = f"ipc://{root}/broker.ipc"
    broker = BrokerServer(args.broker_address, BrokerState({GPU_ID: capacity}, max_borrow=0,
                                                           reclaim_timeout=args.reclaim_timeout)).start()
    procs: list[subprocess.Popen] = []
    try:
        urls = start_engines(args, models, root, budget, env, procs, progress)
        control = BrokerControl(args.broker_address)
        router, router_url = start_router(urls, root / "logs", "plain")
        procs.append(router)
        baselines = asyncio.run(measure_alone(urls, lengths, {m: int(c["vocab_size"]) for m, c in models.items()}))
        progress.save(baselines_alone={m: asdict(b) for m, b in baselines.items()})
        biggest = next(iter(models))
        wake = measure_wake(urls[biggest], args.wake_repeats)
        progress.save(wake_from_level1={"model": biggest, **wake})
        print(f"alone: {json.dumps({m: asdict(b) for m, b in baselines.items()})}\nwake {biggest}: {wake}",
              flush=True)
        bench = Bench(args, models, urls, baselines, lengths, control, router_url, progress)
        bench.set_policy(0)
        print("warm-up window (not counted: first-use kernel compilation)", flush=True)
        bench.probe(router_url, args.start_rate / 2)
        run_policies(bench, urls, root, procs)
        control.close()
    finally:
        stop_all(procs)
        broker.stop()
        if daemon is not None:
            daemon.stop()


def _workload(args: argparse.Namespace, models: dict[str, dict], lengths: Lengths, capacity: int, budget: int,
              mps_note: str) -> dict[str, Any]:
    return {
        "name": "multi-model SLO trace (benchmarks.md)", "models": dict(models),
        "popularity": popularity(list(models)), "trace": (sys.modules["multi_model_trace"].__doc__ or "").strip(),
        "lengths": asdict(lengths), "window_s": args.window, "drain_s": args.drain, "seed": args.seed,
        "slo": "TTFT <= 5x alone (at that prompt length) and TPOT <= 5x alone; 99% of the window's requests",
        "slices": {"capacity_bytes": capacity, "budget_bytes_each": budget, "equal": True},
        "engines": {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                    "flags": "--elastic-kv --elastic-kv-watermark 0.05 --enable-sleep-mode"},
        "sharing": mps_note, "reclaim_timeout_s": args.reclaim_timeout, "idle_sleep_after_s": args.idle_sleep_after,
        "search": {"start_rate": args.start_rate, "max_probes": args.max_probes, "time_budget_s": args.time_budget}}


def _copy_logs(root: Path) -> None:
    """On the GPU machine only what lands under $OUT comes back: the logs go there too."""
    out = os.environ.get("OUT")
    if out and (root / "logs").is_dir():
        shutil.copytree(root / "logs", Path(out) / "multi_model_logs", dirs_exist_ok=True)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: six tiny random models, short windows")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (320; smoke 1500)")
    ap.add_argument("--window", type=float, default=None, help="seconds of arrivals per probe (10; smoke 3)")
    ap.add_argument("--drain", type=float, default=None, help="seconds after the window before cutting (10; smoke 20)")
    ap.add_argument("--max-probes", type=int, default=None, help="probes per policy at most (5; smoke 2)")
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
    ap.add_argument("--lengths", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="PROMPT_MIN,PROMPT_MAX,OUT_MIN,OUT_MAX tokens (256,2048,64,256; smoke 32,160,8,32); long "
                         "outputs make the popular 8B's KV outgrow its static slice (a memory-bound trace)")
    ap.add_argument("--name", default="multi_model")
    args = ap.parse_args()
    defaults = dict(time_budget=1500.0, window=3.0, drain=20.0, max_probes=2, start_rate=1.0, idle_sleep_after=1.0,
                    max_num_seqs=16, max_model_len=512) if args.smoke else \
        dict(time_budget=320.0, window=10.0, drain=10.0, max_probes=5, start_rate=8.0, idle_sleep_after=3.0,
             max_num_seqs=128, max_model_len=4096)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lengths is not None and len(args.lengths) != 4:
        ap.error("--lengths: PROMPT_MIN,PROMPT_MAX,OUT_MIN,OUT_MAX (four integers)")
    return args


def main() -> None:
    args = _args()
    progress = Progress(args.name + ("_smoke" if args.smoke else ""), args.time_budget, environment())
    root = Path(tempfile.mkdtemp(prefix="slicelm-multi-"))
    try:
        run(args, root, progress)
    except BaseException:
        print(f"failed: the engines' and routers' logs are in {root / 'logs'}", file=sys.stderr, flush=True)
        _copy_logs(root)
        raise
    shutil.rmtree(root, ignore_errors=True)
    progress.save(complete=True)
    r = progress.result
    print("max rate at 99% SLO: " + ", ".join(f"{k} {v['max_rate']:.2f}/s" for k, v in r["policies"].items())
          + f"; elastic / static {r.get('elastic_over_static')}; wake {r['wake_from_level1']['median_s']:.3f} s")


if __name__ == "__main__":
    main()
