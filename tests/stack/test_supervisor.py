"""Supervisor failure paths with real processes: a replica that cannot start is named with its log and
nothing stays behind; a SIGKILLed supervisor takes its children with it (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from utils_stack import ENV, processes_mentioning

from slicelm.stack.state import pid_alive

pytestmark = pytest.mark.slow


def write(tmp: Path, models: list[dict]) -> Path:
    path = tmp / "stack.yaml"
    path.write_text(yaml.safe_dump({"servingEngineSpec": {"modelSpec": models},
                                    "routerSpec": {"enableRouter": False}}))
    return path


def test_replica_that_fails_to_start_is_named_with_its_log(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    path = write(tmp_path, [{"name": "ok", "modelURL": "all-minilm-l6-v2"},
                            {"name": "broken", "modelURL": str(missing)}])
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", "up", str(path), "--run-dir", str(run_dir)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 1, r
    assert "broken/0 exited with code" in r.stderr and "while starting" in r.stderr
    assert f"last lines of {run_dir}/logs/broken-0.log" in r.stderr
    assert "no-such-model" in r.stderr.split("last lines of", 1)[1]  # the log's own error is quoted
    state = json.loads((run_dir / "state.json").read_text())
    assert state["phase"] == "failed" and state["supervisor_pid"] is None and "broken/0" in state["error"]
    assert processes_mentioning(str(missing)) == []
    assert all(not pid_alive(r["pid"]) for r in state["replicas"] if r["pid"])


def test_sigkilled_supervisor_leaves_no_orphans(tmp_path: Path) -> None:
    path = write(tmp_path, [{"name": "embed", "modelURL": "all-minilm-l6-v2"},
                            {"name": "embed2", "modelURL": "all-minilm-l6-v2"}])
    run_dir = tmp_path / "run"
    sup = subprocess.Popen([sys.executable, "-m", "slicelm.entrypoints.cli", "up", str(path), "--run-dir",
                            str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline, pids = time.time() + 60, []
        while time.time() < deadline and len(pids) < 2:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                pids = [r["pid"] for r in json.loads((run_dir / "state.json").read_text())["replicas"] if r["pid"]]
            time.sleep(0.1)
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        os.kill(sup.pid, signal.SIGKILL)
        sup.wait(10)
        deadline = time.time() + 15
        while any(pid_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if pid_alive(p)], "children outlived their SIGKILLed supervisor"
        # `down` still works on the stale run dir and finds nothing to kill
        r = subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", "down", "--run-dir", str(run_dir)],
                           capture_output=True, text=True, timeout=60, env=ENV)
        assert r.returncode == 0 and "leftover" not in r.stdout
    finally:
        if sup.poll() is None:
            sup.kill()
