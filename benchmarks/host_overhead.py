"""Host work per engine step: scheduling, input tensors, sampling metadata, reading outputs back.

    python benchmarks/host_overhead.py                 # 256 running sequences, as in workload A

On a GPU this is the time async scheduling must hide behind each device step (~7 ms for workload
A at 256 sequences on an H200). To measure the host path alone, the model call is replaced by
zero logits over a small vocabulary (on a GPU the sampler's vocabulary-sized work runs on the device):
everything else (scheduler, KV cache manager, runner input building, sampler,
placeholders, stop checks, outputs) runs as in production, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, save_result, workload_a

TINY = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 32,
        "vocab_size": 1024, "tie_word_embeddings": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--name", default="host_overhead")
    args = ap.parse_args()

    from slicelm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(TINY))
        llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, device="cpu", max_num_seqs=args.num_requests,
                  max_model_len=4096, max_num_batched_tokens=1 << 20, kv_cache_memory_bytes=1 << 30,
                  async_scheduling=True)
    engine = llm.engine
    runner = engine.worker.runner
    vocab = TINY["vocab_size"]
    runner.run_model = lambda inputs: torch.zeros(len(inputs.sampling), vocab)  # host path only

    reqs = workload_a(args.num_requests)
    for i, (prompt, _) in enumerate(reqs):
        engine.add_request(str(i), {"prompt_token_ids": [t % vocab for t in prompt]},
                           SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True), stream=False)
    engine.step()  # the prefill step (all prompts at once)
    times = []
    while engine.has_unfinished_requests():
        running = len(engine.scheduler.running)
        t0 = time.perf_counter()
        engine.step()
        if running == args.num_requests:
            times.append(time.perf_counter() - t0)
    result = {
        **environment(),
        "workload": {"name": "host work per decode step", "running_sequences": args.num_requests,
                     "prompts": "workload A prompt lengths", "vocab_size": vocab,
                     "model_call": "replaced by zero logits (host path only)"},
        "steps_measured": len(times),
        "ms_per_step_median": 1e3 * statistics.median(times),
        "ms_per_step_p90": 1e3 * sorted(times)[int(0.9 * len(times))],
    }
    save_result(args.name, result)
    print(f"{args.num_requests} sequences: {result['ms_per_step_median']:.2f} ms of host work per decode step "
          f"(p90 {result['ms_per_step_p90']:.2f})")


if __name__ == "__main__":
    main()
