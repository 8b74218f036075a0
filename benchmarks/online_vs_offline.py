"""Online serving against offline throughput, one sitting, one results file (issue 10's bar).

    python benchmarks/online_vs_offline.py            # ~4 minutes on an H200

Runs, one after the other on this machine and this build:
1. ``throughput.py`` (workload A offline, no peer),
2. ``serving.py --rates inf`` (workload A sent all at once over HTTP to ``slicelm serve``: saturation),
3. ``serving.py`` at 80% of the saturation request rate, with fresh prompts (another seed), for the
   TTFT p99 / p50 ratio there.
Writes ``online_vs_offline_<device>.json`` holding all three runs, the ratio online / offline and the
TTFT ratio; both sides of each ratio come from this file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_slug, environment, save_result

HERE = Path(__file__).resolve().parent


def _run(script: str, args: list[str], name: str, device: str) -> dict:
    cmd = [sys.executable, str(HERE / script), *args, "--name", name]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    matches = sorted(RESULTS.glob(f"{name}*_{device_slug(device)}.json"))
    assert matches, f"{script} wrote no {name}*.json"
    path = matches[-1]
    data = json.loads(path.read_text())
    path.unlink()  # folded into this script's one file
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load-fraction", type=float, default=0.8, help="share of saturation for the TTFT run")
    ap.add_argument("--server-args", default="", help="extra flags for slicelm serve")
    args = ap.parse_args()
    env = environment()
    device = env["device"]
    offline = _run("throughput.py", ["--no-peer"], "ovo_offline", device)
    extra = ["--server-args", args.server_args] if args.server_args else []
    saturation = _run("serving.py", ["--rates", "inf", "--seed", "1", *extra], "ovo_saturation", device)
    sat = saturation["runs"][-1]
    rate = args.load_fraction * sat["request_throughput"]
    loaded = _run("serving.py", ["--rates", f"{rate:.3f}", "--seed", "2", *extra], "ovo_loaded", device)
    run = loaded["runs"][-1]
    result = {
        **env,
        "workload": {"name": "online saturation vs offline workload A, same build, one sitting",
                     "offline": offline["workload"], "online": saturation["workload"],
                     "loaded_rate_req_s": rate, "load_fraction": args.load_fraction},
        "offline_output_tokens_per_s": offline["output_tokens_per_s"],
        "online_saturation_output_tokens_per_s": sat["output_tokens_per_s"],
        "online_over_offline": sat["output_tokens_per_s"] / offline["output_tokens_per_s"],
        "loaded_ttft_p50_s": run["ttft_s"]["p50"], "loaded_ttft_p99_s": run["ttft_s"]["p99"],
        "loaded_ttft_p99_over_p50": run["ttft_s"]["p99"] / run["ttft_s"]["p50"],
        "runs": {"offline": offline, "saturation": saturation, "loaded": loaded},
    }
    save_result("online_vs_offline", result)
    print(f"offline {result['offline_output_tokens_per_s']:.0f} tok/s, online saturation "
          f"{result['online_saturation_output_tokens_per_s']:.0f} tok/s = {100 * result['online_over_offline']:.1f}%;"
          f" at {rate:.1f} req/s TTFT p50 {1e3 * run['ttft_s']['p50']:.0f} ms, p99 {1e3 * run['ttft_s']['p99']:.0f} ms"
          f" ({result['loaded_ttft_p99_over_p50']:.2f}x)")


if __name__ == "__main__":
    main()
