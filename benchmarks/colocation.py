"""Two LLM engines on one GPU: co-location throughput and compute isolation (issue 8's GPU table).

    python benchmarks/colocation.py                       # both parts, ~5 minutes on an H200
    python benchmarks/colocation.py --parts table         # co-location table only
    python benchmarks/colocation.py --parts isolation     # 30 / 70 MPS caps only
    python benchmarks/colocation.py --kv elastic --green --skip-time-sliced --isolation-kinds green \\
        --seconds 5 --warmup 2 --time-budget 165          # issue 24's re-run: under 3 minutes
    python benchmarks/colocation.py --smoke --kv elastic --green   # CPU dry run of the same orchestration

Each engine is its own process (one engine per process, as `slicelm up` runs them), Qwen3-0.6B shape with
random bf16 weights, a fixed memory budget. A process loads once, then runs phases on command from
this parent: keep C requests in flight (workload A's length distribution, ignore EOS; a finished
request is replaced at once) for a fixed window, and report the generation tokens produced inside the
window. The engines of a phase start it together.

Table: concurrency 2, 32 and 256 per engine; throughput of each engine as a % of the same engine running
alone on the whole GPU (same memory budget), under (a) plain time slicing and (b) the MPS daemon that
slicelm owns (slicelm.slicing.mps, no thread cap: what `slicelm up` gives replicas without
requestGPUCores). Isolation, at concurrency 256: two engines with MPS thread caps 30% and 70%
(`requestGPUCores: 30 / 70`) start once; each runs alone in its slice (the other idle), then both at once.

``--kv elastic``: every engine runs with elastic KV under a memory broker in this process (each guaranteed
its budget, borrowing what is free). ``--green``: adds a pair whose engines run in disjoint CUDA green
contexts (half the SMs each, ``--green-context-sms 64@0`` / ``64@64``, under the MPS daemon without a
thread cap) to the table, and green contexts of 40 / 88 SMs (30 / 70%) to the isolation part
(``--isolation-kinds`` picks mps and/or green). The result file is ``colocation_<kv>[_green]_<device>.json``
(``colocation_<device>.json`` for the default run), written after every group of engines with
``"complete": false`` until the end. ``--time-budget S``: a group whose start-up (the longest seen so far)
and phases would end after S seconds is not started and is listed under ``skipped``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, save_result

from slicelm.slicing.broker_client import BROKER_ENV, GPU_ENV, REPLICA_ENV

CONCURRENCIES = (2, 32, 256)
GREEN_HALVES = ("64@0", "64@64")  # disjoint halves of the H200's 132 SMs (groups of 8: 128 usable)
GREEN_30_70 = ("40@0", "88@40")  # ~30% / ~70% of the SMs, disjoint
SMOKE_KV_BYTES = 16 << 20
CHILD = Path(__file__).resolve().parent / "colocation_child.py"


# ---------------------------------------------------------------------------------------------- parent
class Engine:
    def __init__(self, name: str, budget: int, env: dict[str, str], args: argparse.Namespace, seed: int) -> None:
        self.name = name
        cmd = [sys.executable, str(CHILD), str(budget), "--max-num-seqs", str(args.max_num_seqs), "--seed", str(seed)]
        if args.smoke:
            cmd.append("--smoke")
            env = {**env, "OMP_NUM_THREADS": "1"}
        if args.kv == "elastic":
            cmd.append("--elastic")
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


Phase = tuple[int, tuple[str, ...]]  # concurrency, the engines that run it (the others idle)


class OutOfTime(Exception):
    pass


class Run:
    """The result so far (saved after every group), the time budget, and the longest engine start-up seen."""

    def __init__(self, args: argparse.Namespace, name: str, result: dict[str, Any]) -> None:
        self.args, self.name, self.result = args, name, {**result, "complete": False, "skipped": []}
        self.t0 = time.monotonic()
        self.startups: list[float] = []  # seconds each group took to be ready

    def admit(self, label: str, phases: int) -> None:
        a = self.args
        startup = max(self.startups, default=20.0 if a.smoke else 45.0)
        need = startup + phases * (a.seconds + a.warmup + 1.0)
        if a.time_budget and time.monotonic() - self.t0 + need > a.time_budget:
            self.result["skipped"].append(label)
            print(f"  skipped {label}: needs ~{need:.0f} s, the time budget has "
                  f"{a.time_budget - (time.monotonic() - self.t0):.0f} s left", flush=True)
            raise OutOfTime(label)

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        save_result(self.name, self.result)


def run_group(run: Run, label: str, specs: list[tuple[str, dict[str, str]]], budget: int,
              phases: list[Phase]) -> dict[str, list[dict]]:
    """Starts the engines of one group together and runs ``phases`` on them; raises OutOfTime (nothing started)
    when the group would end after the time budget."""
    run.admit(label, len(phases))
    args = run.args
    t0 = time.monotonic()
    engines = {name: Engine(name, budget, env, args, seed) for seed, (name, env) in enumerate(specs)}
    try:
        for e in engines.values():
            e.wait_ready()
        run.startups.append(time.monotonic() - t0)
        out: dict[str, list[dict]] = {name: [] for name in engines}
        for c, active in phases:
            for name in active:
                engines[name].start_phase(c, args.seconds, args.warmup)
            for name in active:
                out[name].append(engines[name].result())
                print(f"  {name:>14} c={c:<4} {out[name][-1]['output_tokens_per_s']:9.0f} tok/s"
                      f"{'' if len(active) == len(engines) else ' (alone)'}", flush=True)
        return out
    finally:
        for e in engines.values():
            e.close()


def _all(specs: list[tuple[str, dict[str, str]]], concurrencies: tuple[int, ...]) -> list[Phase]:
    return [(c, tuple(name for name, _ in specs)) for c in concurrencies]


def _mps_env(daemon, percent: int | None, budget: int | None) -> dict[str, str]:
    """MPS client env: thread cap ``percent``, pinned memory limit ``budget`` (None with elastic KV: the broker
    bounds memory, an engine may borrow beyond its budget). No daemon (the CPU smoke run): no env."""
    from slicelm.slicing.spec import Slice

    if daemon is None:
        return {}
    return daemon.client_env(Slice(device_index=0, device_uuid=None, memory_bytes=budget, sm_percent=percent,
                                   source="stack"))


def _green_env(daemon, sms: str, args: argparse.Namespace, budget: int) -> dict[str, str]:
    """A green-context engine under the MPS daemon without a thread cap (they do not combine); the CPU smoke
    run has no green contexts: the same engines without one."""
    return {**_mps_env(daemon, None, _limit(args, budget)), **({} if args.smoke else {"GREEN_SMS": sms})}


def _limit(args: argparse.Namespace, budget: int) -> int | None:
    return None if args.kv == "elastic" else budget


def _cap_label(cap: int | None) -> str:
    return "mps" if cap is None else f"mps_cap{cap}"


DaemonFactory = Callable[[], contextlib.AbstractContextManager]


def _pair(run: Run, label: str, title: str, factory: DaemonFactory,
          envs: Callable[[Any], list[dict[str, str]]], budget: int) -> None:
    """One pair of the table under a fresh MPS daemon (or none), stored as ``table[label]``."""
    print(title, flush=True)
    with contextlib.suppress(OutOfTime), factory() as daemon:
        specs = [(f"{label}_{x}", env) for x, env in zip("ab", envs(daemon))]
        run.result["table"][label] = run_group(run, label, specs, budget, _all(specs, tuple(run.args.concurrencies)))
        run.result["table"]["rows"] = table_rows(run.result["table"], tuple(run.args.concurrencies))
        run.save()


def part_table(run: Run, budget: int, factory: DaemonFactory) -> None:
    args = run.args
    cs = tuple(args.concurrencies)
    table: dict[str, Any] = run.result.setdefault("table", {})
    print("alone (whole GPU, no MPS)", flush=True)
    with contextlib.suppress(OutOfTime):
        table["alone"] = run_group(run, "alone", [("alone", {})], budget, _all([("alone", {})], cs))["alone"]
        run.save()
    if "alone" not in table:
        return
    if not args.skip_time_sliced:
        _pair(run, "time_sliced", "pair, time-sliced (no MPS)", contextlib.nullcontext, lambda _: [{}, {}], budget)
    for cap in args.mps_caps:
        _pair(run, _cap_label(cap), f"pair, slicelm's MPS daemon, thread cap {cap or 'none'}", factory,
              lambda d, cap=cap: [_mps_env(d, cap, _limit(args, budget))] * 2, budget)
    if args.green:
        _pair(run, "green", f"pair, green contexts {' / '.join(GREEN_HALVES)} under the MPS daemon", factory,
              lambda d: [_green_env(d, sms, args, budget) for sms in GREEN_HALVES], budget)


def table_rows(table: dict[str, Any], cs: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    modes = {k: v for k, v in table.items() if k not in ("alone", "rows")}
    for i, c in enumerate(cs):
        base = table["alone"][i]["output_tokens_per_s"]
        row = {"concurrency": c, "alone_tok_s": base}
        for mode, runs in modes.items():
            each = [runs[k][i]["output_tokens_per_s"] for k in runs]
            row[mode] = {"tok_s": each, "pct_of_alone": [100 * x / base for x in each],
                         "pair_over_one_engine": sum(each) / base}
        rows.append(row)
    return rows


def _isolation(run: Run, label: str, budget: int, env30: dict[str, str], env70: dict[str, str],
               full: dict) -> dict:
    """30% and 70% partitions started once: each alone (the other idle), then together; fractions of ``full``."""
    c = run.args.isolation_concurrency
    out = run_group(run, label, [("p30", env30), ("p70", env70)], budget,
                    [(c, ("p30",)), (c, ("p70",)), (c, ("p30", "p70"))])
    a30, a70 = out["p30"][0], out["p70"][0]
    t30, t70 = out["p30"][1]["output_tokens_per_s"], out["p70"][1]["output_tokens_per_s"]
    return {
        "alone_30": a30, "alone_70": a70, "together": {"p30": [out["p30"][1]], "p70": [out["p70"][1]]},
        "kept_fraction": {"30": t30 / a30["output_tokens_per_s"], "70": t70 / a70["output_tokens_per_s"]},
        "throughput_share_of_pair": {"30": t30 / (t30 + t70), "70": t70 / (t30 + t70)},
        "alone_fraction_of_uncapped": {"30": a30["output_tokens_per_s"] / full["output_tokens_per_s"],
                                       "70": a70["output_tokens_per_s"] / full["output_tokens_per_s"]},
    }


def part_isolation(run: Run, budget: int, factory: DaemonFactory) -> None:
    args = run.args
    c = args.isolation_concurrency
    iso: dict[str, Any] = run.result.setdefault("isolation", {})
    alone = run.result.get("table", {}).get("alone")
    if alone and c in args.concurrencies:  # the table's engine alone on the whole GPU, at this concurrency
        iso["uncapped_alone"] = alone[list(args.concurrencies).index(c)]
    else:
        print("uncapped alone (no MPS)", flush=True)
        with contextlib.suppress(OutOfTime):
            iso["uncapped_alone"] = run_group(run, "uncapped", [("uncapped", {})], budget,
                                              [(c, ("uncapped",))])["uncapped"][0]
    if "uncapped_alone" not in iso:
        return
    kinds = {"mps": ("MPS 30% / 70%", lambda d: (_mps_env(d, 30, _limit(args, budget)),
                                                 _mps_env(d, 70, _limit(args, budget)))),
             "green": (f"green contexts {' / '.join(GREEN_30_70)}",
                       lambda d: tuple(_green_env(d, sms, args, budget) for sms in GREEN_30_70))}
    for kind in args.isolation_kinds:
        if kind == "green" and not args.green:
            continue
        title, envs = kinds[kind]
        print(f"{title}: each alone, then both", flush=True)
        with contextlib.suppress(OutOfTime), factory() as daemon:
            iso[kind] = _isolation(run, f"isolation_{kind}", budget, *envs(daemon), iso["uncapped_alone"])
            run.save()


def _start_broker(args: argparse.Namespace, run_root: Path, budget: int):
    """The memory broker for ``--kv elastic``: the GPU's free memory (less 2 GiB) for both engines (the CPU
    smoke run: three budgets)."""
    from slicelm.stack.broker import BrokerState
    from slicelm.stack.broker_server import BrokerServer

    if args.smoke:
        capacity = 3 * budget
    else:
        import torch

        capacity = torch.cuda.mem_get_info(0)[0] - (2 << 30)
    args.broker_address = f"ipc://{run_root}/broker.ipc"
    return BrokerServer(args.broker_address, BrokerState({"gpu0": capacity})).start()


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["table", "isolation"], choices=["table", "isolation"])
    ap.add_argument("--memory-fraction", type=float, default=0.4, help="each engine's memory budget")
    ap.add_argument("--concurrencies", type=int, nargs="*", default=list(CONCURRENCIES))
    ap.add_argument("--isolation-concurrency", type=int, default=256)
    ap.add_argument("--isolation-kinds", nargs="*", default=["mps", "green"], choices=["mps", "green"])
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per phase")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each window")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; groups that would end later are skipped")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--mps-caps", type=lambda v: None if v == "none" else int(v), nargs="*", default=[None],
                    help="MPS thread caps (percent) for the pair table, 'none' = uncapped; one pair per cap")
    ap.add_argument("--skip-time-sliced", action="store_true", help="leave the time-sliced pair out of the table")
    ap.add_argument("--kv", choices=["static", "elastic"], default="static",
                    help="elastic: every engine with elastic KV under a memory broker in this process")
    ap.add_argument("--green", action="store_true", help="add green-context SM partitions (see above)")
    ap.add_argument("--smoke", action="store_true", help="CPU: a tiny model, no MPS, no green contexts, short phases")
    ap.add_argument("--name", default=None, help="result file name (default: colocation[_<kv>[_green]])")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.warmup = min(args.seconds, 2.0), min(args.warmup, 1.0)
        args.concurrencies, args.isolation_concurrency, args.max_num_seqs = [2, 8], 8, 16
    return args


def _daemon_factory(args: argparse.Namespace, run_root: Path) -> DaemonFactory:
    """Fresh MPS daemons, a context manager each; the smoke run's yields None."""

    @contextlib.contextmanager
    def factory() -> Iterator[Any]:
        if args.smoke:
            yield None
            return
        from slicelm.slicing.mps import MPSDaemon

        daemon = MPSDaemon(0, run_root / "mps")
        started = daemon.start()
        if not started.ok:
            raise SystemExit(f"the MPS daemon did not start: {started.message}")
        try:
            yield daemon
        finally:
            daemon.stop()

    return factory


def _print_summary(result: dict[str, Any]) -> None:
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


def main() -> None:
    args = _args()
    if args.smoke:
        budget = SMOKE_KV_BYTES
    else:
        import torch

        budget = int(torch.cuda.get_device_properties(0).total_memory * args.memory_fraction)
    run_root = Path(tempfile.mkdtemp(prefix="slicelm-coloc-"))
    name = args.name or ("colocation" if args.kv == "static" and not args.green else
                         f"colocation_{args.kv}{'_green' if args.green else ''}")
    run = Run(args, name + ("_smoke" if args.smoke else ""), {**environment(), "workload": {
        "name": "co-location of two LLM engines on one GPU",
        "model": "tiny Qwen3 shape, CPU (smoke)" if args.smoke else "Qwen3-0.6B shape, random bf16 weights",
        "memory_budget_bytes_each": budget,
        "requests": "closed loop: prompt len U[100,1024], output len U[100,1024], ignore EOS" if not args.smoke
        else "closed loop: prompt len U[8,48], output len U[4,24], ignore EOS",
        "window_s": args.seconds, "warmup_s": args.warmup, "max_num_seqs": args.max_num_seqs,
        "concurrencies": args.concurrencies, "isolation_concurrency": args.isolation_concurrency,
        "isolation": "both partitions start once; each runs alone (the other idle), then both",
        "kv": args.kv, "green_contexts": {"pair": GREEN_HALVES, "isolation_30_70": GREEN_30_70} if args.green
        else None, "time_budget_s": args.time_budget}})
    broker = _start_broker(args, run_root, budget) if args.kv == "elastic" else None
    try:
        factory = _daemon_factory(args, run_root)
        if "table" in args.parts:
            part_table(run, budget, factory)
        if "isolation" in args.parts:
            part_isolation(run, budget, factory)
        if broker is not None:
            run.result["broker_at_end"] = broker.status()
    finally:
        if broker is not None:
            broker.stop()
    run.result["complete"] = True
    run.save()
    _print_summary(run.result)


if __name__ == "__main__":
    main()
