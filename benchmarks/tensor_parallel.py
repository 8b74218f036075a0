"""Tensor parallelism on two GPUs of one host, in one run:

* the collectives of one batch-1 decode step alone (2 processes, NCCL, captured in a CUDA graph as the
  engine captures them): 2 all-reduces per layer + the embedding's, the LM head's all-gather, the sampled
  ids' broadcast;
* workload B (batch-1 decode: 128-token prompt, 256 new tokens) on a Llama-3.1-70B shape at TP=2: TPOT
  against its floor = one GPU's weight bytes (half the model) at the measured copy rate + those collectives;
* workload A (256 requests, nano-vllm's mix) on the Llama-3.1-8B shape at TP=1 and at TP=2.

    python benchmarks/tensor_parallel.py               # H200 x2: ~6 min
    python benchmarks/tensor_parallel.py --smoke       # CPU: toy shapes, gloo, 2 processes (checks the script)

Random bf16 weights (``load_format=dummy``); results in ``benchmarks/results/tensor_parallel_<device>.json``.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, environment, measure_copy_bandwidth, save_result, workload_a, write_config_dir
from latency import decode_runs
from throughput import floor_seconds, measure_matmul_flops, run_workload_a


# ----------------------------------------------------------------------------------- collectives
def _collective_rank(rank: int, world: int, init_file: str, shape: dict, iters: int, out: Any) -> None:
    from slicelm.distributed.env import force_multicast_off
    from slicelm.distributed.parallel_state import destroy_tp_group, init_tp_group

    force_multicast_off()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    tp = init_tp_group(world, rank, device, init_file)
    dtype = torch.bfloat16 if cuda else torch.float32
    hidden = torch.zeros(1, shape["hidden_size"], dtype=dtype, device=device)
    logits = torch.zeros(1, -(-shape["vocab_size"] // world), dtype=dtype, device=device)
    sampled = torch.zeros(1, dtype=torch.int64, device=device)
    num_all_reduce = 2 * shape["num_hidden_layers"] + 1

    def step() -> None:
        for _ in range(num_all_reduce):
            tp.all_reduce(hidden)
        tp.all_gather(logits)
        tp.broadcast(sampled)

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph, stream=stream):
            step()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        ms = (time.perf_counter() - t0) * 1e3 / iters
    if rank == 0:
        out.put({"ms_per_step": ms, "all_reduces": num_all_reduce, "all_reduce_bytes": hidden.nbytes,
                 "all_gather_bytes_per_rank": logits.nbytes, "captured_in_cuda_graph": cuda, "iters": iters})
    destroy_tp_group()


def measure_step_collectives(shape: dict, world: int, iters: int) -> dict:
    """Two processes (the engine's layout: one per GPU) time a decode step's collectives."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_collective_rank, args=(r, world, f"{d}/pg", shape, iters, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        result = out.get(timeout=600)
        for p in procs:
            p.join(60)
    return result


# ---------------------------------------------------------------------------------------- engines
def free(engine_or_llm: Any) -> None:
    engine = getattr(engine_or_llm, "engine", engine_or_llm)
    engine.shutdown()
    del engine, engine_or_llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def workload_b(shape: str, tp: int, args: argparse.Namespace, bandwidth: float | None, collectives_ms: float,
               root: str) -> dict:
    from slicelm.config import EngineArgs
    from slicelm.engine.engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine(EngineArgs(model=write_config_dir(shape, root), load_format="dummy", skip_tokenizer_init=True,
                                  max_num_seqs=8, max_model_len=4096, tensor_parallel_size=tp, device=args.device))
    build_s = time.perf_counter() - t0
    weight_bytes_per_gpu = sum(p.numel() * p.element_size() for p in engine.worker.model.parameters())
    runs = decode_runs(engine, args.prompt_len, args.new_tokens, args.repeats)
    tpot = statistics.median(r["tpot_ms_mean"] for r in runs)
    plan = engine.worker.memory_plan
    free(engine)
    result = {"shape": shape, "tensor_parallel_size": tp, "tpot_ms": tpot, "runs": runs, "engine_build_s": build_s,
              "weight_bytes_per_gpu": weight_bytes_per_gpu, "step_collectives_ms": collectives_ms,
              "memory_budget_bytes": plan.budget_bytes if plan else None}
    if bandwidth:
        floor = weight_bytes_per_gpu / bandwidth * 1e3 + collectives_ms
        result.update(floor_tpot_ms=floor, weights_floor_ms=weight_bytes_per_gpu / bandwidth * 1e3,
                      ratio_to_floor=tpot / floor)
    return result


def workload_a_at(shape: str, tp: int, reqs: list, args: argparse.Namespace, root: str) -> dict:
    from slicelm import LLM

    t0 = time.perf_counter()
    llm = LLM(write_config_dir(shape, root), load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
              max_num_seqs=args.max_num_seqs, tensor_parallel_size=tp, device=args.device)
    build_s = time.perf_counter() - t0
    elapsed, out_tokens = run_workload_a(llm, reqs)
    stats = llm.engine.get_stats()
    free(llm)
    prompt_tokens = sum(len(p) for p, _ in reqs)
    return {"tensor_parallel_size": tp, "elapsed_s": elapsed, "output_tokens_per_s": out_tokens / elapsed,
            "total_tokens_per_s": (out_tokens + prompt_tokens) / elapsed, "output_tokens": out_tokens,
            "num_preemptions": stats.num_preemptions, "engine_build_s": build_s}


# ------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: toy shapes, 8 requests, gloo")
    ap.add_argument("--parts", default="collectives,b,a", help="comma list of collectives, b, a")
    ap.add_argument("--tensor-parallel-size", type=int, default=2)
    ap.add_argument("--b-shape", default="llama-3.1-70b", choices=sorted(SHAPES))
    ap.add_argument("--a-shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--collective-iters", type=int, default=200)
    ap.add_argument("--name", default="tensor_parallel")
    args = ap.parse_args()
    args.device = "auto"
    if args.smoke:
        args.device, args.b_shape, args.a_shape = "cpu", "tiny-llama", "tiny-llama"
        args.new_tokens, args.prompt_len, args.repeats, args.num_requests = 16, 32, 1, 8
        args.max_num_seqs, args.collective_iters, args.name = 8, 20, "tensor_parallel_smoke"
    return args


def main() -> None:
    args = parse_args()
    tp, parts = args.tensor_parallel_size, set(args.parts.split(","))
    env = environment()
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda and torch.cuda.device_count() < tp:
        sys.exit(f"needs {tp} GPUs, found {torch.cuda.device_count()}")
    # a loaded CPU host slows the in-process TP=1 engine's 2 OpenMP threads far more than the 1-thread ranks
    result: dict[str, Any] = {**env, "host_loadavg_1m": os.getloadavg()[0],
                              "gpus": torch.cuda.device_count() if cuda else 0,
                              "workload": {"B": {"shape": args.b_shape, "model_config": SHAPES[args.b_shape],
                                                 "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
                                                 "batch_size": 1, "tensor_parallel_size": tp},
                                           "A": {"shape": args.a_shape, "num_requests": args.num_requests,
                                                 "max_num_seqs": args.max_num_seqs, "tensor_parallel_sizes": [1, tp]},
                                           "weights": "random bf16 (load_format=dummy)" if cuda else "random fp32"}}
    bandwidth = measure_copy_bandwidth() if cuda else None
    result["copy_bandwidth_bytes_per_s"] = bandwidth
    collectives_ms = 0.0
    if "collectives" in parts:
        result["step_collectives"] = measure_step_collectives(SHAPES[args.b_shape], tp, args.collective_iters)
        collectives_ms = result["step_collectives"]["ms_per_step"]
        print(f"collectives of one decode step: {collectives_ms:.3f} ms", flush=True)
    with tempfile.TemporaryDirectory() as root:
        if "b" in parts:
            result["B"] = workload_b(args.b_shape, tp, args, bandwidth, collectives_ms, root)
            print(f"workload B at TP={tp}: {result['B']}", flush=True)
        if "a" in parts:
            reqs = workload_a(args.num_requests)
            if args.smoke:
                reqs = [(p[:64], min(o, 24)) for p, o in reqs]
            runs = [workload_a_at(args.a_shape, n, reqs, args, root) for n in (1, tp)]
            result["A"] = {"runs": runs, "speedup_tp_vs_1": runs[1]["output_tokens_per_s"] /
                           runs[0]["output_tokens_per_s"]}
            if cuda:
                floor = floor_seconds(SHAPES[args.a_shape], reqs, bandwidth, measure_matmul_flops())
                result["A"]["floor_tp1"] = floor
                result["A"]["fraction_of_floor_tp1"] = floor["floor_s"] / runs[0]["elapsed_s"]
                # bytes and FLOPs split over the ranks; the all-reduces are not in this floor
                result["A"]["fraction_of_floor_tp"] = floor["floor_s"] / tp / runs[1]["elapsed_s"]
            print(f"workload A: {result['A']}", flush=True)
    save_result(args.name, result)


if __name__ == "__main__":
    main()
