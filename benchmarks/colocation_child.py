"""One engine of ``colocation.py`` in its own process: loads, prints READY, then runs the phases its parent
sends on stdin (``run C SECONDS WARMUP``: keep C requests in flight, report the generation tokens of the window
as one JSON line) until ``quit``."""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_config_dir

SMOKE_MODEL = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True, "torch_dtype": "float32"}


def _new_request(rng: random.Random, smoke: bool) -> tuple[list[int], int]:
    if smoke:
        return [rng.randint(0, 500) for _ in range(rng.randint(8, 48))], rng.randint(4, 24)
    prompt = [rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
    return prompt, rng.randint(100, 1024)


def _run_phase(engine, rng: random.Random, concurrency: int, seconds: float, warmup: float, smoke: bool) -> dict:
    from slicelm.sampling_params import SamplingParams

    live: set[str] = set()

    def top_up() -> None:
        while len(live) < concurrency:
            prompt, out_len = _new_request(rng, smoke)
            rid = engine.next_request_id()
            live.add(rid)
            engine.add_request(rid, {"prompt_token_ids": prompt},
                               SamplingParams(max_tokens=out_len, ignore_eos=True), stream=False)

    t_start = time.perf_counter()
    mark = None
    while True:
        top_up()
        live.difference_update(o.request_id for o in engine.step() if o.finished)
        now = time.perf_counter()
        if mark is None and now - t_start >= warmup:
            mark = (now, engine.get_stats().num_generation_tokens)
        if mark is not None and now - mark[0] >= seconds:
            tokens = engine.get_stats().num_generation_tokens - mark[1]
            elapsed = now - mark[0]
            break
    engine.abort_request(list(live))
    while engine.has_unfinished_requests():
        engine.step()
    return {"concurrency": concurrency, "output_tokens": tokens, "seconds": elapsed,
            "output_tokens_per_s": tokens / elapsed}


def child(args: argparse.Namespace) -> None:
    from slicelm.config import EngineArgs
    from slicelm.engine.engine import LLMEngine

    with tempfile.TemporaryDirectory() as root:
        if args.smoke:
            (Path(root) / "config.json").write_text(json.dumps(SMOKE_MODEL))
            where = dict(model=root, device="cpu", kv_cache_memory_bytes=int(args.budget), max_model_len=512)
        else:
            where = dict(model=write_config_dir("qwen3-0.6b", root), gpu_memory_budget=args.budget,
                         max_model_len=4096)
        engine = LLMEngine(EngineArgs(**where, load_format="dummy", skip_tokenizer_init=True,
                                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192,
                                      elastic_kv=args.elastic, green_context_sms=args.green_context_sms))
    rng = random.Random(args.seed)
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        concurrency, seconds, warmup = int(cmd[1]), float(cmd[2]), float(cmd[3])
        print(json.dumps(_run_phase(engine, rng, concurrency, seconds, warmup, args.smoke)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("budget", help="the engine's memory budget (GPU) or KV bytes (--smoke)")
    ap.add_argument("--max-num-seqs", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny model, short requests")
    ap.add_argument("--elastic", action="store_true", help="elastic KV (the parent's broker in the env)")
    ap.add_argument("--green-context-sms", default=None)
    child(ap.parse_args())


if __name__ == "__main__":
    main()
