"""Peer for workload A: transformers' continuous batching (``generate_batch``, ``paged|sdpa``).

Runs in its own process (the engine under test caps its allocator). transformers has no per-request
output length, so every request asks for the workload's mean (547) and we count what it generated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import SHAPES, workload_a


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--attn", default="paged|sdpa")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import transformers

    cfg = {k: v for k, v in SHAPES[args.shape].items() if k not in ("architectures", "torch_dtype")}
    config = transformers.AutoConfig.for_model(**cfg)
    config.eos_token_id = None
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                              attn_implementation=args.attn).eval()
    reqs = workload_a(args.num_requests)
    prompts = [p for p, _ in reqs]
    mean_out = round(sum(o for _, o in reqs) / len(reqs))
    gen_cfg = transformers.GenerationConfig(max_new_tokens=mean_out, do_sample=False, eos_token_id=None,
                                            pad_token_id=0)
    result = {"peer": f"transformers {transformers.__version__} generate_batch ({args.attn})",
              "max_new_tokens": mean_out, "num_requests": len(prompts)}
    try:
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=prompts, generation_config=gen_cfg)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        generated = sum(len(o.generated_tokens) for o in outs.values())
        result.update(elapsed_s=elapsed, generated_tokens=generated, completed=len(outs),
                      peer_output_tokens_per_s=generated / elapsed)
    except Exception as e:  # the peer failing is a result too (it OOMs with CUDA graphs on some shapes)
        result.update(error=f"{type(e).__name__}: {e}"[:2000])
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
