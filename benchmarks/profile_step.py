"""Where workload A's time goes: a step timeline, then a profile of decode steps at 256 sequences.

    python benchmarks/profile_step.py                      # H100/H200: Qwen3-0.6B shape, workload A
    python benchmarks/profile_step.py --num-requests 64    # a quicker look

Part 1 runs workload A once as ``throughput.py`` does and times every step on the device (CUDA
events around each launched step): device milliseconds per step against the step's own floor (KV
bytes it reads + weights, at the measured copy rate), grouped by step kind (prefill-carrying steps,
decode steps by batch size), plus the idle gaps where the device waited for the host.
Part 2 queues workload A again, lets all 256 prompts prefill, then runs ``torch.profiler`` over a
few decode steps: the top kernels (CUDA-graph replay and eager) and the host spans of one engine
step (schedule, input building, launch, sampling metadata, read-back, output processing).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHAPES, device_slug, environment, measure_copy_bandwidth, save_result, workload_a

BUCKETS = ((192, "decode 192-256 seqs"), (128, "decode 128-191"), (64, "decode 64-127"),
           (16, "decode 16-63"), (1, "decode 1-15"))


def kv_bytes_per_token(shape: dict) -> int:
    hd = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    return shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * hd * 2


def weight_bytes(shape: dict) -> int:
    h, L = shape["hidden_size"], shape["num_hidden_layers"]
    hd = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    layer = h * (q + 2 * kv) + q * h + 3 * h * shape["intermediate_size"]
    return 2 * (L * layer + shape["vocab_size"] * h * (1 if shape.get("tie_word_embeddings") else 2))


def build_llm(shape: str, root: str, max_num_seqs: int, enforce_eager: bool):
    from common import write_config_dir

    from slicelm import LLM

    return LLM(write_config_dir(shape, root), load_format="dummy", skip_tokenizer_init=True,
               max_num_seqs=max_num_seqs, max_num_batched_tokens=16384, max_model_len=4096,
               enforce_eager=enforce_eager, gpu_memory_utilization=0.9)


def add_workload(engine, reqs: list[tuple[list[int], int]], tag: str, shift: int = 0) -> None:
    """Queues ``reqs``; ``shift`` moves every token id by ``10000 * shift`` so that runs of the same
    workload in one process never hit each other's prefix cache."""
    from slicelm import SamplingParams

    for i, (prompt, out) in enumerate(reqs):
        prompt = [t + 10000 * shift for t in prompt]
        engine.add_request(f"{tag}{i}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True), stream=False)


# ----------------------------------------------------------------------------- part 1: timeline
def timeline(engine, reqs, shape: dict, bandwidth: float, tag: str, shift: int) -> dict:
    """Runs ``reqs`` to the end with a CUDA event pair around every launched step."""
    worker, steps = engine.worker, []
    launch = worker.execute_model
    kv_tok, wbytes = kv_bytes_per_token(shape), weight_bytes(shape)

    def timed(sched, prev=None):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        handle = launch(sched, prev)
        end.record()
        new = [s.num_new_tokens for s in sched.scheduled]
        ctx = sum(s.request.num_computed_tokens + s.num_new_tokens for s in sched.scheduled)
        steps.append({"start": start, "end": end, "host_launch_s": time.perf_counter() - t0,
                      "num_seqs": len(new), "num_tokens": sum(new), "decode_only": max(new) == 1,
                      "floor_ms": 1e3 * (ctx * kv_tok + wbytes) / bandwidth})
        return handle

    worker.execute_model = timed
    add_workload(engine, reqs, tag, shift)
    alloc0 = _allocator_counts()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    worker.execute_model = launch
    alloc = {k: v - alloc0[k] for k, v in _allocator_counts().items()}
    return {**summarize(steps, wall), "allocator": alloc}


def _allocator_counts() -> dict[str, int]:
    """cudaMalloc calls, frees and out-of-memory retries of torch's caching allocator (each can sync)."""
    st = torch.cuda.memory_stats()
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
    return {k: int(st.get(k, 0)) for k in keys}


def summarize(steps: list[dict], wall_s: float) -> dict:
    groups: dict[str, dict] = defaultdict(lambda: {"steps": 0, "device_ms": 0.0, "floor_ms": 0.0,
                                                   "idle_before_ms": 0.0, "host_launch_ms": 0.0})
    prev_end = None
    for s in steps:
        kind = "prefill / mixed" if not s["decode_only"] else next(n for lo, n in BUCKETS if s["num_seqs"] >= lo)
        g = groups[kind]
        g["steps"] += 1
        g["device_ms"] += s["start"].elapsed_time(s["end"])
        g["floor_ms"] += s["floor_ms"]
        g["host_launch_ms"] += 1e3 * s["host_launch_s"]
        if prev_end is not None:
            g["idle_before_ms"] += max(0.0, prev_end.elapsed_time(s["start"]))
        prev_end = s["end"]
    for g in groups.values():
        g["device_over_floor"] = g["device_ms"] / g["floor_ms"] if g["floor_ms"] else None
        g["ms_per_step"] = g["device_ms"] / g["steps"]
    total = {k: sum(g[k] for g in groups.values()) for k in ("steps", "device_ms", "floor_ms", "idle_before_ms")}
    return {"wall_s": wall_s, "total": total, "groups": dict(groups)}


# ------------------------------------------------------------------------------ part 2: profile
@contextlib.contextmanager
def host_spans(engine):
    """Names the host phases of a step for the profiler (patched on this engine's objects only)."""
    core, runner = engine.core, engine.worker.runner
    targets = [(core.scheduler, "schedule", "host: schedule"), (runner, "prepare_inputs", "host: prepare_inputs"),
               (runner, "run_model", "host: launch model"), (runner, "sample", "host: sample (metadata+launch)"),
               (core, "_read_back", "host: read back"), (engine.output_processor, "process", "host: outputs")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]

    def wrap(fn, label):
        def inner(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return inner

    for (obj, name, label), (_, _, fn) in zip(targets, saved):
        setattr(obj, name, wrap(fn, label))
    try:
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def profile_decode(engine, reqs, steps: int, eager: bool) -> dict:
    """Prefills all of ``reqs``, then profiles ``steps`` decode steps (graphs off when ``eager``)."""
    add_workload(engine, [(p, 1024 + 64) for p, _ in reqs], "e" if eager else "g", shift=4 if eager else 3)
    sched = engine.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        engine.step()
    for _ in range(3):
        engine.step()
    runner = engine.worker.runner
    graphs, runner.graphs = runner.graphs, (None if eager else runner.graphs)
    result = profiled_steps(engine, steps)
    runner.graphs = graphs
    engine.abort_request([f"{'e' if eager else 'g'}{i}" for i in range(len(reqs))])
    while engine.has_unfinished_requests():
        engine.step()
    return {**result, "num_seqs": len(reqs)}


def profile_prefill(engine, reqs, steps: int = 2) -> dict:
    """The first ``steps`` steps of workload A in a fresh engine (16k-token prefill chunks), profiled:
    anything done on first use (kernel compiles, allocations) shows up here."""
    add_workload(engine, reqs, "p", shift=2)
    result = profiled_steps(engine, steps)
    engine.abort_request([f"p{i}" for i in range(len(reqs))])
    while engine.has_unfinished_requests():
        engine.step()
    return {**result, "num_seqs": len(reqs)}


def profiled_steps(engine, steps: int) -> dict:
    """``steps`` engine steps under torch.profiler with the host phases named: wall time, top kernels,
    host spans and the profiler's table."""
    torch.cuda.synchronize()
    with host_spans(engine), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            with record_function("engine step"):
                engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return {"wall_ms_per_step": 1e3 * wall / steps, "steps": steps,
            "kernels": top_kernels(prof, steps), "host_spans": host_table(prof, steps),
            "table": prof.key_averages().table(sort_by="device_time_total", row_limit=25)}


def top_kernels(prof, steps: int, limit: int = 20) -> list[dict]:
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or _device_us(e) > 0]
    rows = [e for e in rows if not e.key.startswith("host:") and e.key != "engine step"]
    rows.sort(key=_device_us, reverse=True)
    total = sum(_self_device_us(e) for e in rows) or 1.0
    return [{"name": e.key[:120], "us_per_step": _self_device_us(e) / steps, "calls_per_step": e.count / steps,
             "share": _self_device_us(e) / total} for e in rows[:limit] if _self_device_us(e) > 0]


def host_table(prof, steps: int) -> dict:
    return {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages()
            if e.key.startswith("host:") or e.key == "engine step"}


def _device_us(e) -> float:
    return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)


def _self_device_us(e) -> float:
    return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--name", default="profile")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU")

    env, shape, reqs = environment(), SHAPES[args.shape], workload_a(args.num_requests)
    bandwidth = measure_copy_bandwidth()
    with tempfile.TemporaryDirectory() as root:
        llm = build_llm(args.shape, root, args.num_requests, enforce_eager=False)
    engine = llm.engine
    add_workload(engine, [(p[:64], 8) for p, _ in reqs[:8]], "w")
    while engine.has_unfinished_requests():
        engine.step()
    prefill = profile_prefill(engine, reqs)  # first: pays for anything done on first use
    line = timeline(engine, reqs, shape, bandwidth, "t", shift=0)
    graph = profile_decode(engine, reqs, args.profile_steps, eager=False)
    eager = profile_decode(engine, reqs, args.profile_steps, eager=True)
    result = {**env, "workload": {"name": "A (offline throughput), step timeline + decode-step profile",
                                  "shape": args.shape, "num_requests": len(reqs), "max_num_batched_tokens": 16384,
                                  "profiled_decode_steps": args.profile_steps},
              "copy_bandwidth_bytes_per_s": bandwidth, "timeline": line,
              "prefill_profile": {k: v for k, v in prefill.items() if k != "table"},
              "decode_profile_graphs": {k: v for k, v in graph.items() if k != "table"},
              "decode_profile_eager": {k: v for k, v in eager.items() if k != "table"}}
    path = save_result(f"{args.name}_{args.shape}", result)
    text = RESULTS / f"{args.name}_{args.shape}_{device_slug(env['device'])}.txt"
    text.write_text(f"{env['device']} commit {env['commit']}\n\nprefill steps:\n{prefill['table']}\n\n"
                    f"decode, CUDA graphs:\n{graph['table']}\n\n"
                    f"eager:\n{eager['table']}\n")
    print_summary(line, "timeline (after the profiled prefill steps)",
                  {"prefill": prefill, "graphs": graph, "eager": eager})
    print(f"saved {path} and {text}")


def print_summary(line: dict, label: str, profiles: dict | None = None) -> None:
    t = line["total"]
    print(f"\n{label}: allocator {line['allocator']}")
    print(f"wall {line['wall_s']:.2f}s  device {t['device_ms'] / 1e3:.2f}s  floor {t['floor_ms'] / 1e3:.2f}s  "
          f"idle {t['idle_before_ms'] / 1e3:.2f}s  steps {t['steps']}")
    for kind, g in line["groups"].items():
        print(f"  {kind:22s} steps {g['steps']:5d}  device {g['device_ms']:8.1f} ms  floor {g['floor_ms']:8.1f} ms"
              f"  x{g['device_over_floor'] or 0:.2f}  idle {g['idle_before_ms']:7.1f} ms  "
              f"host launch {g['host_launch_ms']:7.1f} ms")
    for name, prof in (profiles or {}).items():
        print(f"\n{name} step at {prof['num_seqs']} seqs ({name}): {prof['wall_ms_per_step']:.2f} ms wall per step")
        for k in prof["kernels"][:12]:
            share = 100 * k["share"]
            print(f"  {k['us_per_step']:9.1f} us  x{k['calls_per_step']:5.1f}  {share:5.1f}%  {k['name'][:90]}")
        print("  host spans (ms per step): " + ", ".join(f"{k}={v:.2f}" for k, v in prof["host_spans"].items()))


if __name__ == "__main__":
    main()
