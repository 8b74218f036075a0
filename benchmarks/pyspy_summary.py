"""Summarise py-spy collapsed stacks (``-f raw``): samples per process, then the heaviest frames.

    python benchmarks/pyspy_summary.py DIR [--top 25]

For each ``*.txt`` in DIR: the number of samples (at ``-r`` Hz this is CPU-seconds x rate when
recorded without ``--idle``), the functions with most *self* samples, and with most *total* samples.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def summarise(path: Path, top: int) -> str:
    self_, total = Counter(), Counter()
    n = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        n += c
        frames = stack.split(";")
        self_[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    lines = [f"== {path.name}: {n} samples"]
    lines += ["  self:"] + [f"    {c:6d} {100 * c / max(n, 1):5.1f}%  {f[:150]}" for f, c in self_.most_common(top)]
    lines += ["  total:"] + [f"    {c:6d} {100 * c / max(n, 1):5.1f}%  {f[:150]}" for f, c in total.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    for path in sorted(args.dir.glob("*.txt")):
        if path.name != "top.txt":
            print(summarise(path, args.top))


if __name__ == "__main__":
    main()
