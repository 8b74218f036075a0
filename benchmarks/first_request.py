"""First vs second request right after ``/health`` turns 200: a chat, an embedding and a reranker server.

    python benchmarks/first_request.py                # CPU: SmolLM2 (GGUF), MiniLM, a MiniLM-size XLM-R reranker
    python benchmarks/first_request.py --device cuda  # GPU: Qwen3-0.6B, bge-m3, bge-reranker-v2-m3 shapes (3 trials)

Each model gets its own ``slicelm serve`` process. As soon as ``/health`` answers 200 the script sends the first
request, then a second one of the same shape with different words (so no prefix-cache hit helps it), then five more
(the steady state). The goal (issue 18): first ≤ 2× second for all three. GPU models are random weights of real
shapes with a BPE tokenizer trained here (no files to carry). The server's own warm-up times (the engine core's and
the API server's log lines) and the time from start to healthy are recorded too.
Result: benchmarks/results/first_request_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QWEN3_0_6B, environment, save_result
from rag import WORDS, XLMR_SHAPE, stop, write_random_models

from slicelm.stack.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
SMALL_XLMR = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                  vocab_size=30522, max_position_embeddings=514)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WARMUP_LINE = re.compile(r"engine-core: warm-up: .* in ([0-9.]+) s")
API_WARMUP_LINE = re.compile(r"API warm-up: .* in ([0-9.]+) s")


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def request(kind: str, model: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    if kind == "chat":
        return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text(rng, 40)}],
                                        "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    if kind == "embed":
        return "/v1/embeddings", {"model": model, "input": text(rng, 40)}
    return "/v1/rerank", {"model": model, "query": text(rng, 12), "documents": [text(rng, 30) for _ in range(8)]}


# ------------------------------------------------------------------------------------------------- models
def train_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer (tokenizer.json + a ChatML template) trained on benchmark words: real files,
    made here, so that the GPU machine needs no model wheels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    rng = random.Random(0)
    tok.train_from_iterator((text(rng, 50) for _ in range(2000)),
                            trainers.BpeTrainer(vocab_size=4000, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
         "chat_template": CHATML}))
    return out


def gpu_models(root: Path) -> dict[str, tuple[str, list[str]]]:
    tok = train_tokenizer(root / "tokenizer")
    chat = root / "qwen3-0.6b"
    chat.mkdir(parents=True, exist_ok=True)
    (chat / "config.json").write_text(json.dumps({**QWEN3_0_6B, "bos_token_id": 0, "eos_token_id": 2}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (chat / f).write_bytes((tok / f).read_bytes())
    embed, rerank = write_random_models(root, tok, shape=XLMR_SHAPE)
    return {"chat": (str(chat), ["--load-format", "dummy", "--max-model-len", "4096"]),
            "embed": (str(embed), ["--max-model-len", "8192"]), "rerank": (str(rerank), ["--max-model-len", "512"])}


def cpu_models(root: Path) -> dict[str, tuple[str, list[str]]]:
    _embed, rerank = write_random_models(root, None, shape=SMALL_XLMR)
    return {"chat": ("smollm2-135m-instruct", ["--max-model-len", "2048", "--max-num-seqs", "16"]),
            "embed": ("all-minilm-l6-v2", []), "rerank": (str(rerank), ["--max-model-len", "512"])}


# ------------------------------------------------------------------------------------------------- serving
def serve(model: str, flags: list[str], device: str, log: Path, timeout: float) -> tuple[subprocess.Popen, str, float]:
    port = free_port("127.0.0.1")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "slicelm.entrypoints.cli", "serve", model, "--host", "127.0.0.1",
                                 "--port", str(port), "--device", device, "--disable-access-log", *flags],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{model} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{model}: not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def measure(kind: str, model: str, flags: list[str], device: str, tmp: Path, timeout: float) -> dict[str, Any]:
    log = tmp / f"{kind}.log"
    proc, url, ready_s = serve(model, flags, device, log, timeout)
    rng = random.Random(kind)
    times = []
    try:
        with httpx.Client(base_url=url, timeout=900) as client:
            for _ in range(7):
                path, body = request(kind, model, rng)
                t = time.perf_counter()
                r = client.post(path, json=body)
                times.append((time.perf_counter() - t) * 1e3)
                assert r.status_code == 200, r.text
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    warm, api_warm = WARMUP_LINE.search(text), API_WARMUP_LINE.search(text)
    first, second = times[0], times[1]
    return {"model": model, "flags": flags, "ready_s": round(ready_s, 2),
            "server_warmup_s": float(warm.group(1)) if warm else None,
            "api_warmup_s": float(api_warm.group(1)) if api_warm else None,
            "first_ms": round(first, 1), "second_ms": round(second, 1), "first_over_second": round(first / second, 2),
            "steady_median_ms": round(statistics.median(times[2:]), 1), "all_ms": [round(t, 1) for t in times],
            "within_2x": first <= 2 * second}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the median first/second ratio, and every trial's ratio."""
    ranked = sorted(runs, key=lambda r: r["first_over_second"])
    mid = ranked[(len(ranked) - 1) // 2]
    return {**mid, "trial_ratios": [r["first_over_second"] for r in runs], "trials": len(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models-dir", type=Path, default=None, help="where random models are written (default: tmp)")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--trials", type=int, default=None,
                    help="fresh servers per model, the median trial reported (default: 3 on cuda, 1 on cpu)")
    args = ap.parse_args()
    if args.trials is None:
        args.trials = 3 if args.device == "cuda" else 1
    with tempfile.TemporaryDirectory(prefix="first-request-") as tmp_str:
        tmp = Path(tmp_str)
        root = args.models_dir or tmp / "models"
        models = gpu_models(root) if args.device == "cuda" else cpu_models(root)
        trials = {kind: [measure(kind, model, flags, args.device, tmp, args.start_timeout) for _ in range(args.trials)]
                  for kind, (model, flags) in models.items()}
    results = {kind: summarize(runs) for kind, runs in trials.items()}
    for kind, r in results.items():
        print(f"{kind:7s} ready {r['ready_s']:6.1f} s  first {r['first_ms']:8.1f} ms  second {r['second_ms']:8.1f} ms"
              f"  ({r['first_over_second']:.2f}x, trials {r['trial_ratios']})  steady {r['steady_median_ms']:.1f} ms",
              flush=True)
    env = environment()
    if args.device == "cpu":
        env["device"] = f"cpu-{os.cpu_count()}-cores"
    save_result("first_request", {
        **env,
        "host_load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # a shared CPU's other work skews every figure
        "workload": {"chat": "chat completion, 40-word user message, max_tokens 16, temperature 0, ignore_eos",
                     "embed": "one 40-word input", "rerank": "12-word query, 8 documents of 30 words",
                     "order": "first request as soon as /health is 200, then a second of the same shape with other "
                              "words, then 5 more (steady)",
                     "trials": args.trials, "reported": "per model, the trial with the median first/second ratio"},
        "models": results,
        "all_within_2x": all(r["within_2x"] for r in results.values()),
    })


if __name__ == "__main__":
    main()
