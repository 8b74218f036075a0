"""Two LLM engines on one GPU: co-location throughput and compute isolation (issue 8's GPU table).

    python benchmarks/colocation.py                       # both parts, ~7 minutes on an H200
    python benchmarks/colocation.py --parts table         # co-location table only
    python benchmarks/colocation.py --parts isolation     # 30 / 70 MPS caps only

Each engine is its own process (one engine per process, as `slicelm up` runs them), Qwen3-0.6B shape with
random bf16 weights, a fixed memory budget. A process loads once, then runs phases on command from
this parent: keep C requests in flight (workload A's length distribution, ignore EOS; a finished
request is replaced at once) for a fixed window, and report the generation tokens produced inside the
window. Both engines of a pair start each phase together.

Table: concurrency 2, 32 and 256 per engine; throughput of each engine as a % of the same engine running
alone on the whole GPU (same memory budget), under (a) plain time slicing and (b) the MPS daemon that
slicelm owns (slicelm.slicing.mps, no thread cap: what `slicelm up` gives replicas without
requestGPUCores). Isolation: MPS thread caps 30% and 70% (`requestGPUCores: 30 / 70`): each alone in its
slice, then both at once, at concurrency 256.

    python benchmarks/colocation.py --kv elastic --green --skip-time-sliced   # the re-run: ~6 minutes

``--kv elastic``: every engine runs with elastic KV under a memory broker in this process (each guaranteed
its budget, borrowing what is free). ``--green``: adds a pair whose engines run in disjoint CUDA green
contexts (half the SMs each, ``--green-context-sms 64@0`` / ``64@64``, under the MPS daemon without a
thread cap) to the table, and green contexts of 40 / 88 SMs (30 / 70%) to the isolation part. The result
file is ``colocation_<kv>[_green]_<device>.json`` (``colocation_<device>.json`` for the default run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, save_result, write_config_dir

from slicelm.slicing.broker_client import BROKER_ENV, GPU_ENV, REPLICA_ENV

CONCURRENCIES = (2, 32, 256)
GREEN_HALVES = ("64@0", "64@64")  # disjoint halves of the H200's 132 SMs (groups of 8: 128 usable)
GREEN_30_70 = ("40@0", "88@40")  # ~30% / ~70% of the SMs, disjoint


# ----------------------------------------------------------------------------------------------- child
def _new_request(rng: random.Random) -> tuple[list[int], int]:
    prompt = [rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
    return prompt, rng.randint(100, 1024)


def _run_phase(engine, rng: random.Random, concurrency: int, seconds: float, warmup: float) -> dict:
    from slicelm.sampling_params import SamplingParams

    live: set[str] = set()

    def top_up() -> None:
        while len(live) < concurrency:
            prompt, out_len = _new_request(rng)
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


def child(budget: str, max_num_seqs: int, seed: int, elastic: bool, green: str | None) -> None:
    from slicelm.config import EngineArgs
    from slicelm.engine.engine import LLMEngine

    with tempfile.TemporaryDirectory() as root:
        engine = LLMEngine(EngineArgs(model=write_config_dir("qwen3-0.6b", root), load_format="dummy",
                                      skip_tokenizer_init=True, gpu_memory_budget=budget, max_model_len=4096,
                                      max_num_seqs=max_num_seqs, max_num_batched_tokens=8192, elastic_kv=elastic,
                                      green_context_sms=green))
    rng = random.Random(seed)
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        concurrency, seconds, warmup = int(cmd[1]), float(cmd[2]), float(cmd[3])
        print(json.dumps(_run_phase(engine, rng, concurrency, seconds, warmup)), flush=True)


# ---------------------------------------------------------------------------------------------- parent
class Engine:
    def __init__(self, name: str, budget: int, env: dict[str, str], args: argparse.Namespace, seed: int) -> None:
        self.name = name
        cmd = [sys.executable, __file__, "--child", str(budget), "--max-num-seqs", str(args.max_num_seqs),
               "--seed", str(seed)]
        if args.kv == "elastic":
            cmd.append("--child-elastic")
            env = {**env, BROKER_ENV: args.broker_address, REPLICA_ENV: f"{name}-{seed}", GPU_ENV: "gpu0"}
        if env.get("GREEN_SMS"):
            cmd += ["--green-context-sms", env["GREEN_SMS"]]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **env})

    def wait_ready(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("READY"):
                return
        raise RuntimeError(f"{self.name} exited with {self.proc.wait()} before it was ready")

    def start_phase(self, concurrency: int, seconds: float, warmup: float) -> None:
        self.proc.stdin.write(f"run {concurrency} {seconds} {warmup}\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.name} exited with {self.proc.wait()} mid-phase")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)


def run_group(specs: list[tuple[str, dict[str, str]]], budget: int, args: argparse.Namespace,
              concurrencies: tuple[int, ...]) -> dict[str, list[dict]]:
    """Start the engines of one group together, run each concurrency on all of them at once."""
    engines = [Engine(name, budget, env, args, seed) for seed, (name, env) in enumerate(specs)]
    try:
        for e in engines:
            e.wait_ready()
        out: dict[str, list[dict]] = {e.name: [] for e in engines}
        for c in concurrencies:
            for e in engines:
                e.start_phase(c, args.seconds, args.warmup)
            for e in engines:
                out[e.name].append(e.result())
                print(f"  {e.name:>14} c={c:<4} {out[e.name][-1]['output_tokens_per_s']:9.0f} tok/s", flush=True)
        return out
    finally:
        for e in engines:
            e.close()


def _mps_env(daemon, percent: int | None, budget: int | None) -> dict[str, str]:
    """MPS client env: thread cap ``percent``, pinned memory limit ``budget`` (None with elastic KV: the broker
    bounds memory, an engine may borrow beyond its budget)."""
    from slicelm.slicing.spec import Slice

    return daemon.client_env(Slice(device_index=0, device_uuid=None, memory_bytes=budget, sm_percent=percent,
                                   source="stack"))


def _green_env(daemon, sms: str, args: argparse.Namespace, budget: int) -> dict[str, str]:
    """A green-context engine under the MPS daemon without a thread cap (they do not combine)."""
    return {**_mps_env(daemon, None, _limit(args, budget)), "GREEN_SMS": sms}


def _limit(args: argparse.Namespace, budget: int) -> int | None:
    return None if args.kv == "elastic" else budget


def _cap_label(cap: int | None) -> str:
    return "mps" if cap is None else f"mps_cap{cap}"


def part_table(args: argparse.Namespace, budget: int, daemon_factory) -> dict:
    cs = tuple(args.concurrencies)
    print("alone (whole GPU, no MPS)", flush=True)
    alone = run_group([("alone", {})], budget, args, cs)["alone"]
    modes: dict[str, dict[str, list[dict]]] = {}
    if not args.skip_time_sliced:
        print("pair, time-sliced (no MPS)", flush=True)
        modes["time_sliced"] = run_group([("ts_a", {}), ("ts_b", {})], budget, args, cs)
    for cap in args.mps_caps:
        label = _cap_label(cap)
        with daemon_factory() as daemon:
            print(f"pair, slicelm's MPS daemon, thread cap {cap or 'none'}", flush=True)
            modes[label] = run_group([(f"{label}_a", _mps_env(daemon, cap, _limit(args, budget))),
                                      (f"{label}_b", _mps_env(daemon, cap, _limit(args, budget)))], budget, args, cs)
    if args.green:
        with daemon_factory() as daemon:
            print(f"pair, green contexts {' / '.join(GREEN_HALVES)} under the MPS daemon", flush=True)
            modes["green"] = run_group([(f"green_{i}", _green_env(daemon, sms, args, budget))
                                        for i, sms in enumerate(GREEN_HALVES)], budget, args, cs)
    rows = []
    for i, c in enumerate(cs):
        base = alone[i]["output_tokens_per_s"]
        row = {"concurrency": c, "alone_tok_s": base}
        for mode, runs in modes.items():
            each = [runs[k][i]["output_tokens_per_s"] for k in runs]
            row[mode] = {"tok_s": each, "pct_of_alone": [100 * x / base for x in each],
                         "pair_over_one_engine": sum(each) / base}
        rows.append(row)
    return {"alone": alone, **modes, "rows": rows}


def _isolation(args: argparse.Namespace, budget: int, env30: dict[str, str], env70: dict[str, str],
               full: dict) -> dict:
    """30% and 70% partitions alone, then together, at the isolation concurrency; fractions against ``full``."""
    c = (args.isolation_concurrency,)
    a30 = run_group([("p30", env30)], budget, args, c)["p30"][0]
    a70 = run_group([("p70", env70)], budget, args, c)["p70"][0]
    both = run_group([("p30", env30), ("p70", env70)], budget, args, c)
    t30, t70 = both["p30"][0]["output_tokens_per_s"], both["p70"][0]["output_tokens_per_s"]
    return {
        "alone_30": a30, "alone_70": a70, "together": both,
        "kept_fraction": {"30": t30 / a30["output_tokens_per_s"], "70": t70 / a70["output_tokens_per_s"]},
        "throughput_share_of_pair": {"30": t30 / (t30 + t70), "70": t70 / (t30 + t70)},
        "alone_fraction_of_uncapped": {"30": a30["output_tokens_per_s"] / full["output_tokens_per_s"],
                                       "70": a70["output_tokens_per_s"] / full["output_tokens_per_s"]},
    }


def part_isolation(args: argparse.Namespace, budget: int, daemon_factory) -> dict:
    c = (args.isolation_concurrency,)
    print("uncapped alone (no MPS)", flush=True)
    full = run_group([("uncapped", {})], budget, args, c)["uncapped"][0]
    out: dict = {"uncapped_alone": full}
    with daemon_factory() as daemon:
        if args.mps_caps:
            print("MPS 30% alone / 70% alone / both", flush=True)
            lim = _limit(args, budget)
            out["mps"] = _isolation(args, budget, _mps_env(daemon, 30, lim), _mps_env(daemon, 70, lim), full)
        if args.green:
            print(f"green contexts {' / '.join(GREEN_30_70)} alone / both", flush=True)
            out["green"] = _isolation(args, budget, _green_env(daemon, GREEN_30_70[0], args, budget),
                                      _green_env(daemon, GREEN_30_70[1], args, budget), full)
    return out


def _start_broker(args: argparse.Namespace, run_root: Path):
    """The memory broker for ``--kv elastic``: the GPU's free memory (less 2 GiB) for both engines."""
    import torch

    from slicelm.stack.broker import BrokerState
    from slicelm.stack.broker_server import BrokerServer

    free, _ = torch.cuda.mem_get_info(0)
    args.broker_address = f"ipc://{run_root}/broker.ipc"
    return BrokerServer(args.broker_address, BrokerState({"gpu0": free - (2 << 30)})).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["table", "isolation"], choices=["table", "isolation"])
    ap.add_argument("--memory-fraction", type=float, default=0.4, help="each engine's memory budget")
    ap.add_argument("--concurrencies", type=int, nargs="*", default=list(CONCURRENCIES))
    ap.add_argument("--isolation-concurrency", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=12.0, help="measured window per phase")
    ap.add_argument("--warmup", type=float, default=4.0, help="unmeasured seconds before each window")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--mps-caps", type=lambda v: None if v == "none" else int(v), nargs="*", default=[None],
                    help="MPS thread caps (percent) for the pair table, 'none' = uncapped; one pair per cap")
    ap.add_argument("--skip-time-sliced", action="store_true", help="leave the time-sliced pair out of the table")
    ap.add_argument("--kv", choices=["static", "elastic"], default="static",
                    help="elastic: every engine with elastic KV under a memory broker in this process")
    ap.add_argument("--green", action="store_true", help="add green-context SM partitions (see above)")
    ap.add_argument("--child-elastic", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--green-context-sms", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.max_num_seqs, args.seed, args.child_elastic, args.green_context_sms)
        return

    import torch

    from slicelm.slicing.mps import MPSDaemon

    total = torch.cuda.get_device_properties(0).total_memory
    budget = int(total * args.memory_fraction)
    run_root = Path(tempfile.mkdtemp(prefix="slicelm-coloc-"))
    result = {**environment(), "workload": {
        "name": "co-location of two LLM engines on one GPU",
        "model": "Qwen3-0.6B shape, random bf16 weights", "memory_budget_bytes_each": budget,
        "requests": "closed loop: prompt len U[100,1024], output len U[100,1024], ignore EOS",
        "window_s": args.seconds, "warmup_s": args.warmup, "max_num_seqs": args.max_num_seqs,
        "kv": args.kv, "green_contexts": {"pair": GREEN_HALVES, "isolation_30_70": GREEN_30_70} if args.green
        else None}}
    broker = _start_broker(args, run_root) if args.kv == "elastic" else None

    @contextlib.contextmanager
    def factory():
        daemon = MPSDaemon(0, run_root / "mps")
        started = daemon.start()
        if not started.ok:
            raise SystemExit(f"the MPS daemon did not start: {started.message}")
        try:
            yield daemon
        finally:
            daemon.stop()

    if "table" in args.parts:
        result["table"] = part_table(args, budget, factory)
    if "isolation" in args.parts:
        result["isolation"] = part_isolation(args, budget, factory)
    if broker is not None:
        result["broker_at_end"] = broker.status()
        broker.stop()
    name = "colocation" if args.kv == "static" and not args.green else \
        f"colocation_{args.kv}{'_green' if args.green else ''}"
    save_result(name, result)
    for row in result.get("table", {}).get("rows", []):
        cells = [f"{mode} {row[mode]['pct_of_alone'][0]:5.1f}% {row[mode]['pct_of_alone'][1]:5.1f}% "
                 f"(pair {row[mode]['pair_over_one_engine']:.2f}x)" for mode in row if isinstance(row[mode], dict)]
        print(f"c={row['concurrency']:<4} alone {row['alone_tok_s']:8.0f} | " + " | ".join(cells))
    for kind in ("mps", "green"):
        if kind in result.get("isolation", {}):
            iso = result["isolation"][kind]
            print(f"isolation {kind}:", json.dumps({k: iso[k] for k in
                                                   ("kept_fraction", "throughput_share_of_pair",
                                                    "alone_fraction_of_uncapped")}))


if __name__ == "__main__":
    main()
