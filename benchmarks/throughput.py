"""Workload A: offline throughput (256 requests, nano-vllm's table), with the floor and a peer.

    python benchmarks/throughput.py                      # Qwen3-0.6B shape, random bf16 weights, H100/H200
    python benchmarks/throughput.py --num-requests 16 --shape qwen3-0.6b --no-peer   # a quick look

Prints and saves output tok/s, total tok/s, the memory-bandwidth floor computed from the measured
copy rate and the ratio to it, the transformers ``generate_batch`` peer measured in the same run
(its own process), and peak memory against the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, environment, measure_copy_bandwidth, save_result, workload_a, write_config_dir


def measure_matmul_flops(n: int = 8192, iters: int = 10) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def floor_seconds(shape: dict, reqs: list[tuple[list[int], int]], bandwidth: float, flops: float) -> dict:
    """Bytes that must move (KV reads of every decode step + weights once per step) and prefill FLOPs."""
    L, kvh = shape["num_hidden_layers"], shape["num_key_value_heads"]
    hd = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    kv_per_token = L * 2 * kvh * hd * 2  # bf16
    kv_bytes = sum(kv_per_token * (len(p) * o + o * (o - 1) // 2) for p, o in reqs)
    h, ffn, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    q = shape["num_attention_heads"] * hd
    layer_params = h * (q + 2 * kvh * hd) + q * h + 3 * h * ffn
    params = L * layer_params + vocab * h * (1 if shape.get("tie_word_embeddings") else 2)
    steps = max(o for _, o in reqs)
    weight_bytes = 2 * params * steps
    prompt_tokens = sum(len(p) for p, _ in reqs)
    attn_flops = sum(4 * L * q * len(p) * len(p) / 2 for p, _ in reqs)
    prefill_flops = 2 * params * prompt_tokens + attn_flops
    t = (kv_bytes + weight_bytes) / bandwidth + prefill_flops / flops
    return {"kv_bytes": kv_bytes, "weight_bytes": weight_bytes, "prefill_flops": prefill_flops,
            "params": params, "floor_s": t}


def triton_cache_entries() -> set[str]:
    """Kernels in Triton's on-disk cache (one ``<hash>/<name>.json`` per compiled variant)."""
    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return {f"{p.parent.name[:8]}/{p.stem}" for p in root.glob("*/*.json") if not p.stem.startswith("__grp__")}


def run_peer(shape: str, num_requests: int, timeout: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, str(Path(__file__).parent / "peers" / "hf_generate_batch.py"),
               "--shape", shape, "--num-requests", str(num_requests), "--out", f.name]
        try:
            subprocess.run(cmd, check=False, timeout=timeout)
            return json.loads(Path(f.name).read_text() or "{}")
        except (subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            return {"error": f"{type(e).__name__}: {e}"}


def run_workload_a(llm, reqs: list[tuple[list[int], int]], temperature: float = 0.0) -> tuple[float, int]:
    """A short warm-up, then every request at once, timed from the first in to the last token out;
    (seconds, output tokens). Peak memory stats are reset after the warm-up."""
    from slicelm import SamplingParams

    cuda = torch.cuda.is_available()
    warm = [({"prompt_token_ids": p[:64]}, SamplingParams(max_tokens=8, ignore_eos=True)) for p, _ in reqs[:8]]
    llm.generate([w[0] for w in warm], [w[1] for w in warm], use_tqdm=False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(temperature=temperature, max_tokens=o, ignore_eos=True, seed=i)
              for i, (_, o) in enumerate(reqs)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert out_tokens == sum(o for _, o in reqs), "every request must generate exactly its output length"
    return elapsed, out_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--gpu-memory-budget", default=None)
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--peer-timeout", type=int, default=420)
    ap.add_argument("--name", default="throughput")
    args = ap.parse_args()

    from slicelm import LLM

    env = environment()
    reqs = workload_a(args.num_requests)
    shape = SHAPES[args.shape]
    bandwidth = measure_copy_bandwidth()
    flops = measure_matmul_flops()
    floor = floor_seconds(shape, reqs, bandwidth, flops)
    peer = run_peer(args.shape, args.num_requests, args.peer_timeout) if args.peer else None

    with tempfile.TemporaryDirectory() as root:
        llm = LLM(write_config_dir(args.shape, root), load_format="dummy", skip_tokenizer_init=True,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=4096, enforce_eager=args.enforce_eager,
                  gpu_memory_utilization=args.gpu_memory_utilization, gpu_memory_budget=args.gpu_memory_budget)
    plan = llm.engine.worker.memory_plan
    compiled_before = triton_cache_entries()
    elapsed, out_tokens = run_workload_a(llm, reqs, args.temperature)
    compiled_in_run = sorted(triton_cache_entries() - compiled_before)  # should be empty: warm-up compiles
    prompt_tokens = sum(len(p) for p, _ in reqs)
    stats = llm.engine.get_stats()

    floor_tps = out_tokens / floor["floor_s"]
    result = {
        **env,
        "workload": {"name": "A (offline throughput)", "shape": args.shape, "model_config": shape,
                     "weights": "random bf16 (load_format=dummy)", "num_requests": len(reqs),
                     "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
                     "sampling": {"temperature": args.temperature, "ignore_eos": True},
                     "engine": {"max_num_seqs": args.max_num_seqs,
                                "max_num_batched_tokens": args.max_num_batched_tokens,
                                "enforce_eager": args.enforce_eager, "block_size": 16}},
        "elapsed_s": elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + prompt_tokens) / elapsed,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": flops,
        "floor": floor,
        "floor_output_tokens_per_s": floor_tps,
        "fraction_of_floor": (out_tokens / elapsed) / floor_tps,
        "num_preemptions": stats.num_preemptions,
        "triton_kernels_compiled_in_timed_run": compiled_in_run,
        "peak_memory_bytes": torch.cuda.max_memory_reserved(),
        "memory_budget_bytes": plan.budget_bytes if plan else None,
        "memory_plan": plan.__dict__ if plan else None,
    }
    if peer is not None:
        result["peer"] = peer.get("peer", "transformers generate_batch")
        result["peer_result"] = peer
        if "peer_output_tokens_per_s" in peer:
            result["peer_output_tokens_per_s"] = peer["peer_output_tokens_per_s"]
            result["speedup_vs_peer"] = result["output_tokens_per_s"] / peer["peer_output_tokens_per_s"]
    save_result(f"{args.name}_{args.shape}", result)
    print(f"\n{env['device']}: {result['output_tokens_per_s']:.0f} output tok/s "
          f"({result['total_tokens_per_s']:.0f} total) in {elapsed:.2f}s; floor {floor_tps:.0f} tok/s "
          f"-> {100 * result['fraction_of_floor']:.1f}% of floor; preemptions {stats.num_preemptions}")
    if "speedup_vs_peer" in result:
        print(f"peer {result['peer_output_tokens_per_s']:.0f} tok/s -> {result['speedup_vs_peer']:.1f}x")


if __name__ == "__main__":
    main()
