"""Memory budgets: run workload A (or a slice of it) under ``--gpu-memory-budget`` and check the peak.

    python benchmarks/memory_budget.py --budgets 4GiB 8GiB 20GiB        # one child process per budget
    python benchmarks/memory_budget.py --side-by-side 0.4               # two engines, 40% each, at once

Each engine runs in its own process; a sampler thread reads that process's device memory from NVML
every 5 ms (the driver's view: CUDA context, allocator pools, graphs, everything). Also reported:
torch's peak reserved memory, the engine's memory plan, and KV waste (allocated but unused slots)
sampled every step, as a fraction and in blocks per running request.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, save_result, workload_a, write_config_dir


class NvmlPeak(threading.Thread):
    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, 0, threading.Event()

    def run(self) -> None:
        from slicelm.engine.memory import process_gpu_memory

        while not self._halt.is_set():
            used = process_gpu_memory(0)
            if used is not None:
                self.peak = max(self.peak, used)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def run_one(budget: str, num_requests: int, shape: str, max_num_seqs: int, max_num_batched_tokens: int) -> dict:
    from slicelm.config import EngineArgs
    from slicelm.engine.engine import LLMEngine
    from slicelm.sampling_params import SamplingParams

    sampler = NvmlPeak()
    sampler.start()
    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine(EngineArgs(model=write_config_dir(shape, root), load_format="dummy",
                                      skip_tokenizer_init=True, gpu_memory_budget=budget, max_model_len=4096,
                                      max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens))
    plan = engine.worker.memory_plan
    reqs = workload_a(num_requests)
    for i, (p, o) in enumerate(reqs):
        engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(max_tokens=o, ignore_eos=True),
                           stream=False)
    kv, bs = engine.scheduler.kv_cache, engine.cache_config.block_size
    waste_slots = used_slots = 0
    max_waste_blocks_per_req = 0.0
    t0 = time.perf_counter()
    out_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            out_tokens += len(out.outputs[0].token_ids)
        running = engine.scheduler.running
        if running:
            allocated = sum(len(kv.block_ids(r.request_id)) for r in running) * bs
            tokens = sum(r.num_computed_tokens for r in running)
            waste_slots += allocated - tokens
            used_slots += allocated
            max_waste_blocks_per_req = max(max_waste_blocks_per_req, (allocated - tokens) / bs / len(running))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak_nvml = sampler.stop()
    return {
        "budget": budget,
        "engine": {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens},
        "budget_bytes": plan.budget_bytes,
        "memory_plan": plan.__dict__,
        "peak_process_memory_bytes_nvml": peak_nvml,
        "peak_torch_reserved_bytes": torch.cuda.max_memory_reserved(),
        "within_budget": peak_nvml <= plan.budget_bytes and torch.cuda.max_memory_reserved() <= plan.budget_bytes,
        "kv_waste_fraction": waste_slots / max(used_slots, 1),
        "max_kv_waste_blocks_per_running_request": max_waste_blocks_per_req,
        "num_preemptions": engine.get_stats().num_preemptions,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "elapsed_s": elapsed,
    }


def spawn(budget: str, args: argparse.Namespace) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", budget, "--num-requests", str(args.num_requests),
                             "--shape", args.shape, "--max-num-seqs", str(args.max_num_seqs),
                             "--max-num-batched-tokens", str(args.max_num_batched_tokens)],
                            stdout=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=900)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"exit code {proc.returncode}", "output": out[-2000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="*", default=["4GiB", "8GiB", "20GiB"])
    ap.add_argument("--side-by-side", type=float, default=None, help="fraction of the device for each of two")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.num_requests, args.shape, args.max_num_seqs,
                                 args.max_num_batched_tokens)))
        return

    env = environment()
    result = {**env, "workload": {"name": "memory budgets", "shape": args.shape, "weights": "random bf16",
                                  "requests": f"first {args.num_requests} of workload A"}}
    if args.side_by_side:
        total = torch.cuda.get_device_properties(0).total_memory
        budget = f"{int(total * args.side_by_side)}"
        procs = [spawn(budget, args) for _ in range(2)]
        runs = [collect(p) for p in procs]
        result["workload"]["name"] = f"two engines side by side, {args.side_by_side:.0%} of the device each"
        result["side_by_side"] = runs
        result["all_within_budget"] = all(r.get("within_budget") for r in runs)
        name = "side_by_side"
    else:
        runs = [collect(spawn(b, args)) for b in args.budgets]
        result["budgets"] = runs
        result["all_within_budget"] = all(r.get("within_budget") for r in runs)
        name = "memory_budget"
    save_result(name, result)
    for r in runs:
        if "error" in r:
            print("ERROR", r["error"], r.get("output", "")[-800:])
            continue
        print(f"budget {r['budget_bytes'] / 2**30:.2f} GiB: peak NVML {r['peak_process_memory_bytes_nvml'] / 2**30:.2f}"
              f" GiB, torch reserved {r['peak_torch_reserved_bytes'] / 2**30:.2f} GiB, within={r['within_budget']},"
              f" KV waste {100 * r['kv_waste_fraction']:.2f}% (max {r['max_kv_waste_blocks_per_running_request']:.2f}"
              f" blocks/req), {r['output_tokens_per_s']:.0f} tok/s, preemptions {r['num_preemptions']}")


if __name__ == "__main__":
    main()
