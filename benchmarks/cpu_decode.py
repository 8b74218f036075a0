"""CPU batch-1 decode: slicelm's engine vs transformers, same weights (float32), same prompt, greedy.

    python benchmarks/cpu_decode.py                   # SmolLM2-135M (bundled GGUF), 128 new tokens, 5 rounds
    python benchmarks/cpu_decode.py --smoke           # 2 rounds of 8 tokens (checks the script)

Both sides get the weights slicelm loads (the GGUF dequantized to float32, under HF names): transformers
builds ``LlamaForCausalLM`` from the same config dict and loads them. The decode rate of a side is
``(N - 1) / (t(N new tokens) - t(1 new token))``: the prefill and the first token cancel out. Rounds
alternate the two sides (A/B interleaved, the machine's cores are shared) and the figures are medians.
Both sides use the same torch thread count (``--threads``, default torch's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, save_result

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def load_slicelm(model: str) -> Any:
    from slicelm import LLM

    return LLM(model, device="cpu", dtype="float32", max_model_len=2048, max_num_seqs=1,
               enable_prefix_caching=False)


def load_transformers(model: str) -> torch.nn.Module:
    """transformers' Llama with the weights slicelm loads (GGUF dequantized to float32)."""
    import transformers

    from slicelm.loader.model_files import resolve_model

    source = resolve_model(model)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in source.config.items() if k != "torch_dtype"})
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    missing, unexpected = hf.load_state_dict(dict(source.iter_weights()), strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in m for m in missing), missing  # tied embeddings
    hf.tie_weights()
    return hf


def time_slicelm(llm: Any, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    from slicelm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    return time.perf_counter() - t0, list(out[0].outputs[0].token_ids)


@torch.inference_mode()
def time_transformers(hf: torch.nn.Module, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[0, len(ids):].tolist()


def decode_rate(timer: Any, model: Any, ids: list[int], n: int) -> tuple[float, list[int]]:
    t1, _ = timer(model, ids, 1)
    tn, tokens = timer(model, ids, n)
    return (n - 1) / max(tn - t1, 1e-9), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--name", default="cpu_decode")
    args = ap.parse_args()
    if args.smoke:
        args.new_tokens, args.rounds, args.name = 8, 2, None
    if args.threads:
        torch.set_num_threads(args.threads)

    llm = load_slicelm(args.model)
    hf = load_transformers(args.model)
    ids = llm.get_tokenizer().encode(PROMPT)
    for timer, m in ((time_slicelm, llm), (time_transformers, hf)):  # warm-up
        timer(m, ids, 4)
    rates: dict[str, list[float]] = {"slicelm": [], "transformers": []}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        order = [("slicelm", time_slicelm, llm), ("transformers", time_transformers, hf)]
        for name, timer, m in order if r % 2 == 0 else order[::-1]:
            rate, tokens[name] = decode_rate(timer, m, ids, args.new_tokens)
            rates[name].append(rate)
        print(f"round {r}: slicelm {rates['slicelm'][-1]:.1f} tok/s, "
              f"transformers {rates['transformers'][-1]:.1f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    same = sum(a == b for a, b in zip(tokens["slicelm"], tokens["transformers"]))
    result = {
        "benchmark": "cpu_decode", **environment(), "device": f"cpu-{os.cpu_count()}-cores",
        "torch_threads": torch.get_num_threads(),
        "workload": {"model": args.model, "weights": "GGUF dequantized to float32, same tensors on both sides",
                     "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
                     "sampling": "greedy, EOS suppressed (min_tokens = min_new_tokens = N)",
                     "batch": 1, "rounds": args.rounds, "order": "A/B interleaved, alternating first side",
                     "rate": "(N-1) / (t(N) - t(1)), prefill cancelled"},
        "decode_tok_s": {k: round(v, 2) for k, v in med.items()},
        "decode_tok_s_all": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "ratio_slicelm_over_transformers": round(med["slicelm"] / med["transformers"], 3),
        "greedy_tokens_equal": f"{same}/{args.new_tokens}",
        "host_load_avg_1_5_15min": [round(x, 1) for x in os.getloadavg()],  # the cores are shared
    }
    print(f"median: slicelm {med['slicelm']:.1f} tok/s, transformers {med['transformers']:.1f} tok/s "
          f"(x{result['ratio_slicelm_over_transformers']}); same greedy tokens {same}/{args.new_tokens}")
    if args.name:
        save_result(args.name, result)


if __name__ == "__main__":
    main()
