"""A-quant: workload A's 256 requests on the Llama-3.1-8B shape in bf16, AWQ 4-bit g128 and FP8 W8A8 (online
``--quantization fp8``: per-channel e4m3 weights, dynamic per-token activations), one engine after the other in
one run. Goals: FP8 >= 1.0x bf16, AWQ >= 0.8x bf16 output tokens/s.

    python benchmarks/throughput_quant.py                       # H200: ~4 min (three 8B engines, 3 x 140k tokens)
    python benchmarks/throughput_quant.py --formats bf16,awq    # a subset
    python benchmarks/throughput_quant.py --smoke               # CPU, tiny shape, 8 short requests
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AWQ_G128, SHAPES, environment, run_child, save_result, workload_a, write_config_dir

FORMATS = {"bf16": (None, None), "awq": (AWQ_G128, None), "fp8": (None, "fp8")}


def run_format(args: argparse.Namespace, root: str, fmt: str, reqs: list[tuple[list[int], int]]) -> dict:
    from slicelm import LLM, SamplingParams

    quant_config, quantization = FORMATS[fmt]
    extra = {"device": "cpu", "max_model_len": 1024} if args.smoke else {
        "gpu_memory_utilization": 0.9, "max_model_len": 4096}
    t_build = time.perf_counter()
    llm = LLM(write_config_dir(args.shape, root, quant_config), load_format="dummy", skip_tokenizer_init=True,
              quantization=quantization, dtype="bfloat16", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, **extra)
    build_s = time.perf_counter() - t_build
    warm = [{"prompt_token_ids": p[:64]} for p, _ in reqs[:8]]
    llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in reqs], params, use_tqdm=False)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert out_tokens == sum(o for _, o in reqs), "every request must generate exactly its output length"
    plan = llm.engine.worker.memory_plan
    result = {"elapsed_s": elapsed, "output_tokens_per_s": out_tokens / elapsed,
              "total_tokens_per_s": (out_tokens + sum(len(p) for p, _ in reqs)) / elapsed,
              "engine_build_s": build_s, "num_preemptions": llm.engine.get_stats().num_preemptions,
              "weights_bytes": plan.weights_bytes if plan else None,
              "kv_blocks": llm.engine.cache_config.num_blocks,
              "peak_memory_bytes": torch.cuda.max_memory_reserved() if cuda else None,
              "memory_budget_bytes": plan.budget_bytes if plan else None}
    del llm, outs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(f"{fmt}: {result['output_tokens_per_s']:.0f} output tok/s in {elapsed:.1f} s", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--formats", default="bf16,awq,fp8", help="comma-separated subset of bf16, awq, fp8")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, 8 requests of <= 16 tokens")
    ap.add_argument("--child", choices=list(FORMATS), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise SystemExit(f"--formats: unknown {sorted(unknown)} (bf16, awq, fp8)")
    reqs = workload_a(args.num_requests)
    if args.smoke:
        args.shape, args.max_num_seqs, args.max_num_batched_tokens = "tiny-llama", 8, 512
        reqs = [(p[:32], min(o, 16)) for p, o in workload_a(8)]
    if args.child:  # one engine in this process (see common.run_child)
        with tempfile.TemporaryDirectory() as root:
            Path(args.child_out).write_text(json.dumps(run_format(args, root, args.child, reqs)))
        return
    env = environment()
    argv = ["--shape", args.shape, "--num-requests", str(args.num_requests), "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens), *(["--smoke"] if args.smoke else [])]
    results = {fmt: run_child(__file__, [*argv, "--child", fmt]) for fmt in formats}
    ratios = {f"{fmt}_vs_bf16": results[fmt]["output_tokens_per_s"] / results["bf16"]["output_tokens_per_s"]
              for fmt in formats if fmt != "bf16" and "bf16" in results}
    result = {
        **env,
        "workload": {"name": "A-quant (workload A in bf16 / AWQ 4-bit g128 / FP8 W8A8)", "shape": args.shape,
                     "model_config": SHAPES[args.shape], "num_requests": len(reqs),
                     "prompt_tokens": sum(len(p) for p, _ in reqs), "output_tokens": sum(o for _, o in reqs),
                     "awq_config": AWQ_G128, "fp8": "--quantization fp8 (per-channel weights, per-token activations)",
                     "weights": "random (load_format=dummy), activations bf16", "sampling": "greedy, ignore_eos",
                     "engine": {"max_num_seqs": args.max_num_seqs,
                                "max_num_batched_tokens": args.max_num_batched_tokens}},
        "formats": results, **ratios,
        "output_tokens_per_s": {fmt: r["output_tokens_per_s"] for fmt, r in results.items()},
    }
    save_result(f"throughput_quant_{args.shape}", result)
    print(f"\n{env['device']}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
