"""Compute shares under slicelm's MPS daemon: 30 / 70 cores on one GPU (issue 8, "Compute shares" (a)).

    python benchmarks/slices.py                     # ~2 minutes on an H200
    python benchmarks/slices.py --seconds 5 --shares 10 90

A compute-bound probe (bf16 N×N×N matmuls back to back) runs in child processes. Scenarios, in order:
each probe alone on the whole GPU; the pair time-sliced (no MPS, no caps); then under one MPS control
daemon that slicelm starts for the GPU (``slicelm.slicing.mps``, private pipe/log dirs), each share
alone and the pair at once, with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` from the share. Children load
first, then start together and run for ``--seconds``. Reported per side: TFLOP/s and its share of
the pair's total, and how far the share is from the quota (goal: within ±5 points).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, save_result

from slicelm.slicing.mps import MPSDaemon
from slicelm.slicing.spec import Slice


def child(size: int, seconds: float) -> None:
    """Probe: load, print "ready", wait for "go" on stdin, run matmuls for ``seconds``, print JSON."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    for _ in range(5):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    print("ready", flush=True)
    sys.stdin.readline()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        iters += 8
    elapsed = time.perf_counter() - t0
    print(json.dumps({"iters": iters, "seconds": elapsed, "tflops": 2 * size**3 * iters / elapsed / 1e12}),
          flush=True)


def run_together(envs: list[dict[str, str]], args: argparse.Namespace) -> list[float]:
    """Starts one probe per env, releases them together once all are loaded; their TFLOP/s."""
    cmd = [sys.executable, __file__, "--child", "--size", str(args.size), "--seconds", str(args.seconds)]
    procs = [subprocess.Popen(cmd, env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for env in envs]
    try:
        for p in procs:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"probe failed to start (rc {p.wait()}): {line!r}")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.wait(timeout=60)
        return [round(r["tflops"], 1) for r in results]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def pair_report(tflops: list[float], quotas: list[int] | None) -> dict:
    total = sum(tflops)
    sides = []
    for i, t in enumerate(tflops):
        side = {"tflops": t, "share_pct": round(100 * t / total, 1)}
        if quotas:
            side["quota_pct"] = quotas[i]
            side["error_points"] = round(side["share_pct"] - quotas[i], 1)
        sides.append(side)
    report = {"sides": sides, "total_tflops": round(total, 1)}
    if quotas:
        report["within_5_points"] = all(abs(s["error_points"]) <= 5 for s in sides)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shares", type=int, nargs=2, default=[30, 70], metavar=("A", "B"),
                    help="cores (percent of SMs) of the two slices (default 30 70)")
    ap.add_argument("--size", type=int, default=8192, help="matmul size N (default 8192)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per scenario (default 10)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.size, args.seconds)

    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    uuid = subprocess.check_output(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader", "-i", "0"],
                                   text=True).strip()
    visible = {"CUDA_VISIBLE_DEVICES": uuid}
    shares = list(args.shares)
    result = {**environment(), "workload": {
        "probe": f"bf16 matmul {args.size}x{args.size}x{args.size}, back to back, {args.seconds:g} s per scenario",
        "shares": shares, "gpu": uuid}}
    t0 = time.monotonic()
    alone = run_together([visible], args)[0]
    result["alone_uncapped_tflops"] = alone
    result["time_sliced_pair"] = pair_report(run_together([visible, visible], args), None)
    with tempfile.TemporaryDirectory(prefix="slm-") as run_dir:
        daemon = MPSDaemon(uuid, run_dir)
        started = daemon.start()
        result["mps"] = {"ok": started.ok, "message": started.message}
        if started.ok:
            try:
                envs = [{**visible, **daemon.client_env(Slice(0, uuid, None, s, "mps"))} for s in shares]
                capped = [run_together([env], args)[0] for env in envs]
                result["mps_alone"] = [{"cores_pct": s, "tflops": t, "pct_of_uncapped": round(100 * t / alone, 1)}
                                       for s, t in zip(shares, capped)]
                result["mps_pair"] = pair_report(run_together(envs, args), shares)
            finally:
                daemon.stop()
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result, indent=2))
    save_result("slices", result)


if __name__ == "__main__":
    main()
