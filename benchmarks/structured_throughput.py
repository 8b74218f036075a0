"""Workload A with a JSON schema on every request vs unconstrained, in one run and one engine (H200).

    python benchmarks/structured_throughput.py                 # 256 requests, Qwen3-0.6B shape, random bf16,
                                                               # llguidance and xgrammar (one engine each)
    python benchmarks/structured_throughput.py --smoke         # 8 short requests on the CPU (checks the script)

The model directory holds config.json and Qwen's 151k vocabulary (``qwen_vocab.py``), so grammars compile
against a real 151k byte-level BPE vocabulary. The schema is a log of ``{"level", "msg"}`` objects with
``minItems`` larger than any output can reach: the grammar can never be complete within a request's output
length, so every token is sampled under the mask, eos is never allowed, and ``ignore_eos`` changes nothing
(each request still ends by length, exactly at its workload-A output length). Greedy, as workload A.
Reports, per grammar backend, output tok/s of both passes, their ratio (goal >= 0.9), the host time per
constrained step in the mask fill / accept / waiting for a fill, and checks every constrained output against a
fresh matcher (no token may be rejected).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, save_result, workload_a, write_config_dir
from qwen_vocab import write_tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["log"], "properties": {
    "log": {"type": "array", "minItems": 4096, "items": {
        "type": "object", "additionalProperties": False, "required": ["level", "msg"],
        "properties": {"level": {"enum": ["info", "warn", "error"]}, "msg": {"type": "string"}}}}}}


def run(llm, reqs, structured: bool, max_tokens_cap: int | None):
    from slicelm import SamplingParams
    from slicelm.sampling_params import StructuredOutputsParams

    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True) if structured else None
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=min(o, max_tokens_cap or o), ignore_eos=True,
                             structured_outputs=so) for _, o in reqs]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == sum(p.max_tokens for p in params), "every request must generate exactly its output length"
    return outs, elapsed, tokens


def check_outputs(llm, outs) -> dict:
    """Replays each constrained output through a fresh matcher: every token must be accepted."""
    from slicelm.engine.structured_output.spec import grammar_spec
    from slicelm.sampling_params import StructuredOutputsParams

    manager = llm.engine.core.structured
    backend = manager._backend()
    compiled = backend.compile(grammar_spec(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)))
    rejected = 0
    for o in outs:
        g = compiled.new_grammar()
        rejected += sum(not ok for ok in (backend.accept_batch([g], [t])[0] for t in o.outputs[0].token_ids))
    return {"outputs_checked": len(outs), "tokens_rejected": rejected,
            "sample_output": llm.engine.tokenizer.decode(outs[0].outputs[0].token_ids[:80])}


class StepTimes:
    """Host time per constrained step in the structured-output work (wrapped for the measured pass only): the
    masks' fill (on the mask thread with async scheduling), the matchers' accept, and how long the next step
    waited for its masks (``StepHandle.resolve``)."""

    def __init__(self, llm) -> None:
        from slicelm.engine import runner

        self.manager = llm.engine.core.structured
        self.fill_s = self.accept_s = self.resolve_wait_s = 0.0
        self.fills = 0
        self._undo = []
        self._wrap(self.manager, "_fill", "fill_s", count=True)
        self._wrap(self.manager, "accept", "accept_s")
        original = runner.StepHandle.resolve

        def resolve(handle):
            t0 = time.perf_counter()
            pending = handle.finish is not None
            original(handle)
            if pending:
                self.resolve_wait_s += time.perf_counter() - t0

        runner.StepHandle.resolve = resolve
        self._undo.append(lambda: setattr(runner.StepHandle, "resolve", original))

    def _wrap(self, obj, name: str, field: str, count: bool = False) -> None:
        original = getattr(obj, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - t0)
                self.fills += count

        setattr(obj, name, timed)
        self._undo.append(lambda: delattr(obj, name))

    def close(self) -> dict:
        for undo in self._undo:
            undo()
        n = max(1, self.fills)
        return {"steps_with_masks": self.fills, "fill_ms_per_step": 1e3 * self.fill_s / n,
                "accept_ms_per_step": 1e3 * self.accept_s / n,
                "sample_wait_for_fill_ms_per_step": 1e3 * self.resolve_wait_s / n}


def measure_backend(backend: str, reqs, smoke: bool) -> dict:
    """One engine with ``backend``: unconstrained, then every request under the schema (same engine)."""
    from slicelm import LLM, SamplingParams

    cap = 12 if smoke else None
    with tempfile.TemporaryDirectory() as root:
        model_dir = write_config_dir("qwen3-0.6b", root)
        write_tokenizer(model_dir)
        kw = dict(max_num_seqs=256, max_num_batched_tokens=16384, max_model_len=4096, load_format="dummy",
                  structured_outputs_config={"backend": backend})
        if smoke:
            import json

            cfg = json.loads((Path(model_dir) / "config.json").read_text())
            cfg.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=32, intermediate_size=128, torch_dtype="float32")
            (Path(model_dir) / "config.json").write_text(json.dumps(cfg))
            kw.update(max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=512, device="cpu")
        llm = LLM(model_dir, **kw)
        warm = SamplingParams(max_tokens=8, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p[:64]} for p, _ in reqs[:8]], [warm] * 8, use_tqdm=False)
        run(llm, reqs[:8], True, 8)  # warm-up: the backend's vocabulary and the schema's compile
        _, t_free, n_free = run(llm, reqs, False, cap)
        times = StepTimes(llm)
        outs, t_so, n_so = run(llm, reqs, True, cap)
        step_times = times.close()
        checks = check_outputs(llm, outs)
        del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    free, so = n_free / t_free, n_so / t_so
    print(f"{backend}: unconstrained {free:.0f} tok/s, JSON schema {so:.0f} tok/s -> {100 * so / free:.1f}%; "
          f"per constrained step {step_times}; tokens rejected on replay: {checks['tokens_rejected']}", flush=True)
    return {"backend": backend, "output_tokens": n_so,
            "unconstrained": {"elapsed_s": t_free, "output_tokens_per_s": free},
            "constrained": {"elapsed_s": t_so, "output_tokens_per_s": so, **checks, "host_time": step_times},
            "constrained_over_unconstrained": so / free}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--backends", default="guidance,xgrammar", help="comma-separated; the first is the headline")
    ap.add_argument("--smoke", action="store_true", help="8 requests of 12 tokens on a tiny shape (CPU check)")
    args = ap.parse_args()
    reqs = workload_a(8 if args.smoke else args.num_requests)
    if args.smoke:
        reqs = [(p[:64], o) for p, o in reqs]
    rows = [measure_backend(b, reqs, args.smoke) for b in args.backends.split(",")]
    head = rows[0]
    result = {**environment(), "workload": {
        "name": "A with a JSON schema on every request vs unconstrained (same engine, same run), per backend",
        "shape": "qwen3-0.6b" + (" (smoke: tiny)" if args.smoke else ""), "weights": "random (load_format=dummy)",
        "vocabulary": "Qwen2/Qwen3 151k byte-level BPE (qwen_vocab.py), model vocab 151936",
        "num_requests": len(reqs), "sampling": {"temperature": 0.0, "ignore_eos": True},
        "schema": SCHEMA, "backends": [r["backend"] for r in rows]},
        "backends": rows, "backend": head["backend"],
        "unconstrained": head["unconstrained"], "constrained": head["constrained"],
        "output_tokens_per_s": head["constrained"]["output_tokens_per_s"], "peer": "the same engine unconstrained",
        "peer_output_tokens_per_s": head["unconstrained"]["output_tokens_per_s"],
        "constrained_over_unconstrained": head["constrained_over_unconstrained"]}
    save_result("structured_throughput" + ("_smoke" if args.smoke else ""), result)
    assert all(r["constrained"]["tokens_rejected"] == 0 for r in rows)


if __name__ == "__main__":
    main()
