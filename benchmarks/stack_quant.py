"""Seed-002 pair: Mistral-7B-v0.3-AWQ and Qwen2.5-7B-Instruct-AWQ shapes (AWQ 4-bit g128, random weights) with
``requestGPUMem: 10800`` each (45% of an A10G), binpacked onto one GPU by ``slicelm up``, both under load through
the router; NVML memory of each replica's processes sampled every 50 ms: peak vs its slice, and each model's
output tokens/s.

    python benchmarks/stack_quant.py                 # one GPU: ~2 min (two engine starts + 45 s of load)
    python benchmarks/stack_quant.py --smoke         # CPU: tiny AWQ shapes, 5 s of load (checks the script)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AWQ_G128, environment, save_result, write_config_dir
from stack_memory import MiB, Sampler, count, stop_and_down, up

MODELS = {"mistral-7b-awq": "mistral-7b-v0.3", "qwen2.5-7b-awq": "qwen2.5-7b"}


def stack(paths: dict[str, str], run_dir: Path, smoke: bool) -> dict[str, Any]:
    specs = []
    for name, path in paths.items():
        # vLLM's defaults on a GPU under 70 GiB (the A10G of the seed article): 2048 batched tokens per step, CUDA
        # graphs up to 512 tokens; slicelm applies the same to a 10800 MiB slice, passed here to say so
        spec: dict[str, Any] = {"name": name, "modelURL": path, "replicaCount": 1,
                                "vllmConfig": {"maxModelLen": 4096, "maxNumSeqs": 64,
                                               "extraArgs": ["--max-num-batched-tokens", "2048",
                                                             "--load-format", "dummy", "--skip-tokenizer-init",
                                                             "--served-model-name", name]}}
        if not smoke:
            spec.update({"requestGPU": 1, "requestGPUMem": 10800,
                         "podAnnotations": {"hami.io/gpu-scheduler-policy": "binpack"}})
        specs.append(spec)
    out: dict[str, Any] = {"servingEngineSpec": {"modelSpec": specs}, "slicelm": {"runDir": str(run_dir)}}
    if smoke:
        out["slicelm"]["device"] = "cpu"
    return out


async def load_model(url: str, model: str, stop_at: float, concurrency: int, lengths: tuple[int, int, int, int],
                     stats: dict) -> None:
    """``concurrency`` clients sending completions (prompt / output lengths uniform in the given ranges)."""
    import random

    import httpx

    rng = random.Random(model)
    p_lo, p_hi, o_lo, o_hi = lengths
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker() -> None:
            while time.time() < stop_at:
                body = {"model": model, "prompt": [rng.randint(0, 10000) for _ in range(rng.randint(p_lo, p_hi))],
                        "max_tokens": rng.randint(o_lo, o_hi), "temperature": 0, "ignore_eos": True}
                r = await client.post(f"{url}/v1/completions", json=body)
                count(stats, r)
                if r.status_code == 200:
                    stats["tokens"] += r.json()["usage"]["completion_tokens"]
        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def load_through_router(router: str, names: list[str], duration_s: float, concurrency: int,
                              lengths: tuple[int, int, int, int]) -> dict:
    stop_at = time.time() + duration_s
    stats = {n: {"ok": 0, "errors": 0, "tokens": 0} for n in names}
    t0 = time.time()
    await asyncio.gather(*(load_model(router, n, stop_at, concurrency, lengths, stats[n]) for n in names))
    elapsed = time.time() - t0
    for s in stats.values():
        s["output_tokens_per_s"] = s["tokens"] / elapsed
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=45.0, help="seconds of load")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent requests per model")
    ap.add_argument("--sample-ms", type=float, default=50.0)
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/slicelm-quant-models"))
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/slicelm-quant-stack"))
    ap.add_argument("--smoke", action="store_true", help="CPU replicas of tiny AWQ shapes, 5 s of load")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = environment()
    if args.smoke:
        args.duration, args.concurrency = 5.0, 2
        paths = {name: write_config_dir("tiny-llama", args.models_dir / name, AWQ_G128) for name in MODELS}
    elif "cpu" in env["device"]:
        raise SystemExit("stack_quant.py measures GPU memory slices: it needs a CUDA GPU (or --smoke)")
    else:
        paths = {name: write_config_dir(shape, args.models_dir, AWQ_G128) for name, shape in MODELS.items()}
    run_dir = args.run_dir / "seed-002"
    plan, state = up(stack(paths, run_dir, args.smoke), run_dir)
    sampler = None if args.smoke else Sampler(args.sample_ms / 1000)
    if sampler:
        sampler.start()
    try:
        if not state.get("router"):
            raise SystemExit("the router did not start (is aiohttp installed?)")
        lengths = (8, 16, 2, 4) if args.smoke else (100, 1024, 100, 512)
        stats = asyncio.run(load_through_router(state["router"]["url"], list(MODELS), args.duration,
                                                args.concurrency, lengths))
    finally:
        ps = stop_and_down(sampler, run_dir)
    rows = []
    for r in state["replicas"]:
        peak = sampler.peak.get(r["pid"], 0) if sampler else 0
        rows.append({"model": r["model"], "slice_mib": r["memory_mib"], "peak_mib": round(peak / MiB, 1),
                     "peak_within_slice": bool(sampler) and peak <= (r["memory_mib"] or 0) * MiB,
                     "gpu": r["gpus"], **stats[r["model"]]})
    gpus = {g["uuid"] for r in rows for g in r["gpu"]}
    result = {**env,
              "workload": f"seed-002 pair: {', '.join(f'{n} ({s} shape)' for n, s in MODELS.items())}, AWQ 4-bit "
                          f"g128 random weights, requestGPUMem 10800 each, binpack, --max-model-len 4096 "
                          f"--max-num-seqs 64 --max-num-batched-tokens 2048; {args.duration:.0f} s of load "
                          f"through the router ({args.concurrency} concurrent completions per model, prompts "
                          f"100-1024 tokens, 100-512 new), NVML every {args.sample_ms:.0f} ms",
              "plan": plan, "replicas": rows, "ps_after_load": ps, "one_gpu": len(gpus) == 1,
              "all_within_slice": all(r["peak_within_slice"] for r in rows),
              "output_tokens_per_s": {r["model"]: r["output_tokens_per_s"] for r in rows}}
    save_result("stack_quant" + ("_smoke" if args.smoke else ""), result)
    print(json.dumps({k: result[k] for k in ("replicas", "one_gpu", "all_within_slice")}, indent=2))


if __name__ == "__main__":
    main()
