"""The ``slicelm`` CLI in a subprocess for the stack tests (offline, no tokenizer threads), and ``ps --format json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def slicelm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def ps(run_dir: Path) -> dict:
    r = slicelm("ps", "--run-dir", str(run_dir), "--format", "json", timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def processes_mentioning(text: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            out.append(int(pid))
    return out
