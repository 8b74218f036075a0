"""The FastAPI app, and running it under uvicorn with a draining SIGTERM.

``build_app(state)`` wires the routers (chat, completions, info, and the ``router`` of ``pooling.py``,
``score.py``, ``invocations.py`` when they exist), the gateway middleware (auth, body limit, draining) and
the error handlers.
``run_server(args)`` starts the engine core in its own process (``--no-engine-process``: a thread of this
one) and serves until SIGTERM: new requests get 503, in-flight ones get ``--shutdown-timeout`` seconds to
finish, the rest are aborted, and the process exits 0. If the engine core dies, in-flight requests end
with an error, ``/health`` answers 503, and the server exits 1 so that a supervisor restarts it.
``slicelm serve`` enters through ``api_servers.serve``: ``--api-server-count N > 1`` runs N such servers
over one core, 1 is ``run_server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from slicelm.engine.async_llm import AsyncLLM
from slicelm.engine.gc_tuning import tune_gc
from slicelm.engine.protocol import EngineClient
from slicelm.entrypoints.server import chat, chat_batch, completions, info, request_tracking
from slicelm.entrypoints.server.errors import install_error_handlers
from slicelm.entrypoints.server.gateway import GatewayMiddleware
from slicelm.entrypoints.server.options import ApiOptions, add_api_args, check_api_args
from slicelm.entrypoints.server.request_tracking import RequestTrackingMiddleware, ServerLoad
from slicelm.entrypoints.server.state import ServerState
from slicelm.entrypoints.server.warmup import warm_up_server

logger = logging.getLogger("slicelm.server")
DEFAULT_MAX_BODY_BYTES = 32 << 20


def build_app(state: ServerState, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              shutdown_engine: bool = True, warm_up: bool = False) -> FastAPI:
    """``warm_up``: at start-up (before uvicorn listens, so before ``/health`` answers) the app serves its own
    warm-up requests (``server/warmup.py``)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if warm_up:
            await warm_up_server(app, state)
        yield
        if shutdown_engine:
            await asyncio.to_thread(state.engine.shutdown)

    app = FastAPI(title="slicelm OpenAI-compatible server", lifespan=lifespan, docs_url="/docs",
                  openapi_url="/openapi.json")
    app.state.server = state
    for module in (chat, chat_batch, completions, info, request_tracking):
        app.include_router(module.router)
    for name in ("pooling", "score", "invocations", "cohere_embed", "sleep"):
        with contextlib.suppress(ModuleNotFoundError):
            app.include_router(importlib.import_module(f"slicelm.entrypoints.server.{name}").router)
    install_error_handlers(app)
    app.add_middleware(GatewayMiddleware, api_keys=state.api_keys, max_body_bytes=max_body_bytes,
                       is_draining=lambda: state.draining)
    app.state.server_load = ServerLoad(enabled=state.options.enable_server_load_tracking)
    app.add_middleware(RequestTrackingMiddleware, request_id_headers=state.options.enable_request_id_headers,
                       load=app.state.server_load)  # outermost: 401s and 413s get the header too
    if os.environ.get("SLICELM_DEBUG_PID_HEADER"):
        app.add_middleware(PidHeaderMiddleware)
    return app


class PidHeaderMiddleware:
    """Debugging / tests (env ``SLICELM_DEBUG_PID_HEADER=1``): every response names the API server process
    that answered it (``x-slicelm-pid``), to see how ``--api-server-count`` spreads connections."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.header = (b"x-slicelm-pid", str(os.getpid()).encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_pid(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_pid)


ENGINE_DEAD_EXIT_DELAY = 1.0  # seconds the server keeps answering (errors, /health 503) after the core died


class DrainingServer(uvicorn.Server):
    """uvicorn server whose first SIGTERM drains (503 for new requests, grace period, abort, exit 0), and
    that exits with ``exit_code`` 1 soon after the engine core died (or once ``parent_pid``, its supervisor
    under ``--api-server-count``, is gone)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, parent_pid: int | None = None) -> None:
        super().__init__(config)
        self.state = state
        self.parent_pid = parent_pid
        self.exit_code = 0
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None
        self._dead_since: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._drain_requested and not self.should_exit:
            self._drain_requested = True
            self.state.draining = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.parent_pid is not None and os.getppid() != self.parent_pid and not self.should_exit:
            logger.error("the supervising process %d is gone: exiting with status 1", self.parent_pid)
            self.exit_code = 1
            self.should_exit = True
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())
        if self.state.engine.errored and not self.state.draining:
            now = asyncio.get_running_loop().time()
            if self._dead_since is None:
                self._dead_since = now
                logger.error("the engine core died (%s): exiting with status 1", self.state.engine.dead_error)
            if now - self._dead_since >= ENGINE_DEAD_EXIT_DELAY:
                self.exit_code = 1
                self.should_exit = True
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        engine = self.state.engine
        logger.info("SIGTERM: draining %d in-flight request(s) for up to %.0f s", engine.num_active_requests,
                    self.state.shutdown_timeout)
        if not await engine.wait_idle(self.state.shutdown_timeout):
            logger.warning("grace period over: aborting %d request(s)", engine.num_active_requests)
            engine.abort_all()
            await engine.wait_idle(5.0)
        await asyncio.sleep(0.05)  # let the last stream chunks go out
        self.should_exit = True


def _read_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if len(value) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


def run_server(args: argparse.Namespace) -> int:
    """Loads the engine named by ``args`` (``EngineArgs`` flags + server flags) and serves it."""
    from slicelm.config import EngineArgs

    check_api_args(args)
    assert args.api_server_count == 1, "api_servers.serve runs several API servers"
    engine_args = EngineArgs.from_cli_args(args)
    engine: EngineClient = AsyncLLM.from_engine_args(engine_args, max_waiting_requests=args.max_waiting_requests,
                                                     multiprocess=args.engine_process)
    state = make_state(engine, args)
    app = build_app(state, max_body_bytes=args.max_request_body_bytes, warm_up=True)
    server = DrainingServer(make_uvicorn_config(app, args), state)
    print_banner(state, args)
    tune_gc()
    try:
        server.run()
    finally:
        engine.shutdown()
    return server.exit_code


def make_state(engine: EngineClient, args: argparse.Namespace, primary: bool = True) -> ServerState:
    """The endpoints' state; only the ``primary`` API server records engine-side metrics and logs stats."""
    state = ServerState.from_engine(engine, served_model_names=args.served_model_name,
                                    chat_template=_read_chat_template(args.chat_template),
                                    api_keys=[args.api_key] if args.api_key else [],
                                    shutdown_timeout=args.shutdown_timeout,
                                    log_stats=primary and not args.disable_log_stats,
                                    record_engine_metrics=primary)
    state.options = ApiOptions.from_args(args)
    return state


def make_uvicorn_config(app: Any, args: argparse.Namespace) -> uvicorn.Config:
    # --root-path as vLLM sets it, on the FastAPI app (not uvicorn's): a request reaches a route with or without
    # the prefix (/v1/... and {root}/v1/...). timeout_graceful_shutdown: a client holding a half-sent body cannot
    # keep the process alive after SIGTERM
    app.root_path = args.root_path or ""
    return uvicorn.Config(app, host=args.host, port=args.port, uds=args.uds,
                          log_level=args.uvicorn_log_level, timeout_keep_alive=args.timeout_keep_alive,
                          access_log=not args.disable_access_log, loop="auto", http="auto",
                          ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                          timeout_graceful_shutdown=max(1, int(args.shutdown_timeout)))


def print_banner(state: ServerState, args: argparse.Namespace) -> None:
    host = "localhost" if args.host in ("0.0.0.0", "::", "") else args.host
    print(f"slicelm: serving {state.served_model_names[0]!r} on http://{host}:{args.port}\n"
          f"  curl http://{host}:{args.port}/v1/chat/completions -H 'Content-Type: application/json'"
          + (" -H 'Authorization: Bearer $VLLM_API_KEY'" if args.api_key else "")
          + f" -d '{{\"model\": \"{state.served_model_names[0]}\", "
          "\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 32}'", flush=True)


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY") or os.environ.get("SLICELM_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on every route but /health, /ping, /metrics, /version "
                        "(default: env VLLM_API_KEY)")
    g.add_argument("--max-waiting-requests", type=int, default=None,
                   help="requests allowed to wait for a batch slot before new ones get 503 "
                        "(default: 4 x --max-num-seqs)")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests before aborting them")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--disable-access-log", "--disable-uvicorn-access-log", action="store_true")
    g.add_argument("--timeout-keep-alive", type=int, default=5)
    g.add_argument("--ssl-keyfile", default=None)
    g.add_argument("--ssl-certfile", default=None)
    add_api_args(g)
    g.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine core (scheduler, KV cache, model) in its own process; "
                        "--no-engine-process runs it in a thread of the server process (debugging)")
    return parser
