"""Workload A-MoE: offline throughput of a Qwen3-30B-A3B shape (48 layers, 128 experts, top-8,
moe_intermediate 768, random bf16 weights) on workload A, against its memory floor; and the fused-MoE
kernel alone against the per-expert loop, in the same run.

    python benchmarks/moe.py            # H200: both parts, ~3 min; writes results/moe_qwen3-30b-a3b_<device>.json
    python benchmarks/moe.py --sweep    # H200: the fused kernel's block-size choices side by side (a table)
    python benchmarks/moe.py --smoke    # CPU: a tiny MoE shape, 6 short requests; checks the script end to end

Floor per engine step = bytes that step must read once, at the device-to-device copy rate measured in
the same run: attention + norms + router weights of every layer, the LM head, and for every layer the
experts the step's tokens hit (at most all 128), plus the KV bytes of every generated token's context.
The step's tokens are recorded from the scheduler; experts hit by n tokens are taken as
``E * (1 - (1 - k/E)^n)``, the expectation under uniform routing (random weights route near-uniformly).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, measure_copy_bandwidth, save_result, workload_a

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
    "tie_word_embeddings": False, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960, "torch_dtype": "bfloat16", "attention_bias": False,
}
TINY = {**QWEN3_30B_A3B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 10240, "max_position_embeddings": 2048}


def step_bytes(shape: dict, num_tokens: int) -> float:
    """Weight bytes (bf16) a step of ``num_tokens`` tokens must read at least once."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    experts, k = shape["num_experts"], shape["num_experts_per_tok"]
    attention = h * (q + 2 * kv) + q * h + 2 * h + 2 * shape["head_dim"]  # qkv, o, two norms, qk-norm
    router = experts * h
    expert = 3 * h * shape["moe_intermediate_size"]
    hit = experts * (1 - (1 - k / experts) ** num_tokens)
    lm_head = shape["vocab_size"] * h
    return 2 * (layers * (attention + router + hit * expert) + lm_head + h)


def kv_bytes(shape: dict, reqs: list[tuple[list[int], int]]) -> float:
    per_token = shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * shape["head_dim"] * 2
    return sum(per_token * (len(p) * o + o * (o - 1) // 2) for p, o in reqs)


def floor(shape: dict, reqs: list[tuple[list[int], int]], step_tokens: list[int], bandwidth: float) -> dict:
    weights = sum(step_bytes(shape, n) for n in step_tokens)
    kv = kv_bytes(shape, reqs)
    return {"weight_bytes": weights, "kv_bytes": kv, "steps": len(step_tokens),
            "floor_s": (weights + kv) / bandwidth}


def timed(fn, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs (CUDA events), after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def layer_inputs(shape: dict, tokens: int, device: str):
    from slicelm.layers.moe.router import select_experts

    e, h, i = shape["num_experts"], shape["hidden_size"], shape["moe_intermediate_size"]
    k = shape["num_experts_per_tok"]
    g = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, h, device=device, generator=g).bfloat16()
    w13 = (torch.randn(e, 2 * i, h, device=device, generator=g) * 0.02).bfloat16()
    w2 = (torch.randn(e, h, i, device=device, generator=g) * 0.02).bfloat16()
    weights, ids = select_experts(torch.randn(tokens, e, device=device, generator=g), k, True)
    return x, w13, w2, weights, ids


def kernel_vs_loop(shape: dict, token_counts: list[int], bandwidth: float) -> list[dict]:
    """One MoE layer: the fused Triton path against the per-expert torch loop (cuBLAS per expert)."""
    from slicelm.layers.moe.fused_moe import fused_experts, moe_config
    from slicelm.layers.moe.layer import torch_experts

    rows = []
    for tokens in token_counts:
        inputs = layer_inputs(shape, tokens, "cuda")
        _, w13, w2, _, ids = inputs
        fused = timed(functools.partial(fused_experts, *inputs), 20)
        loop = timed(functools.partial(torch_experts, *inputs), 5)
        hit = int(torch.unique(ids).numel())
        moved = hit * (w13[0].numel() + w2[0].numel()) * 2
        cfg = dataclasses.asdict(moe_config(tokens, w13.shape[0], ids.shape[1]))
        rows.append({"tokens": tokens, "experts_hit": hit, "config": cfg,
                     "fused_us": fused * 1e6, "loop_us": loop * 1e6, "speedup": loop / fused,
                     "fused_weight_bytes_per_s": moved / fused, "fraction_of_copy_rate": moved / fused / bandwidth})
        print(f"  T={tokens:5d}: fused {fused * 1e6:8.1f} us, loop {loop * 1e6:9.1f} us ({loop / fused:5.1f}x); "
              f"{hit} experts, {moved / fused / 1e12:.2f} TB/s = {100 * moved / fused / bandwidth:.0f}% of copy")
    return rows


def sweep(shape: dict) -> None:
    """The fused kernel under each candidate block configuration, per step size: one table."""
    from slicelm.layers.moe.fused_moe import MoEConfig, fused_experts, moe_config

    candidates = [MoEConfig(16, 64, 128, 128, 1, 4, 4), MoEConfig(16, 32, 64, 256, 1, 4, 3),
                  MoEConfig(16, 64, 128, 64, 1, 4, 5), MoEConfig(32, 64, 128, 128, 8, 4, 3),
                  MoEConfig(32, 128, 256, 64, 8, 8, 3), MoEConfig(64, 64, 128, 64, 8, 4, 3),
                  MoEConfig(64, 128, 128, 64, 8, 8, 3), MoEConfig(128, 64, 128, 64, 8, 8, 3),
                  MoEConfig(128, 128, 256, 64, 8, 8, 3)]
    print(f"{'T':>6} {'BM':>4} {'BNgu':>5} {'BNd':>4} {'BK':>4} {'GM':>3} {'w':>2} {'s':>2} {'us':>9}  chosen")
    for tokens in (1, 16, 64, 128, 256, 512, 1024, 2048, 8192):
        inputs = layer_inputs(shape, tokens, "cuda")
        chosen = moe_config(tokens, shape["num_experts"], shape["num_experts_per_tok"])
        for cfg in candidates:
            try:
                t = f"{timed(functools.partial(fused_experts, *inputs, cfg), 10) * 1e6:>9.1f}"
            except Exception as e:  # e.g. triton's OutOfResources for a too-large tile: a row, not a crash
                t = f"{type(e).__name__[:9]:>9}"
            mark = "  <-" if cfg == chosen else ""
            print(f"{tokens:>6} {cfg.block_m:>4} {cfg.block_n_gate_up:>5} {cfg.block_n_down:>4} {cfg.block_k:>4} "
                  f"{cfg.group_m:>3} {cfg.num_warps:>2} {cfg.num_stages:>2} {t}{mark}")


def run_workload(shape: dict, reqs: list[tuple[list[int], int]], args: argparse.Namespace) -> dict:
    from slicelm import LLM, SamplingParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "config.json").write_text(json.dumps(shape))
        llm = LLM(root, load_format="dummy", skip_tokenizer_init=True, device=device,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=2048, gpu_memory_utilization=args.gpu_memory_utilization)
    warm = [{"prompt_token_ids": p[:64]} for p, _ in reqs[:8]]
    llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    sched = llm.engine.scheduler
    step_tokens: list[int] = []
    schedule = sched.schedule

    def recording_schedule():
        out = schedule()
        if out.num_tokens:
            step_tokens.append(out.num_tokens)
        return out

    sched.schedule = recording_schedule
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in reqs], params, use_tqdm=False)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    sched.schedule = schedule
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert out_tokens == sum(o for _, o in reqs), "every request must generate exactly its output length"
    plan = llm.engine.worker.memory_plan
    return {"elapsed_s": elapsed, "output_tokens": out_tokens, "step_tokens": step_tokens,
            "num_preemptions": llm.engine.get_stats().num_preemptions,
            "peak_memory_bytes": torch.cuda.max_memory_reserved() if device == "cuda" else None,
            "memory_budget_bytes": plan.budget_bytes if plan else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU check of the script at a tiny shape")
    ap.add_argument("--sweep", action="store_true", help="only the fused kernel's block-size table (GPU)")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = ap.parse_args()
    if args.sweep:
        sweep(QWEN3_30B_A3B)
        return
    shape = TINY if args.smoke else QWEN3_30B_A3B
    reqs = workload_a(6 if args.smoke else args.num_requests)
    if args.smoke:  # short prompts and outputs: the CPU runs the torch path
        reqs = [(p[:24], min(o, 12)) for p, o in reqs]
    env = environment()
    cuda = torch.cuda.is_available()
    bandwidth = measure_copy_bandwidth() if cuda else 1e10  # CPU: a nominal 10 GB/s (the floor is not the point)
    kernel = kernel_vs_loop(shape, [1, 16, 64, 256, 1024, 4096], bandwidth) if cuda else []
    run = run_workload(shape, reqs, args)
    fl = floor(shape, reqs, run["step_tokens"], bandwidth)
    tps = run["output_tokens"] / run["elapsed_s"]
    floor_tps = run["output_tokens"] / fl["floor_s"]
    prompt_tokens = sum(len(p) for p, _ in reqs)
    result = {
        **env,
        "workload": {"name": "A-MoE (offline throughput)", "shape": "tiny-moe" if args.smoke else "qwen3-30b-a3b",
                     "model_config": shape, "weights": "random bf16 (load_format=dummy)", "num_requests": len(reqs),
                     "prompt_tokens": prompt_tokens, "output_tokens": run["output_tokens"],
                     "sampling": {"temperature": 0, "ignore_eos": True},
                     "engine": {"max_num_seqs": args.max_num_seqs, "max_model_len": 2048,
                                "max_num_batched_tokens": args.max_num_batched_tokens, "block_size": 16}},
        "elapsed_s": run["elapsed_s"],
        "output_tokens_per_s": tps,
        "total_tokens_per_s": (run["output_tokens"] + prompt_tokens) / run["elapsed_s"],
        "copy_bandwidth_bytes_per_s": bandwidth,
        "floor": fl,
        "floor_output_tokens_per_s": floor_tps,
        "fraction_of_floor": tps / floor_tps,
        "num_preemptions": run["num_preemptions"],
        "fused_moe_vs_per_expert_loop": kernel,
        "peak_memory_bytes": run["peak_memory_bytes"],
        "memory_budget_bytes": run["memory_budget_bytes"],
    }
    save_result(f"moe_{result['workload']['shape']}", result)
    print(f"\n{env['device']}: {tps:.0f} output tok/s in {run['elapsed_s']:.1f}s over {fl['steps']} steps; floor "
          f"{floor_tps:.0f} tok/s -> {100 * tps / floor_tps:.1f}% of floor; preemptions {run['num_preemptions']}")


if __name__ == "__main__":
    main()
