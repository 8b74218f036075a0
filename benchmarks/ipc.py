"""Per-step message cost between the engine core process and the API process.

    python benchmarks/ipc.py                      # 256 running requests, one decode token each per step

One decode step's ``EngineCoreOutputs`` (256 one-token deltas and the stats snapshot), as the core sends
it: msgpack encoding (msgspec), a zmq PUSH -> PULL hop over an ipc socket from a spawned process, and
decoding on the API side. Reports bytes per step, encode and decode time (median of in-process
repetitions), and the end-to-end rate of a stream of such messages across the process boundary;
pickle is measured on the same message for comparison. Results: ``benchmarks/results/ipc_<device>.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, save_result

from slicelm.engine.core_messages import EngineCoreOutput, EngineCoreOutputs, make_encoder, outputs_decoder
from slicelm.engine.stats import EngineStats


def step_message(num_requests: int, logprobs: int) -> EngineCoreOutputs:
    outs = []
    for i in range(num_requests):
        out = EngineCoreOutput(f"cmpl-{i:032x}", [1000 + i])
        if logprobs:
            out.new_logprobs = [([1000 + i, *range(logprobs)], [-0.5] * (logprobs + 1), 1)]
        outs.append(out)
    stats = EngineStats(num_running=num_requests, kv_cache_usage=0.4, num_prompt_tokens=123456,
                        num_generation_tokens=654321, prefix_cache_queries=1000, prefix_cache_hits=10, num_steps=999)
    return EngineCoreOutputs(outs, stats, num_requests, time.time())


def median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def sender(addr: str, num_requests: int, logprobs: int, count: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(addr)
    enc = make_encoder()
    msg = step_message(num_requests, logprobs)
    for _ in range(count):
        msg.timestamp = time.time()
        sock.send(enc.encode(msg), copy=False)
    sock.close(linger=-1)
    ctx.term()


def across_processes(num_requests: int, logprobs: int, count: int) -> dict[str, float]:
    """Messages per second through spawn'ed process -> ipc socket -> decode, and the mean transit delay."""
    with tempfile.TemporaryDirectory() as d:
        addr = f"ipc://{d}/out"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.bind(addr)
        proc = multiprocessing.get_context("spawn").Process(target=sender, args=(addr, num_requests, logprobs, count))
        proc.start()
        dec = outputs_decoder()
        first = sock.recv(copy=False)
        dec.decode(first.buffer)
        t0 = time.perf_counter()
        delays = []
        for _ in range(count - 1):
            msg = dec.decode(sock.recv(copy=False).buffer)
            delays.append(time.time() - msg.timestamp)
        elapsed = time.perf_counter() - t0
        proc.join()
        sock.close(linger=0)
        ctx.term()
    return {"messages_per_s": (count - 1) / elapsed, "us_per_message": 1e6 * elapsed / (count - 1),
            "median_transit_ms": 1e3 * statistics.median(delays)}


def measure(num_requests: int, logprobs: int, reps: int, count: int) -> dict[str, float | int | dict]:
    msg = step_message(num_requests, logprobs)
    enc, dec = make_encoder(), outputs_decoder()
    data = enc.encode(msg)
    pickled = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return {
        "running_requests": num_requests, "top_logprobs": logprobs,
        "bytes_per_step": len(data), "bytes_per_request": len(data) / num_requests,
        "encode_us": median_us(lambda: enc.encode(msg), reps),
        "decode_us": median_us(lambda: dec.decode(data), reps),
        "pickle": {"bytes_per_step": len(pickled),
                   "dumps_us": median_us(lambda: pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL), reps),
                   "loads_us": median_us(lambda: pickle.loads(pickled), reps)},
        "across_processes": across_processes(num_requests, logprobs, count),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2000, help="in-process repetitions per timing")
    ap.add_argument("--messages", type=int, default=2000, help="messages sent across processes")
    ap.add_argument("--name", default="ipc")
    args = ap.parse_args()
    runs = [measure(args.num_requests, lp, args.reps, args.messages) for lp in (0, 5)]
    result = {
        **environment(),
        "workload": {"name": "engine core -> API process, one decode step's outputs",
                     "running_requests": args.num_requests, "tokens_per_request_per_step": 1,
                     "transport": "pyzmq PUSH/PULL over ipc://, msgspec msgpack (array-like structs)",
                     "reps": args.reps, "messages": args.messages},
        "runs": runs,
    }
    save_result(args.name, result)
    for r in runs:
        x = r["across_processes"]
        print(f"{r['running_requests']} requests, top_logprobs={r['top_logprobs']}: {r['bytes_per_step']} B/step, "
              f"encode {r['encode_us']:.0f} us, decode {r['decode_us']:.0f} us, "
              f"{x['us_per_message']:.0f} us/step across processes (pickle: {r['pickle']['dumps_us']:.0f} + "
              f"{r['pickle']['loads_us']:.0f} us, {r['pickle']['bytes_per_step']} B)")


if __name__ == "__main__":
    main()
