"""Workload B: batch-1 decode latency (TPOT) of a Llama-3.1-8B-shaped model, against the floor.

    python benchmarks/latency.py                     # 128-token prompt, 256 new tokens, random bf16 weights

The floor is the weights' bytes over the measured device-to-device copy rate: every decode step
must read every weight once.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, SHAPES, device_slug, environment, measure_copy_bandwidth, save_result, write_config_dir


def time_graph_replay(engine, iters: int = 50) -> float | None:
    """GPU time of one batch-1 decode graph replay: the floor our host-side work adds to."""
    graphs = engine.worker.runner.graphs
    if graphs is None or 1 not in graphs.graphs:
        return None
    g = graphs.graphs[1]
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def profile_graph_replay(engine, name: str, env: dict, iters: int = 20) -> list[dict]:
    """torch.profiler over ``iters`` batch-1 graph replays: the kernels of one decode step, saved as a
    table beside the results (``<name>_<device>.txt``) and returned as rows (us per step)."""
    from torch.profiler import ProfilerActivity, profile

    graphs = engine.worker.runner.graphs
    if graphs is None or 1 not in graphs.graphs:
        return []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            graphs.graphs[1].replay()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)
    (RESULTS / f"{name}_{device_slug(env['device'])}.txt").write_text(f"{env['device']} {env['commit']}\n{table}\n")
    print(table)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    return [{"name": e.key[:120], "us_per_step": e.self_device_time_total / iters, "calls_per_step": e.count / iters}
            for e in rows[:30] if e.self_device_time_total > 0]


def decode_runs(engine, prompt_len: int, new_tokens: int, repeats: int) -> list[dict]:
    """``repeats`` batch-1 generations (after one warm-up) of ``new_tokens`` from a random ``prompt_len`` prompt:
    TTFT, mean / median gap between steps (TPOT) and end-to-end time of each."""
    from slicelm.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 10000, (prompt_len,), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    runs = []
    for r in range(repeats + 1):  # the first run warms up
        engine.add_request(f"r{r}", {"prompt_token_ids": prompt}, params)
        stamps = []
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            stamps.append(time.perf_counter())
        if r == 0:
            continue
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        runs.append({"ttft_ms": (stamps[0] - t0) * 1e3, "tpot_ms_mean": statistics.fmean(gaps) * 1e3,
                     "tpot_ms_median": statistics.median(gaps) * 1e3, "e2e_s": stamps[-1] - t0})
    return runs


def decode_parser(doc: str) -> argparse.ArgumentParser:
    """Workload B's flags (shape, prompt length, new tokens, repeats)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    return ap


def main() -> None:
    ap = decode_parser(__doc__)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--name", default="latency")
    ap.add_argument("--profile", action="store_true", help="also save a kernel table of the batch-1 graph replay")
    args = ap.parse_args()

    from slicelm.config import EngineArgs
    from slicelm.engine.engine import LLMEngine

    env = environment()
    bandwidth = measure_copy_bandwidth()
    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine(EngineArgs(model=write_config_dir(args.shape, root), load_format="dummy",
                                      skip_tokenizer_init=True, max_num_seqs=8, max_model_len=4096,
                                      enforce_eager=args.enforce_eager))
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.worker.model.parameters())
    floor_ms = weight_bytes / bandwidth * 1e3
    runs = decode_runs(engine, args.prompt_len, args.new_tokens, args.repeats)
    tpot = statistics.median(r["tpot_ms_mean"] for r in runs)
    graph_ms = time_graph_replay(engine)
    result = {
        **env,
        "workload": {"name": "B (batch-1 decode latency)", "shape": args.shape, "model_config": SHAPES[args.shape],
                     "weights": "random bf16 (load_format=dummy)", "prompt_tokens": args.prompt_len,
                     "new_tokens": args.new_tokens, "batch_size": 1, "enforce_eager": args.enforce_eager},
        "tpot_ms": tpot,
        "runs": runs,
        "graph_replay_ms": graph_ms,  # the model's decode step alone (GPU time, no host work)
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "floor_tpot_ms": floor_ms,
        "ratio_to_floor": tpot / floor_ms,
        "peak_memory_bytes": torch.cuda.max_memory_reserved(),
        "memory_budget_bytes": engine.worker.memory_plan.budget_bytes if engine.worker.memory_plan else None,
    }
    if args.profile:
        result["replay_kernels"] = profile_graph_replay(engine, f"{args.name}_{args.shape}", env)
    save_result(f"{args.name}_{args.shape}", result)
    print(f"\n{env['device']}: TPOT {tpot:.2f} ms (floor {floor_ms:.2f} ms, {tpot / floor_ms:.2f}x), "
          f"TTFT {statistics.median(r['ttft_ms'] for r in runs):.1f} ms; graph replay alone {graph_ms}")


if __name__ == "__main__":
    main()
