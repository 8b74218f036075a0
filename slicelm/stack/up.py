"""``slicelm up``: load and plan the stack, then supervise it in the foreground, or detached (``--detach``),
or only print what it would run (``--dry-run``)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from slicelm.stack.launch import Launch, replica_launches, router_available, router_launch
from slicelm.stack.planning import StackPlan
from slicelm.stack.prefetch import prefetch
from slicelm.stack.procs import port_free, tail
from slicelm.stack.sharing import start_broker
from slicelm.stack.spec import StackSpec
from slicelm.stack.state import live_supervisor, read_state
from slicelm.stack.status import status, table
from slicelm.stack.supervisor import StartupError, Supervisor

logger = logging.getLogger("slicelm.stack")


class UpError(RuntimeError):
    """The stack cannot start; nothing was started."""


def preflight(spec: StackSpec, plan: StackPlan, run_dir: Path) -> None:
    pid = live_supervisor(run_dir)
    if pid:
        raise UpError(f"a stack is already running in {run_dir} (supervisor pid {pid}); "
                      f"stop it with: slicelm down --run-dir {run_dir}")
    rs = spec.routerSpec
    if rs.enableRouter and router_available() and not port_free(spec.slicelm.host, rs.containerPort):
        raise UpError(f"routerSpec.containerPort: port {rs.containerPort} on {spec.slicelm.host} is in use")


# ---------------------------------------------------------------------------------------------- MPS
def start_mps(spec: StackSpec, plan: StackPlan, run_dir: Path, dry_run: bool) -> tuple[list[Any], Any]:
    """slicelm's own MPS control daemon per GPU that replicas share; time slicing (with a warning) where
    MPS cannot run. Returns the daemons and the client-env function for a replica's slice."""
    uuids = sorted({g.uuid for p in plan.placements for g in p.gpus})
    if not uuids or not spec.slicelm.mps:
        return [], None
    from slicelm.slicing import mps

    if not mps.mps_available():
        logger.warning("MPS is not available on this machine: replicas share their GPUs by time slicing "
                       "(no compute isolation; memory budgets still hold)")
        return [], None
    daemons = {u: mps.MPSDaemon(u, run_dir) for u in uuids}
    if not dry_run:
        for u, d in list(daemons.items()):
            if not d.start().ok:  # start() logged why (another MPS server owns the GPU, no permission...)
                del daemons[u]

    def client_env(sl: Any) -> dict[str, str]:
        d = daemons.get(sl.device_uuid)
        return d.client_env(sl) if d else {}

    return list(daemons.values()), client_env


# ------------------------------------------------------------------------------------------ dry run
def print_dry_run(launches: list[Launch], console: Console) -> None:
    for la in launches:
        console.print(f"[bold]{la.name}[/] -> {la.url}  (log {la.log})", highlight=False)
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(la.env.items()))
        console.print(f"  {env + ' ' if env else ''}{shlex.join(la.cmd)}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------- live status
class StatusView:
    """A live table while processes load (a terminal), or one line per state change (a log or a pipe)."""

    def __init__(self, run_dir: Path, console: Console) -> None:
        self.run_dir, self.console = run_dir, console
        self.live = None
        self.seen: dict[str, str] = {}
        if console.is_terminal:
            from rich.live import Live

            self.live = Live(console=console, refresh_per_second=4, transient=True)
            self.live.start()

    def __call__(self, _sup: Any = None) -> None:
        st = status(self.run_dir)
        if st is None:
            return
        if self.live is not None:
            self.live.update(table(st, title="slicelm up: loading models"))
            return
        for r in st["replicas"]:
            key = f"{r['model']}/{r['replica']}"
            if self.seen.get(key) != r["state"]:
                self.seen[key] = r["state"]
                print(f"slicelm up: {key} {r['state']} ({r['url']})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def print_ready(run_dir: Path, console: Console) -> None:
    st = status(run_dir)
    console.print(table(st, title="slicelm stack"))
    router = st.get("router")
    if router:
        console.print(f"router: {router['url']}/v1  (all models)", highlight=False)
        console.print(f"dashboard: {router['url']}/dashboard  (in a terminal: slicelm top)", highlight=False)
    for r in st["replicas"]:
        console.print(f"{r['model']}/{r['replica']}: {r['url']}/v1", highlight=False)
    console.print(f"run dir: {run_dir}   (slicelm ps / slicelm down --run-dir {run_dir})", highlight=False)


# ------------------------------------------------------------------------------------ supervising
def supervise(spec: StackSpec, plan: StackPlan, run_dir: Path, console: Console, quiet: bool = False) -> int:
    """Runs the stack in this process until SIGTERM / Ctrl-C. 0 after a clean drain, 1 if a process
    failed to start (named, with the end of its log)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    pins = prefetch(spec)  # Hub ids: fetched once, here; replicas pinned to those commits
    daemons, mps_env = start_mps(spec, plan, run_dir, dry_run=False)
    replicas = replica_launches(spec, plan, run_dir, mps_env)
    for la in replicas:
        la.cmd += pins.get(la.model or "", [])
    sup = Supervisor(run_dir, spec.source or "", replicas, router_launch(spec, run_dir),
                     spec.slicelm.startupTimeout, spec.slicelm.restartLimit, spec.warnings, daemons, plan.devices)
    sup.broker = start_broker(spec, plan, run_dir, on_overdue=sup.kill_replica)
    sup.install_signal_handlers()
    view = None if quiet else StatusView(run_dir, console)
    rc = 0
    try:
        sup.start_all(sup.replicas)
        sup.wait_healthy(sup.replicas, on_change=view)
        if sup.router and not sup.stopping:
            sup.start_all([sup.router])
            sup.wait_healthy([sup.router], on_change=view)
        if not sup.stopping:
            sup.phase = "ready"
            sup.save()
            if view:
                view.close()
                print_ready(run_dir, console)
            sup.run()
    except StartupError as e:
        sup.error, rc = str(e), 1
        if view:
            view.close()
        print(f"slicelm up: error: {e}", file=sys.stderr, flush=True)
    finally:
        if view:
            view.close()
        sup.shutdown()
    return rc


def detach(args: argparse.Namespace, run_dir: Path, console: Console) -> int:
    """Starts the supervisor as its own session (it outlives this shell), waits until the stack is ready."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "slicelm.entrypoints.cli", "up", str(args.stack_file), "--run-dir", str(run_dir),
           "--supervisor"]
    if args.inventory:
        cmd += ["--inventory", args.inventory]
    log = run_dir / "supervisor.log"
    before = (read_state(run_dir) or {}).get("started_at")
    with open(log, "ab") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, close_fds=True)
    view = StatusView(run_dir, console)
    try:
        while True:
            st = read_state(run_dir)
            fresh = st is not None and st.get("started_at") != before
            if fresh and st["phase"] == "ready":
                view.close()
                print_ready(run_dir, console)
                return 0
            if (fresh and st["phase"] in ("failed", "stopped")) or child.poll() is not None:
                child.wait()
                view.close()
                err = (st or {}).get("error") if fresh else None
                print(f"slicelm up: error: {err or 'the supervisor exited'}", file=sys.stderr, flush=True)
                if not err:
                    print("\n".join(tail(log, 20)), file=sys.stderr)
                return 1
            if fresh:
                view()
            time.sleep(0.3)
    except KeyboardInterrupt:
        view.close()
        child.terminate()
        child.wait()
        return 130


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2)
