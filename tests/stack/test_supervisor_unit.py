"""The supervisor's state machine on tiny real processes (a stdlib HTTP server answering /health)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from slicelm.stack.launch import Launch
from slicelm.stack.procs import free_port
from slicelm.stack.state import pid_alive, read_state
from slicelm.stack.status import status
from slicelm.stack.supervisor import StartupError, Supervisor

pytestmark = pytest.mark.slow

SERVER = """
import http.server, sys, threading, os, time
port, die_after, start_delay = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
print("fake replica starting", flush=True)
time.sleep(start_delay)  # loading: nothing listens yet
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", port), H)
if die_after >= 0:
    threading.Timer(die_after, lambda: os._exit(3)).start()
srv.serve_forever()
"""


def launch(tmp: Path, name: str, die_after: float = -1, crash: bool = False, start_delay: float = 0.0) -> Launch:
    port = free_port("127.0.0.1")
    script = tmp / "fake.py"
    script.write_text(SERVER)
    cmd = [sys.executable, "-c", "import sys; print('boom: no such model'); sys.exit(7)"] if crash else \
        [sys.executable, str(script), str(port), str(die_after), str(start_delay)]
    return Launch(name=f"{name}/0", cmd=cmd, env={}, log=tmp / f"{name}.log", url=f"http://127.0.0.1:{port}",
                  model=name, replica=0)


def supervisor(tmp: Path, launches: list[Launch], restart_limit: int = 3) -> Supervisor:
    return Supervisor(tmp, "stack.yaml", launches, None, startup_timeout=20, restart_limit=restart_limit,
                      warnings=[])


def run_until(sup: Supervisor, cond, timeout: float) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, [m.to_json() for m in sup.replicas]
        sup.step()
        time.sleep(0.05)


def test_restart_after_kill_and_state_file(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, [launch(tmp_path, "a"), launch(tmp_path, "b")])
    try:
        sup.start_all(sup.replicas)
        sup.wait_healthy(sup.replicas)
        a, b = sup.replicas
        old = a.proc.pid
        os.kill(old, signal.SIGKILL)
        run_until(sup, lambda: a.state == "ready" and a.proc.pid != old, 10)
        assert (a.restarts, b.restarts, b.state) == (1, 0, "ready")
        state = read_state(tmp_path)
        assert state["supervisor_pid"] == os.getpid()
        assert [(r["model"], r["state"], r["restarts"]) for r in state["replicas"]] == [("a", "ready", 1),
                                                                                       ("b", "ready", 0)]
    finally:
        sup.shutdown()
    assert not pid_alive(a.proc.pid) and not pid_alive(b.proc.pid)
    assert read_state(tmp_path)["phase"] == "stopped"


def test_backoff_grows_then_gives_up(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, [launch(tmp_path, "flaky", die_after=0.3)], restart_limit=2)
    m = sup.replicas[0]
    try:
        sup.start_all(sup.replicas)
        sup.wait_healthy(sup.replicas)
        delays = []
        deadline = time.time() + 20
        while m.state != "failed":
            assert time.time() < deadline
            before = m.state
            sup.step()
            if before != "restarting" and m.state == "restarting":
                delays.append(round(m.restart_at - time.time()))
            time.sleep(0.05)
        assert delays == [1, 2]  # 2^(n-1) seconds, then the limit (2 restarts) is reached
        assert m.restarts == 2 and m.exit_code == 3
    finally:
        sup.shutdown()


def test_crash_while_starting_names_the_replica_and_quotes_its_log(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, [launch(tmp_path, "ok"), launch(tmp_path, "broken", crash=True)])
    try:
        sup.start_all(sup.replicas)
        with pytest.raises(StartupError) as e:
            sup.wait_healthy(sup.replicas)
    finally:
        sup.shutdown()
    msg = str(e.value)
    assert msg.startswith("broken/0 exited with code 7 while starting; last lines of")
    assert "boom: no such model" in msg
    assert not pid_alive(sup.replicas[0].proc.pid)


def test_ps_shows_the_router_only_once_it_accepts_connections(tmp_path: Path) -> None:
    replica = launch(tmp_path, "a", start_delay=1.0)
    router = launch(tmp_path, "router", start_delay=1.0)
    sup = Supervisor(tmp_path, "stack.yaml", [replica], router, startup_timeout=20, restart_limit=3, warnings=[])
    seen: list[tuple[str | None, bool]] = []

    def check(_: Supervisor) -> None:  # what `slicelm ps` says at each supervision round, and whether it is true
        st = status(tmp_path)
        url = st["router"]["url"] if st["router"] else None
        seen.append((st["router_state"], url is not None and accepts_connections(url)))
        assert url is None or seen[-1][1], f"ps shows {url} (router {st['router_state']}) but it refuses connections"

    try:
        sup.start_all(sup.replicas)
        sup.wait_healthy(sup.replicas, on_change=check)
        sup.start_all([sup.router])
        sup.wait_healthy([sup.router], on_change=check)
        check(sup)
        os.kill(sup.router.proc.pid, signal.SIGKILL)  # a restarting router is hidden again
        run_until(sup, lambda: sup.router.state == "restarting", 10)
        check(sup)
        run_until(sup, lambda: sup.router.state == "ready", 20)
        check(sup)
    finally:
        sup.shutdown()
    states = [s for s, _ in seen]
    assert {"pending", "starting", "ready", "restarting"} <= set(states), states
    assert [shown for s, shown in seen if s != "ready"] == [False] * (len(seen) - states.count("ready"))
    assert all(shown for s, shown in seen if s == "ready")


def accepts_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False
