"""Keeps a stack's processes alive: start, wait for /health, restart with backoff, drain on SIGTERM.

Runs in the main thread of ``slicelm up`` (foreground) or of its detached copy (``--detach``). Every
child runs in its own process group with PR_SET_PDEATHSIG, so none outlives the supervisor even when
the supervisor is SIGKILLed; on SIGTERM / Ctrl-C each group gets SIGTERM (the server drains), then
SIGKILL after the grace period. ``state.json`` in the run dir is rewritten on every change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slicelm.stack.launch import Launch
from slicelm.stack.procs import signal_group, spawn, stop_group, tail
from slicelm.stack.state import write_state

logger = logging.getLogger("slicelm.stack")
POLL_S = 0.2
MAX_BACKOFF_S = 30.0
DRAIN_GRACE_S = 20.0
STABLE_S = 30.0  # a replica up this long has recovered: its next death starts the backoff over


class StartupError(RuntimeError):
    """A process died or timed out before it was healthy; the message names it and quotes its log."""


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Managed:
    """A launch and its process: starting -> ready -> (dead -> restarting -> starting …) | failed | stopped."""

    launch: Launch
    proc: subprocess.Popen | None = None
    state: str = "pending"
    restarts: int = 0
    failures: int = 0  # deaths without STABLE_S of uptime in between
    started_at: float | None = None
    ready_at: float | None = None
    restart_at: float | None = None
    exit_code: int | None = None

    def start(self) -> None:
        self.proc = spawn(self.launch.cmd, self.launch.full_env(), self.launch.log)
        self.state, self.started_at, self.restart_at, self.ready_at = "starting", time.time(), None, None

    def mark_ready(self) -> None:
        self.state, self.ready_at = "ready", time.time()

    def failure_message(self, what: str) -> str:
        lines = "\n".join(f"    {line}" for line in tail(self.launch.log, 20))
        return f"{self.launch.name} {what}; last lines of {self.launch.log}:\n{lines}"

    def to_json(self) -> dict[str, Any]:
        la = self.launch
        return {"model": la.model, "replica": la.replica, "served_names": la.served_names,
                "pid": self.proc.pid if self.proc and self.state not in ("stopped", "failed") else None,
                "port": la.port, "url": la.url, "state": self.state, "restarts": self.restarts,
                "started_at": self.started_at, "exit_code": self.exit_code,
                "device": "cuda" if la.gpus else "cpu", "gpus": la.gpus, "memory_mib": la.memory_mib,
                "cores": la.cores, "policy": la.policy, "log": str(la.log), "command": la.cmd}


def _mps_info(daemon: Any) -> dict[str, Any]:
    return {k: str(v) for k, v in vars(daemon).items() if not k.startswith("_") and not callable(v)}


class Supervisor:
    def __init__(self, run_dir: Path, stack_file: str, replicas: list[Launch], router: Launch | None,
                 startup_timeout: float, restart_limit: int, warnings: list[str], mps: list[Any] | None = None,
                 gpus: list[dict[str, Any]] | None = None):
        self.run_dir = run_dir
        self.stack_file = stack_file
        self.replicas = [Managed(r) for r in replicas]
        self.router = Managed(router) if router else None
        self.startup_timeout = startup_timeout
        self.restart_limit = restart_limit
        self.warnings = warnings
        self.mps = mps or []
        self.gpus = gpus or []  # the machine's GPUs (uuid, index, type, memory_mib), for ps and the dashboard
        self.phase = "starting"
        self.error: str | None = None
        self.stopping = False
        self.started_at = time.time()
        self.broker: Any = None  # the memory broker (stack/broker_server.py) when slicelm.elastic is on
        self._broker_seen: dict[str, Any] | None = None
        self._broker_checked = 0.0

    def kill_replica(self, name: str) -> None:
        """A borrower that did not give memory back in time (called from the broker's thread): SIGKILL its
        process group; supervision restarts it and the broker forgets what it held."""
        m = next((m for m in self.replicas if m.launch.name == name), None)
        if m is not None and m.proc is not None and m.proc.poll() is None:
            logger.error("%s did not give borrowed GPU memory back in time: restarting it", name)
            signal_group(m.proc.pid, signal.SIGKILL)

    # ------------------------------------------------------------------------------------ state file
    def all(self) -> list[Managed]:
        return [*self.replicas, *([self.router] if self.router else [])]

    def snapshot(self) -> dict[str, Any]:
        running = self.phase not in ("stopped", "failed")
        return {"stack": self.stack_file, "supervisor_pid": os.getpid() if running else None,
                "started_at": self.started_at, "phase": self.phase, "error": self.error,
                "router": ({"url": self.router.launch.url, "pid": self.router.proc.pid if self.router.proc else None,
                            "state": self.router.state, "log": str(self.router.launch.log)}
                           if self.router else None),
                "replicas": [m.to_json() for m in self.replicas],
                "gpus": self.gpus, "mps": [_mps_info(d) for d in self.mps],
                "broker": self.broker.status() if self.broker is not None else None,
                "warnings": self.warnings}

    def save(self) -> None:
        write_state(self.run_dir, self.snapshot())

    # ------------------------------------------------------------------------------------- signals
    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            self.stopping = True

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, stop)

    # ------------------------------------------------------------------------------------ lifecycle
    def start_all(self, group: list[Managed]) -> None:
        for m in group:
            m.start()
        self.save()

    def wait_healthy(self, group: list[Managed], on_change: Any = None) -> None:
        """Until each process of ``group`` answers /health; raises StartupError naming one that died."""
        while not self.stopping:
            changed = False
            for m in group:
                if m.state != "starting":
                    continue
                if m.proc.poll() is not None:
                    m.state, m.exit_code = "failed", m.proc.returncode
                    raise StartupError(m.failure_message(f"exited with code {m.proc.returncode} while starting"))
                if time.time() - m.started_at > self.startup_timeout:
                    m.state = "failed"
                    raise StartupError(m.failure_message(f"was not healthy after {self.startup_timeout:.0f} s"))
                if healthy(m.launch.url, timeout=0.5):
                    m.mark_ready()
                    changed = True
            if changed:
                self.save()
            if on_change:
                on_change(self)
            if all(m.state == "ready" for m in group):
                return
            time.sleep(POLL_S)

    def step(self) -> None:
        """One round of supervision: notice deaths, schedule restarts with backoff, mark recoveries."""
        now, changed = time.time(), False
        for m in self.all():
            if m.state in ("ready", "starting") and m.proc.poll() is not None:
                if self.broker is not None:
                    self.broker.forget(m.launch.name)
                stable = m.ready_at is not None and now - m.ready_at >= STABLE_S
                m.exit_code, m.failures = m.proc.returncode, 1 if stable else m.failures + 1
                if m.failures > self.restart_limit:
                    m.state = "failed"
                    logger.error(m.failure_message(f"died {m.failures} times in a row; giving up"))
                else:
                    delay = min(MAX_BACKOFF_S, 2.0 ** (m.failures - 1))
                    m.state, m.restart_at = "restarting", now + delay
                    logger.warning("%s exited with code %s; restarting in %.0f s", m.launch.name, m.exit_code, delay)
                changed = True
            elif m.state == "restarting" and now >= m.restart_at:
                m.restarts += 1
                m.start()
                changed = True
            elif m.state == "starting" and healthy(m.launch.url, timeout=0.5):
                m.mark_ready()
                changed = True
                logger.info("%s is ready again", m.launch.name)
        if changed or self._broker_changed(now):
            self.save()

    def _broker_changed(self, now: float) -> bool:
        """The broker's books changed since state.json was last written (checked once a second)."""
        if self.broker is None or now - self._broker_checked < 1.0:
            return False
        self._broker_checked = now
        seen = self.broker.status()
        changed, self._broker_seen = seen != self._broker_seen, seen
        return changed

    def run(self, on_change: Any = None) -> None:
        while not self.stopping:
            self.step()
            if on_change:
                on_change(self)
            time.sleep(POLL_S)

    def shutdown(self) -> None:
        """Router first (no new requests), then every replica: SIGTERM, grace period, SIGKILL; then MPS."""
        self.phase = "stopping"
        with contextlib.suppress(OSError):
            self.save()
        if self.router and self.router.proc:
            stop_group(self.router.proc, DRAIN_GRACE_S)
            self.router.state = "stopped"
        live = [m for m in self.replicas if m.proc is not None]
        for m in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(m.proc.pid, signal.SIGTERM)
        deadline = time.time() + DRAIN_GRACE_S
        for m in live:
            stop_group(m.proc, max(0.1, deadline - time.time()))
            m.state = "stopped" if m.state != "failed" else m.state
        for daemon in self.mps:
            with contextlib.suppress(Exception):
                daemon.stop()
        if self.broker is not None:
            self.broker.stop()
        self.phase = "stopped" if self.error is None else "failed"
        with contextlib.suppress(OSError):
            self.save()
