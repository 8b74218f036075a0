"""MPS daemon management: env and command lines, fallback without MPS, a real start/stop (fake control
binary on CPU, the real one on a GPU machine)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time

import pytest

from slicelm.slicing import mps
from slicelm.slicing.mps import MPSDaemon, MPSFallbackWarning
from slicelm.slicing.spec import Slice

# Behaves like nvidia-cuda-mps-control for what MPSDaemon relies on: -d leaves a daemon behind and
# writes its pid into the pipe dir; "quit" on stdin ends it.
FAKE_CONTROL = """#!/bin/sh
if [ "$1" = "-d" ]; then
  echo "started on $CUDA_VISIBLE_DEVICES" > "$CUDA_MPS_LOG_DIRECTORY/control.log"
  setsid sleep 300 >/dev/null 2>&1 < /dev/null &
  echo $! > "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid"
  exit 0
fi
read cmd
[ "$cmd" = quit ] && [ -z "$IGNORE_QUIT" ] && kill "$(cat "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid")"
exit 0
"""


@pytest.fixture
def fake_control(tmp_path):
    path = tmp_path / "bin" / "nvidia-cuda-mps-control"
    path.parent.mkdir()
    path.write_text(FAKE_CONTROL)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_client_env_from_slice(tmp_path):
    d = MPSDaemon("GPU-0f1e2d3c-aaaa-bbbb-cccc-ddddeeeeffff", tmp_path)
    env = d.client_env(Slice(0, None, 14000 << 20, 30, "stack"))
    assert env == {"CUDA_MPS_PIPE_DIRECTORY": str(d.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(d.log_dir),
                   "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=14000M"}
    assert d.pipe_dir == tmp_path.resolve() / "mps-0f1e2d3c" / "pipe"
    # 0 cores (no sm share) and 100% are no cap; no memory slice is no pinned limit
    bare = d.client_env(Slice(0, None, None, None, "stack"))
    assert set(bare) == {"CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"}
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in d.client_env(Slice(0, None, None, 100, "stack"))


def test_daemon_command_and_env(tmp_path):
    d = MPSDaemon(3, tmp_path)
    assert d.command() == ["nvidia-cuda-mps-control", "-d"]
    assert d.stop_command() == ["nvidia-cuda-mps-control"]
    env = d.daemon_env({"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert env == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "3", "CUDA_MPS_PIPE_DIRECTORY": str(d.pipe_dir),
                   "CUDA_MPS_LOG_DIRECTORY": str(d.log_dir)}


def test_missing_binary_falls_back_with_a_warning(tmp_path):
    d = MPSDaemon("GPU-x", tmp_path, binary="no-such-mps-control-binary")
    assert not mps.mps_available("no-such-mps-control-binary")
    with pytest.warns(MPSFallbackWarning, match="time slicing"):
        result = d.start()
    assert not result.ok and "not found" in result.message
    d.stop()  # nothing to stop: no error


def test_failing_control_falls_back_with_its_log(tmp_path, fake_control):
    with open(fake_control, "w") as f:
        f.write('#!/bin/sh\necho "no GPU" >&2\nexit 1\n')
    with pytest.warns(MPSFallbackWarning, match="exited 1: no GPU"):
        assert not MPSDaemon(0, tmp_path / "run", binary=fake_control).start().ok


def test_too_long_pipe_dir_is_refused(tmp_path, fake_control):
    with pytest.warns(MPSFallbackWarning, match="too long"):
        assert not MPSDaemon(0, tmp_path / ("x" * 120), binary=fake_control).start().ok


def test_start_and_stop_a_daemon_process(tmp_path, fake_control):
    d = MPSDaemon("GPU-12345678-0000", tmp_path / "run", binary=fake_control)
    assert d.start().ok
    pid = d.pid()
    assert d.is_running() and mps._alive(pid)
    assert (d.log_dir / "control.log").read_text().strip() == "started on GPU-12345678-0000"
    assert d.start().message.endswith(f"already running (pid {pid})")  # a second start adopts it
    d.stop()
    assert not mps._alive(pid) and not d.is_running()


def test_stop_kills_a_daemon_that_ignores_quit(tmp_path, fake_control, monkeypatch):
    monkeypatch.setenv("IGNORE_QUIT", "1")
    d = MPSDaemon(0, tmp_path / "run", binary=fake_control)
    assert d.start().ok
    pid = d.pid()
    t0 = time.monotonic()
    d.stop(timeout=3)
    assert not mps._alive(pid) and time.monotonic() - t0 < 5


@pytest.mark.gpu
@pytest.mark.skipif(not (mps.mps_available() and shutil.which("nvidia-smi")), reason="needs a GPU and MPS")
def test_real_mps_daemon(tmp_path):
    """A real daemon on GPU 0: a torch client runs a matmul through it (the control log sees the client)."""
    import sys

    uuid = subprocess.check_output(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader", "-i", "0"],
                                   text=True).strip()
    d = MPSDaemon(uuid, tmp_path / "r")
    try:
        assert d.start().ok
        env = {**os.environ, **d.client_env(Slice(0, uuid, 4 << 30, 30, "mps")), "CUDA_VISIBLE_DEVICES": uuid}
        code = "import torch; x = torch.ones(1024, 1024, device='cuda'); print(float((x @ x).sum()))"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert float(out.stdout) == 1024.0 ** 3
        log = (d.log_dir / "control.log").read_text().lower()
        assert "client" in log, log
        pid = d.pid()
    finally:
        d.stop()
    assert not mps._alive(pid)


def test_slices_benchmark_parses_args_on_cpu():
    """benchmarks/slices.py is run by hand on a GPU machine; here it must at least import and parse."""
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "slices.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--shares" in out.stdout and "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" in out.stdout
