"""``--api-server-count N > 1``: N API server processes in front of one engine-core process (as vLLM v1).

The parent binds the listening socket once (uvicorn's ``Config.bind_socket``: host:port or ``--uds``),
starts the engine core (``CoreProcess`` with one client per API server), then spawns N API servers that each
serve on that same socket (the kernel spreads the connections between them). Each one is a full server — tokenizer, chat
templates, output processing, admission control — and talks to the core as client ``i``
(``SharedCoreClient``). The parent only supervises:

- SIGTERM / SIGINT: every API server gets SIGTERM (each drains its in-flight requests), then the core is
  stopped; exit 0.
- an API server dies: the others are stopped the same way, then the core; exit 1.
- the core dies: every API server notices (pidfd), fails its streams and exits 1 by itself; the parent
  waits for them (kills the stragglers) and exits 1.
API servers exit when the parent disappears; the core does too. Metrics: see ``metrics.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait as wait_connections
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from slicelm.engine.core_launcher import CoreProcess
    from slicelm.engine.core_messages import EngineCoreInfo

logger = logging.getLogger("slicelm.server")
CORE_DEAD_GRACE = 10.0  # seconds API servers get to exit on their own after the core died
POLL_S = 0.5


def serve(args: argparse.Namespace) -> int:
    """``slicelm serve``: one API server (``app.run_server``), or ``--api-server-count`` of them over one core."""
    from slicelm.entrypoints.server.app import run_server
    from slicelm.entrypoints.server.options import check_api_args

    check_api_args(args)
    return run_api_servers(args) if args.api_server_count > 1 else run_server(args)


def run_api_servers(args: argparse.Namespace) -> int:
    from slicelm.config import EngineArgs
    from slicelm.engine.core_launcher import CoreProcess
    from slicelm.loader.model_files import pin_hub_snapshots

    count = int(args.api_server_count)
    engine_args = pin_hub_snapshots(EngineArgs.from_cli_args(args))  # Hub ids: fetched once, before any process
    args.revision, args.tokenizer_revision = engine_args.revision, engine_args.tokenizer_revision
    prom_dir = _multiproc_dir()
    sock = _bind(args)
    core = CoreProcess(engine_args, client_count=count)
    servers: list[BaseProcess] = []
    try:
        info = core.wait_ready()
        mp = multiprocessing.get_context("spawn")
        for i, (in_addr, out_addr) in enumerate(core.client_addrs):
            p = mp.Process(target=api_server_main, name=f"slicelm-api-server-{i}", daemon=True,
                           args=(args, i, sock, in_addr, out_addr, core.pid, info, os.getpid()))
            p.start()
            logger.info("API server %d started (pid %d)", i, p.pid)
            servers.append(p)
        sock.close()  # the API servers hold it now
        where = f"unix:{args.uds}" if args.uds else f"http://{args.host}:{args.port}"
        name = (args.served_model_name or [args.model])[0]
        return Supervisor(core, servers, float(args.shutdown_timeout), f"serving {name!r} on {where}").run()
    finally:
        for p in servers:
            if p.is_alive():
                p.kill()
                p.join(5)
        core.shutdown()
        with contextlib.suppress(OSError):
            sock.close()
        if prom_dir is not None:
            shutil.rmtree(prom_dir, ignore_errors=True)


def _multiproc_dir() -> str | None:
    """prometheus_client's multiprocess directory for the API servers (a fresh one unless the user set
    ``PROMETHEUS_MULTIPROC_DIR``); returns the directory to remove at exit."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    path = tempfile.mkdtemp(prefix="slicelm-prometheus-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _bind(args: argparse.Namespace) -> socket.socket:
    config = uvicorn.Config("slicelm:unused", host=args.host, port=args.port, uds=args.uds)
    return config.bind_socket()


class Supervisor:
    """Waits on the core and the API servers and takes everything down together (module docstring)."""

    def __init__(self, core: CoreProcess, servers: list[BaseProcess], shutdown_timeout: float,
                 banner: str = "") -> None:
        self.banner = banner
        self.core = core
        self.servers = servers
        self.shutdown_timeout = shutdown_timeout
        self.stop_signal: int | None = None

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.stop_signal is not None:  # a second signal: no more grace
            for p in self.servers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        self.stop_signal = sig

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        print(f"slicelm: {self.banner}: {len(self.servers)} API servers (pids "
              f"{', '.join(str(p.pid) for p in self.servers)}) share one engine core (pid {self.core.pid})",
              flush=True)
        while True:
            wait_connections([self.core.proc.sentinel, *(p.sentinel for p in self.servers)], POLL_S)
            if self.stop_signal is not None:
                logger.info("signal %d: stopping %d API servers", self.stop_signal, len(self.servers))
                return self._stop_servers(self.shutdown_timeout + 10)
            if not self.core.proc.is_alive():
                logger.error("the engine core died (exit code %s): API servers exit", self.core.proc.exitcode)
                self._wait_servers(CORE_DEAD_GRACE)
                return 1
            dead = [(i, p) for i, p in enumerate(self.servers) if not p.is_alive()]
            if dead:
                i, p = dead[0]
                logger.error("API server %d (pid %d) exited with code %s: stopping the others", i, p.pid,
                             p.exitcode)
                self._stop_servers(self.shutdown_timeout + 10)
                return 1

    def _stop_servers(self, timeout: float) -> int:
        for p in self.servers:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        self._wait_servers(timeout)
        return 0 if all(p.exitcode == 0 for p in self.servers) else 1

    def _wait_servers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self.servers:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                logger.warning("API server pid %d did not stop: killing it", p.pid)
                p.kill()
                p.join(5)


def api_server_main(args: argparse.Namespace, index: int, sock: socket.socket, in_addr: str, out_addr: str,
                    core_pid: int, info: EngineCoreInfo, parent_pid: int) -> None:
    """Entry point of API server ``index`` (a ``spawn``ed process)."""
    from slicelm.config import EngineArgs
    from slicelm.engine.async_llm import AsyncLLM
    from slicelm.engine.core_shared import SharedCoreClient
    from slicelm.engine.engine import load_api_tokenizer
    from slicelm.engine.gc_tuning import tune_gc
    from slicelm.entrypoints.server.app import DrainingServer, build_app, make_state, make_uvicorn_config

    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s %(asctime)s api-server-{index}: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    client = SharedCoreClient(index, in_addr, out_addr, core_pid, info)
    try:
        tokenizer = load_api_tokenizer(EngineArgs.from_cli_args(args))
    except BaseException:
        client.shutdown()
        raise
    engine = AsyncLLM(client, client.wait_ready(), tokenizer, max_waiting_requests=args.max_waiting_requests)
    state = make_state(engine, args, primary=index == 0)
    app = build_app(state, max_body_bytes=args.max_request_body_bytes, warm_up=True)
    server = DrainingServer(make_uvicorn_config(app, args), state, parent_pid=parent_pid)
    tune_gc()
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
    sys.exit(server.exit_code)
