"""Records the router's dashboard state (``/dashboard/api/state``, history included) while a stack runs under a
light load, for rendering elsewhere: GPU machines here have no browser, so the page is drawn later from this
recording (``python -m slicelm.router.dashboard.render --replay``).

    python benchmarks/dashboard_capture.py            # GPU: examples/stacks/gpu-rag.yaml (chat + embed + rerank at
                                                      # 40 / 20 / 20% of one GPU), 45 s of light load (~2 min)
    python benchmarks/dashboard_capture.py --smoke    # CPU: SmolLM2 chat + MiniLM embeddings, 20 s of load

Load, through the router's one URL: ``--chat-concurrency`` streamed completions (random token prompts of 64-512
tokens, half of them behind one shared 256-token prefix, 64-256 output tokens with ignore_eos), 2 embedding
clients (8 inputs each) and 1 rerank client (16 documents). Snapshots every 2 s while the load runs; checks at the
end (every replica ready, slices as planned, use within slices, counters moved). Results:
benchmarks/results/dashboard_capture_<device>.json; then, on a machine with chromium:
``python -m slicelm.router.dashboard.render --replay benchmarks/results/dashboard_capture_<device>.json
--out docs/dashboard_gpu_h200.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT_S = 2.0
WORDS = ("gpu", "slice", "memory", "budget", "router", "replica", "prefix", "cache", "kernel", "token", "batch")
CPU_WORKLOAD = "SmolLM2 chat + MiniLM embeddings on the CPU"
GPU_WORKLOAD = ("examples/stacks/gpu-rag.yaml: chat (Qwen3-0.6B shape) + embed (bge-m3 shape) + rerank "
                "(bge-reranker-v2-m3 shape) at 40/20/20% of one GPU")


def cpu_stack(run_dir: Path) -> dict[str, Any]:
    return {"servingEngineSpec": {"modelSpec": [
        {"name": "chat", "modelURL": "smollm2-135m-instruct",
         "vllmConfig": {"maxModelLen": 1024, "maxNumSeqs": 8, "enablePrefixCaching": True}},
        {"name": "embed", "modelURL": "all-minilm-l6-v2",
         "vllmConfig": {"maxModelLen": 256, "extraArgs": ["--task", "embed"]}}]},
        "routerSpec": {"routingLogic": "roundrobin"}, "slicelm": {"runDir": str(run_dir), "device": "cpu"}}


def stack_file(args: argparse.Namespace, run_dir: Path, port: int) -> Path:
    if args.smoke:
        spec = cpu_stack(run_dir)
    else:
        from stack_memory import gpu_rag_stack, write_models

        spec = gpu_rag_stack(write_models(args.models_dir, args.tokenizer_dir), run_dir)
    spec["routerSpec"]["containerPort"] = port
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "stack.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ load
class Load:
    def __init__(self, url: str, names: dict[str, str], smoke: bool, chat_concurrency: int) -> None:
        self.url, self.names, self.smoke, self.chat_concurrency = url, names, smoke, chat_concurrency
        self.counts: dict[str, dict[str, int]] = {m: {"ok": 0, "errors": 0} for m in names}
        self.rng = random.Random(0)
        self.prefix = [self.rng.randint(100, 10000) for _ in range(256)]

    def _count(self, model: str, r: httpx.Response) -> None:
        self.counts[model]["ok" if r.status_code == 200 else "errors"] += 1

    async def chat(self, client: httpx.AsyncClient, stop_at: float) -> None:
        while time.time() < stop_at:
            n = self.rng.randint(16, 64) if self.smoke else self.rng.randint(64, 512)
            prompt = [self.rng.randint(100, 10000) for _ in range(n)]
            if self.rng.random() < 0.5:
                prompt = self.prefix + prompt
            body = {"model": self.names["chat"], "prompt": prompt, "temperature": 0, "ignore_eos": True,
                    "max_tokens": 8 if self.smoke else self.rng.randint(64, 256), "stream": True}
            async with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                async for _ in r.aiter_bytes():
                    pass
            self._count("chat", r)

    def text(self, words: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(words))

    async def pooling(self, client: httpx.AsyncClient, kind: str, stop_at: float) -> None:
        text = self.text
        while time.time() < stop_at:
            if kind == "embed":
                body = {"model": self.names[kind], "input": [text(100) for _ in range(2 if self.smoke else 8)]}
                r = await client.post(f"{self.url}/v1/embeddings", json=body)
            else:
                body = {"model": self.names[kind], "query": text(12), "documents": [text(80) for _ in range(16)]}
                r = await client.post(f"{self.url}/v1/rerank", json=body)
            self._count(kind, r)
            await asyncio.sleep(0.2)

    async def run(self, duration_s: float) -> None:
        stop_at = time.time() + duration_s
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [self.chat(client, stop_at) for _ in range(self.chat_concurrency)]
            if "embed" in self.names:
                tasks += [self.pooling(client, "embed", stop_at) for _ in range(1 if self.smoke else 2)]
            if "rerank" in self.names:
                tasks.append(self.pooling(client, "rerank", stop_at))
            await asyncio.gather(*tasks)


async def record(url: str, load: Load, duration_s: float) -> list[dict[str, Any]]:
    """Snapshots of the dashboard state every SNAPSHOT_S while the load runs, and one a sample after it ended
    (the router counts a request when it completes)."""
    snaps: list[dict[str, Any]] = []
    task = asyncio.create_task(load.run(duration_s))
    async with httpx.AsyncClient(timeout=30) as client:
        while True:
            if task.done():
                await asyncio.sleep(SNAPSHOT_S + 0.5)
            r = await client.get(f"{url}/dashboard/api/state")
            r.raise_for_status()
            snaps.append(r.json())
            if task.done():
                break
            await asyncio.wait([task], timeout=SNAPSHOT_S)
    await task
    return snaps


# ------------------------------------------------------------------------------------------------ checks
def checks(snaps: list[dict[str, Any]], smoke: bool) -> dict[str, Any]:
    last = snaps[-1]
    out: dict[str, Any] = {
        "all_ready": all(r["status"] == "ready" for r in last["replicas"]),
        "requests_moved": {m["name"]: m["requests"] for m in last["models"]},
        "chat_ttft_p50_s": next(m["ttft_p50"] for m in last["models"] if m["name"] == "chat"),
        "history_points": len(last["history"]["t"])}
    slices = [s for g in last["gpus"] for s in g["slices"]]
    if not smoke:
        (gpu,) = last["gpus"]
        out["slice_percent_of_gpu"] = {s["key"]: round(100 * s["memory_mib"] / gpu["memory_mib"], 1) for s in slices}
        out["used_within_slice"] = {s["key"]: s["memory_used_mib"] is not None and s["memory_used_mib"] <=
                                    s["memory_mib"] for s in slices}
    out["ok"] = out["all_ready"] and all(v for v in out["requests_moved"].values()) and all(
        out.get("used_within_slice", {}).values())
    return out


def slicelm(*args: str, timeout: float = 900) -> str:
    import subprocess

    r = subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"slicelm {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the CPU stack (SmolLM2 + MiniLM), 20 s")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (default 45, smoke 20)")
    ap.add_argument("--chat-concurrency", type=int, default=None, help="streams in flight (default 4, smoke 1)")
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/slicelm-stack-models"))
    ap.add_argument("--tokenizer-dir", type=Path, default=None)
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/slicelm-dashboard-capture"))
    ap.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/...)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from slicelm.stack.procs import free_port

    duration = args.duration or (20.0 if args.smoke else 45.0)
    port = free_port("127.0.0.1")
    path = stack_file(args, args.run_dir, port)
    t0 = time.time()
    slicelm("up", str(path), "--detach")
    started_s = time.time() - t0
    url = f"http://127.0.0.1:{port}"
    try:
        state = json.loads((args.run_dir / "state.json").read_text())
        names = {r["model"]: r["served_names"][0] for r in state["replicas"]}
        load = Load(url, names, args.smoke, args.chat_concurrency or (1 if args.smoke else 4))
        snaps = asyncio.run(record(url, load, duration))
        ps = json.loads(slicelm("ps", "--run-dir", str(args.run_dir), "--format", "json"))
    finally:
        slicelm("down", "--run-dir", str(args.run_dir))
    from common import RESULTS, device_slug, environment  # after the stack: no CUDA context of ours in the figures

    env = environment()
    workload = (f"{CPU_WORKLOAD if args.smoke else GPU_WORKLOAD}; "
                f"{duration:.0f} s of light load through the router: {load.chat_concurrency} streamed completions "
                "in flight, embedding and rerank clients; a dashboard snapshot every 2 s")
    result = {**env, "workload": workload, "stack_start_s": round(started_s, 1), "load": load.counts,
              "checks": checks(snaps, args.smoke), "ps": ps, "snapshots": snaps}
    out = args.out or RESULTS / f"dashboard_capture_{device_slug(env['device'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("device", "commit", "stack_start_s", "load", "checks")}, indent=2))
    png = "/tmp/dashboard_cpu_replay.png" if args.smoke else "docs/dashboard_gpu_h200.png"
    print(f"wrote {out} ({out.stat().st_size >> 10} KiB, {len(snaps)} snapshots); render it (where chromium is) with:"
          f"\n  python -m slicelm.router.dashboard.render --replay {out} --out {png}")


if __name__ == "__main__":
    main()
