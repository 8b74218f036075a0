"""``slicelm router``'s flags: errors name the flag, k8s without its module is a clear error, no torch imported;
and stack discovery from a ``slicelm up`` run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slicelm.router.discovery import StackDiscovery, StaticDiscovery

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", "router", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize(("args", "flag"), [
    (["--routing-logic", "kvaware", "--static-backends", "http://x:1", "--static-models", "m"], "--routing-logic"),
    (["--service-discovery", "dns"], "--service-discovery"),
    (["--routing-logic", "session", "--static-backends", "http://x:1", "--static-models", "m"], "--session-key"),
    (["--static-backends", "http://x:1,http://y:2", "--static-models", "m"], "--static-models"),
    (["--static-models", "m"], "--static-backends"),
    (["--static-backends", "http://x:1", "--static-models", "m", "--engine-stats-interval", "0"],
     "--engine-stats-interval"),
    (["--static-backends", "http://x:1", "--static-models", "m", "--max-queue-size", "-1"], "--max-queue-size"),
    (["--static-backends", "http://x:1", "--static-models", "m", "--static-model-types", "chat,chat"],
     "--static-model-types"),
    (["--static-backends", "x:1", "--static-models", "m"], "http://"),
])
def test_bad_flags_name_the_flag(args: list[str], flag: str) -> None:
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert flag in r.stderr
    assert "Traceback" not in r.stderr


def test_router_cli_does_not_import_torch() -> None:
    code = ("import sys; import slicelm.entrypoints.cli, slicelm.router.app, slicelm.router.cli; "
            "print('torch' in sys.modules, 'slicelm.engine' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "slicelm.entrypoints.cli", "router", "--help"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=60)
    assert r.returncode == 0 and "--static-backends" in r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "slicelm.engine" not in imported


def test_static_discovery_keeps_order_and_types() -> None:
    d = StaticDiscovery(["http://a:1/", "http://b:2"], ["m1", "m2"], ["chat", "embeddings"])
    assert [(e.url, e.models, e.model_type) for e in d.endpoints()] == [
        ("http://a:1", ("m1",), "chat"), ("http://b:2", ("m2",), "embeddings")]


def _write_state(path: Path, replicas: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stack": "s", "supervisor_pid": 1, "router": None, "replicas": replicas}))
    os.replace(tmp, path)


def test_stack_discovery_follows_the_run_dir_state(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    d = StackDiscovery(tmp_path)  # a run dir
    assert d.endpoints() == []
    _write_state(state, [
        {"model": "chat", "replica": 0, "served_names": ["chat", "alias"], "url": "http://127.0.0.1:9001",
         "state": "ready"},
        {"model": "chat", "replica": 1, "served_names": ["chat"], "url": "http://127.0.0.1:9002", "state": "starting"},
    ])
    d.reload()
    eps = d.endpoints()
    assert [(e.url, e.models) for e in eps] == [("http://127.0.0.1:9001", ("chat", "alias"))]
    assert eps[0].labels == {"model": "chat", "replica": 0}
    time.sleep(0.01)
    _write_state(state, [
        {"model": "chat", "replica": 1, "served_names": ["chat"], "url": "http://127.0.0.1:9002", "state": "ready"}])
    os.utime(state, (time.time() + 1, time.time() + 1))
    d.reload()
    assert [e.url for e in d.endpoints()] == ["http://127.0.0.1:9002"]
    assert [e.url for e in StackDiscovery(state).endpoints()] == ["http://127.0.0.1:9002"]  # the file itself
