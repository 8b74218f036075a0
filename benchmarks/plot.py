"""PNG plots of benchmark results: throughput vs floor and peer, serving latency vs rate.

    python benchmarks/plot.py benchmarks/results/throughput_*.json benchmarks/results/serving_*.json

Needs matplotlib (present on the GPU machines; `pip install matplotlib` elsewhere).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def plot_throughput(result: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    bars = {"slicelm": result["output_tokens_per_s"], "floor": result["floor_output_tokens_per_s"]}
    if result.get("peer_output_tokens_per_s"):
        bars = {"transformers\ngenerate_batch": result["peer_output_tokens_per_s"], **bars}
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(list(bars), list(bars.values()), color=["#999", "#2a7", "#ccc"][-len(bars):])
    for i, v in enumerate(bars.values()):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Workload A ({result['workload']['shape']}) on {result['device']}\n"
                 f"{100 * result['fraction_of_floor']:.0f}% of the bandwidth floor")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_serving(result: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in result["runs"] if r["request_rate"] != "inf"]
    rates = [float(r["request_rate"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (key, label) in enumerate((("ttft_s", "TTFT"), ("tpot_s", "TPOT"))):
        for pct in ("p50", "p99"):
            axes[i].plot(rates, [1e3 * r[key][pct] for r in rows], marker="o", label=f"{label} {pct}")
    for ax, name in zip(axes, ("TTFT (ms)", "TPOT (ms)")):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(name)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"Workload C on {result['device']}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    for name in sys.argv[1:]:
        path = Path(name)
        result = json.loads(path.read_text())
        out = path.with_suffix(".png")
        if "fraction_of_floor" in result and "output_tokens_per_s" in result:
            plot_throughput(result, out)
        elif "runs" in result:
            plot_serving(result, out)
        else:
            continue
        if os.environ.get("OUT"):
            (Path(os.environ["OUT"]) / out.name).write_bytes(out.read_bytes())
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
