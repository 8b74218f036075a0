"""An MPS control daemon per GPU, owned by slicelm, and the env that puts a replica under it.

Each daemon gets private ``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY`` under a run
directory, so it never meets a system-wide daemon or another stack's; it is started with
``CUDA_VISIBLE_DEVICES`` set to its one GPU (``nvidia-cuda-mps-control -d``) and stopped with
``quit`` on the control's stdin. Clients see that GPU as device 0 (MPS remaps devices), so their
``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` names device 0. Where MPS cannot run, :meth:`MPSDaemon.start`
returns a failed :class:`MPSResult` and warns with :class:`MPSFallbackWarning`: the caller then runs
its replicas time-sliced (no compute caps) and says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from slicelm.slicing.spec import Slice

logger = logging.getLogger(__name__)

CONTROL_BINARY = "nvidia-cuda-mps-control"
PID_FILE = "nvidia-cuda-mps-control.pid"
# The control socket is <pipe dir>/control; a Unix socket path holds at most 107 bytes.
MAX_PIPE_DIR_LEN = 107 - len("/control")


class MPSFallbackWarning(UserWarning):
    """MPS could not run here; replicas share the GPU by time slicing, without compute caps."""


@dataclass(frozen=True)
class MPSResult:
    ok: bool
    message: str


def mps_available(binary: str = CONTROL_BINARY) -> bool:
    """Whether an MPS control daemon can be started here (Linux with the control binary on PATH)."""
    return sys.platform.startswith("linux") and shutil.which(binary) is not None


def client_env(gpu_slice: Slice, pipe_dir: str | Path, log_dir: str | Path) -> dict[str, str]:
    """The env a replica needs to run as a client of the daemon at ``pipe_dir`` inside ``gpu_slice``.

    ``sm_percent`` becomes ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (none or 100: no cap); the slice's
    memory becomes ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=<MiB>M``, a second wall behind the engine's budget.
    """
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(log_dir)}
    if gpu_slice.sm_percent is not None and gpu_slice.sm_percent < 100:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(gpu_slice.sm_percent)
    if gpu_slice.memory_mib is not None:
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={gpu_slice.memory_mib}M"
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie nobody reaped yet is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class MPSDaemon:
    """``MPSDaemon(gpu, run_dir)``: ``gpu`` is a GPU uuid (recommended by NVIDIA) or an NVML index."""

    def __init__(self, gpu: str | int, run_dir: str | Path, binary: str = CONTROL_BINARY):
        self.gpu = str(gpu)
        slug = self.gpu[4:12].lower() if self.gpu.startswith(("GPU-", "MIG-")) else self.gpu
        self.root = Path(run_dir).resolve() / f"mps-{slug}"
        self.pipe_dir = self.root / "pipe"
        self.log_dir = self.root / "log"
        self.binary = binary

    def command(self) -> list[str]:
        return [self.binary, "-d"]

    def stop_command(self) -> list[str]:
        return [self.binary]  # reads "quit" on stdin

    def daemon_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(CUDA_VISIBLE_DEVICES=self.gpu, CUDA_MPS_PIPE_DIRECTORY=str(self.pipe_dir),
                   CUDA_MPS_LOG_DIRECTORY=str(self.log_dir))
        return env

    def client_env(self, gpu_slice: Slice) -> dict[str, str]:
        return client_env(gpu_slice, self.pipe_dir, self.log_dir)

    def pid(self) -> int | None:
        try:
            return int((self.pipe_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.pid()
        return pid is not None and _alive(pid)

    def _fail(self, message: str) -> MPSResult:
        message = f"MPS unavailable for GPU {self.gpu}: {message}; falling back to time slicing (no compute caps)"
        logger.warning(message)
        warnings.warn(message, MPSFallbackWarning, stacklevel=3)
        return MPSResult(False, message)

    def start(self, timeout: float = 15.0) -> MPSResult:
        if not sys.platform.startswith("linux"):
            return self._fail("MPS needs Linux")
        exe = shutil.which(self.binary)
        if exe is None:
            return self._fail(f"{self.binary} not found on PATH")
        if len(str(self.pipe_dir)) > MAX_PIPE_DIR_LEN:
            return self._fail(f"pipe directory {self.pipe_dir} is too long for a Unix socket; use a shorter run dir")
        if self.is_running():
            return MPSResult(True, f"MPS daemon for GPU {self.gpu} already running (pid {self.pid()})")
        for d in (self.pipe_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            proc = subprocess.run([exe, "-d"], env=self.daemon_env(), capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return self._fail(f"{self.binary} -d failed: {e}")
        if proc.returncode != 0:
            return self._fail(f"{self.binary} -d exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
                              f"{self._log_tail()}")
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() > deadline:
                return self._fail(f"the control daemon did not come up in {timeout:.0f} s{self._log_tail()}")
            time.sleep(0.05)
        logger.info("MPS control daemon for GPU %s: pid %s, pipe %s", self.gpu, self.pid(), self.pipe_dir)
        return MPSResult(True, f"MPS daemon for GPU {self.gpu} started (pid {self.pid()})")

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.log_dir / "control.log").read_text().splitlines()[-lines:]
        except OSError:
            return ""
        return "; control.log: " + " | ".join(text) if text else ""

    def stop(self, timeout: float = 15.0) -> None:
        """``quit`` to the control daemon, then SIGTERM / SIGKILL to its pid if it does not go."""
        pid = self.pid()
        if pid is None or not _alive(pid):
            return
        exe = shutil.which(self.binary) or self.binary
        try:
            subprocess.run([exe], input="quit\n", env=self.daemon_env(), capture_output=True, text=True,
                           timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.warning("MPS quit for GPU %s failed: %s", self.gpu, e)
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and _alive(pid):
                logger.warning("MPS control daemon %d did not quit; sending %s", pid, sig.name)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    return
            deadline = time.monotonic() + timeout / 3
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _alive(pid):
                return

    def __enter__(self) -> MPSDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
