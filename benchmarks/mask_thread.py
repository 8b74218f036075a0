"""The structured-output mask thread under a busy host: how long a step waits for its masks (CPU, no model).

    python benchmarks/mask_thread.py                  # 256 sequences, Qwen's 151k vocabulary, llguidance
    python benchmarks/mask_thread.py --host-ms 1,3,5  # the host's Python work per step to overlap with

With async scheduling the engine core, once a forward pass is launched, reads the previous step's tokens back,
advances the matchers and fills the step's masks, while the host returns outputs and builds the next step (Python);
the step samples when the next one needs its tokens, waiting for the masks if they are not ready. This replays that
on the host alone with the engine's ``StructuredOutputManager``: 256 sequences under the schema of
``structured_throughput.py`` (diverse states: each starts a random number of tokens into its own valid output)
take one token per step; each step accepts the tokens and queues the fill, the main thread runs ``--host-ms`` of
Python, then waits for the masks. Variants (each a list): the GIL switch interval (``--switch-ms``: Python's
default 5 ms, the manager's 0.5 ms), llguidance's native threads (``--threads``, 0 = its default: 80% of the
cores up to 32), and where the accepts run (``--accept``: ``main``, as the core does, or ``thread``: on one
worker thread with the fill, accept first — the alternative the core does not use). Reports per variant the host's
step time (accept + host work + wait), the wait, and the fill alone on an idle host. The machine's core count
matters: run it on the GPU host too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llguidance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, save_result
from qwen_vocab import write_tokenizer
from structured_throughput import SCHEMA

from slicelm.config import StructuredOutputsConfig
from slicelm.engine.request import Request
from slicelm.engine.structured_output import StructuredOutputManager
from slicelm.loader.tokenizer import load_tokenizer_from
from slicelm.sampling_params import SamplingParams, StructuredOutputsParams

VOCAB = 151936
WORDS = ["disk", "full", "retry", "user", "login", "ok", "timeout", "cache", "miss", "état", "überall", "日志",
         "42", "0.5", "path/to/file", "a\\\"quoted\\\" word", "tab\\there", "GET", "/v1/chat", "200"]


def valid_texts(n: int, rng: random.Random) -> list[str]:
    """``n`` long prefixes of valid instances of the schema (it needs 4096 items, so none is ever complete)."""
    out = []
    for _ in range(n):
        items = [f'{{"level":"{rng.choice(["info", "warn", "error"])}","msg":"'
                 f'{" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))}"}}' for _ in range(40)]
        out.append('{"log":[' + ",".join(items))
    return out


def host_work(ms: float) -> None:
    """Python on the main thread for ``ms`` (what returning outputs and building a step cost the host)."""
    end = time.perf_counter() + ms / 1e3
    d: dict[int, list[int]] = {}
    while time.perf_counter() < end:
        for i in range(64):
            d.setdefault(i % 17, []).append(i)
        d.clear()


def make_sequences(mgr: StructuredOutputManager, token_lists: list[list[int]], skip: list[int]) -> list[Request]:
    """One request per token list, its matcher advanced by the first ``skip[i]`` tokens."""
    params = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    reqs = []
    for i, toks in enumerate(token_lists):
        req = Request(f"r{i}", [1], SamplingParams(max_tokens=4096, structured_outputs=params))
        so = mgr.add(params)
        so.compiled.result(timeout=120)
        assert mgr.activate(so) is None
        req.structured = so
        for t in toks[: skip[i]]:
            mgr.accept([req], [t])
        reqs.append(req)
    return reqs


def _step(mgr: StructuredOutputManager, reqs: list[Request], tokens: list[int], pool: ThreadPoolExecutor | None):
    """Queues one step's structured-output work: the core's way (accept here, fill on the mask thread), or both on
    ``pool``'s one worker, accept first (the alternative measured)."""
    if pool is None:
        mgr.accept(reqs, tokens)
        return mgr.bitmask_async(reqs)
    return pool.submit(lambda: (mgr.accept(reqs, tokens), mgr.bitmask(reqs))[1])


def run_variant(tokenizer, token_lists, skip, steps: int, host_ms: float, switch: float, threads: int,
                accept_on_thread: bool) -> dict:
    mgr = StructuredOutputManager(StructuredOutputsConfig(), lambda: tokenizer, VOCAB, set(tokenizer.eos_token_ids),
                                  len(token_lists), pin=False)
    reqs = make_sequences(mgr, token_lists, skip)
    if threads:
        mgr._backend().executor = llguidance.LLExecutor(num_threads=threads)
    pool = ThreadPoolExecutor(max_workers=1) if accept_on_thread else None
    mgr.bitmask_async(reqs).result()  # the mask thread exists now (and lowered the switch interval): set ours
    sys.setswitchinterval(switch)
    idle = []
    for _ in range(5):
        t0 = time.perf_counter()
        mgr.bitmask_async(reqs).result()
        idle.append(time.perf_counter() - t0)
    waits, step = [], []
    for s in range(steps):
        tokens = [toks[skip[i] + s] for i, toks in enumerate(token_lists)]
        t0 = time.perf_counter()
        pending = _step(mgr, reqs, tokens, pool)
        host_work(host_ms)
        t1 = time.perf_counter()
        mask = pending.result()
        t2 = time.perf_counter()
        assert mask is not None
        waits.append(t2 - t1)
        step.append(t2 - t0)
    assert all(r.structured.num_accepted == skip[i] + steps and not r.structured.failed for i, r in enumerate(reqs))
    mgr.shutdown()
    if pool is not None:
        pool.shutdown()
    waits.sort()
    return {"step_ms_mean": 1e3 * statistics.fmean(step), "wait_ms_mean": 1e3 * statistics.fmean(waits),
            "wait_ms_p90": 1e3 * waits[int(0.9 * len(waits))], "fill_idle_ms_median": 1e3 * statistics.median(idle)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--host-ms", default="3", help="comma-separated host work per step (ms)")
    ap.add_argument("--switch-ms", default="5,0.5", help="comma-separated GIL switch intervals (ms)")
    ap.add_argument("--threads", default="0", help="comma-separated llguidance thread counts (0: its default)")
    ap.add_argument("--accept", default="main,thread", help="where the accepts run: main, thread")
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d)
        tokenizer = load_tokenizer_from(d)
    texts = valid_texts(args.sequences, rng)
    token_lists = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    skip = [rng.randint(0, 300) for _ in token_lists]
    assert all(len(t) >= s + args.steps for t, s in zip(token_lists, skip))
    rows = []
    grid = itertools.product([float(x) for x in args.host_ms.split(",")],
                             [float(x) / 1e3 for x in args.switch_ms.split(",")],
                             [int(x) for x in args.threads.split(",")], args.accept.split(","))
    for host_ms, switch, threads, accept in grid:
        assert accept in ("main", "thread"), accept
        r = {"host_ms": host_ms, "switch_interval_s": switch, "llguidance_threads": threads or "default",
             "accept_on": accept,
             **run_variant(tokenizer, token_lists, skip, args.steps, host_ms, switch, threads, accept == "thread")}
        print(json.dumps(r), flush=True)
        rows.append(r)
    save_result("mask_thread", {**environment(), "workload": {
        "name": "mask thread under a busy host (structured outputs, async scheduling), no model",
        "sequences": args.sequences, "steps": args.steps, "backend": "guidance",
        "vocabulary": "Qwen2/Qwen3 151k byte-level BPE (qwen_vocab.py), 151936", "schema": SCHEMA,
        "states": "each sequence starts 0-300 tokens into its own valid output (random.Random(0))",
        "cpu_count": os.cpu_count()},
        "rows": rows})


if __name__ == "__main__":
    main()
