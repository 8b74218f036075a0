"""xgrammar vs llguidance on slicelm's vocabularies: grammar compile time and per-step mask time.

    python benchmarks/grammar_backends.py              # SmolLM2 (49k) and Qwen3 (151k) vocabularies, CPU

For each backend and vocabulary: the one-off vocabulary set-up, the time from a JSON schema to the first
mask (xgrammar compiles ahead of time; llguidance compiles lazily, so its first masks pay part of it), the
mean / p99 time to fill one sequence's mask while walking a valid instance token by token, and one batched
step of 256 sequences (fill 256 masks + accept 256 tokens, each one native threaded call), as the engine
core does it. Writes ``benchmarks/results/grammar_backends_<device>.json``.
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
from common import environment, save_result
from qwen_vocab import write_tokenizer

from slicelm.engine.structured_output.guidance import GuidanceBackend
from slicelm.engine.structured_output.spec import grammar_spec
from slicelm.loader.tokenizer import load_tokenizer_from
from slicelm.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 64},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "status": {"enum": ["active", "suspended", "deleted"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["id", "name", "email", "status", "tags", "address"],
    "additionalProperties": False,
}
INSTANCE = {"id": 4711, "name": "Ada Lovelace", "email": "ada@example.org", "status": "active", "score": 98.5,
            "tags": ["math", "engines", "poetry"], "address": {"city": "London", "zip": "W1 1AA"}}


def make_backend(name: str, tokenizer, vocab_size: int):
    eos = sorted(tokenizer.eos_token_ids)
    if name == "guidance":
        return GuidanceBackend(tokenizer, vocab_size, eos)
    from slicelm.engine.structured_output.xgrammar_backend import XGrammarBackend

    return XGrammarBackend(tokenizer, vocab_size, eos)


def measure(name: str, tokenizer, vocab_size: int, batch: int) -> dict:
    spec = grammar_spec(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    t0 = time.perf_counter()
    backend = make_backend(name, tokenizer, vocab_size)
    setup_s = time.perf_counter() - t0
    words = (vocab_size + 31) // 32
    mask = torch.full((batch, words), -1, dtype=torch.int32)
    t0 = time.perf_counter()
    compiled = backend.compile(spec)
    grammar = compiled.new_grammar()
    backend.fill_bitmask([grammar], [0], mask)
    first_mask_s = time.perf_counter() - t0
    tokens = tokenizer.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False)
    per_mask = []
    for i, t in enumerate(tokens):
        if i:
            t0 = time.perf_counter()
            backend.fill_bitmask([grammar], [0], mask)
            per_mask.append(time.perf_counter() - t0)
        allowed = bool((mask[0, t // 32] >> (t % 32)) & 1)
        assert allowed and backend.accept_batch([grammar], [t]) == [True], (name, i, t)
    # a batch of sequences walking the same instance: one fill + one accept call per step
    grammars = [compiled.new_grammar() for _ in range(batch)]
    rows = list(range(batch))
    step_s = []
    for t in tokens:
        t0 = time.perf_counter()
        backend.fill_bitmask(grammars, rows, mask)
        backend.accept_batch(grammars, [t] * batch)
        step_s.append(time.perf_counter() - t0)
    per_mask.sort()
    return {"backend": name, "vocab_size": vocab_size, "setup_s": setup_s, "schema_to_first_mask_s": first_mask_s,
            "instance_tokens": len(tokens), "mask_mean_us": 1e6 * statistics.fmean(per_mask),
            "mask_p99_us": 1e6 * per_mask[int(0.99 * (len(per_mask) - 1))],
            f"batch{batch}_step_mean_ms": 1e3 * statistics.fmean(step_s[1:]),
            f"batch{batch}_step_first_ms": 1e3 * step_s[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backends", default="guidance,xgrammar")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d)
        vocabs = {"smollm2-135m (49,152)": (load_tokenizer_from("smollm2-135m-instruct"), 49152),
                  "qwen3 (151,936)": (load_tokenizer_from(d), 151936)}
        rows = []
        for vocab_name, (tok, size) in vocabs.items():
            for backend in args.backends.split(","):
                r = {"vocabulary": vocab_name, **measure(backend, tok, size, args.batch)}
                print(json.dumps(r))
                rows.append(r)
    result = {**environment(), "workload": {"schema": SCHEMA, "instance": INSTANCE, "batch": args.batch,
                                            "torch_threads": torch.get_num_threads()},
              "results": rows}
    save_result("grammar_backends", result)


if __name__ == "__main__":
    main()
