"""The router's HTTP server (aiohttp on uvloop): OpenAI/vLLM routes forwarded to replicas, plus ``/v1/models``,
``/health``, ``/version``, ``/engines``, ``/metrics`` and the ``/dashboard/`` page answered by the router itself."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from importlib import metadata

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from slicelm.router.backends import BackendPool
from slicelm.router.config import RouterConfig
from slicelm.router.dashboard.routes import register_dashboard
from slicelm.router.discovery import ServiceDiscovery
from slicelm.router.errors import error_response
from slicelm.router.limits import raise_open_files_limit
from slicelm.router.logic import RoutingRequest, make_logic
from slicelm.router.metrics import RouterMetrics
from slicelm.router.proxy import Proxy
from slicelm.router.queue import Admission
from slicelm.router.sleep import SleepManager, WakeFailed
from slicelm.router.stats import RequestStatsMonitor

logger = logging.getLogger("slicelm.router")

# every POST route of ``slicelm serve`` (and vLLM's) that names a model in its body
PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/score", "/score", "/v1/rerank",
           "/rerank", "/v2/rerank", "/tokenize", "/detokenize", "/pooling", "/classify")
MODEL_OPTIONAL = frozenset({"/tokenize", "/detokenize"})
MAX_BODY = 256 << 20
LOG_FORMAT = "[%(asctime)s] %(levelname)s: %(message)s (%(filename)s:%(lineno)d:%(name)s)"


def _version() -> str:
    try:
        return metadata.version("slicelm")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class Router:
    """Wires discovery → backend pool → admission queue → routing logic → proxy, and serves them."""

    def __init__(self, cfg: RouterConfig, discovery: ServiceDiscovery | None = None) -> None:
        self.cfg = cfg
        self.stats = RequestStatsMonitor(cfg.request_stats_window)
        self.pool = BackendPool(discovery or cfg.build_discovery(), cfg.pool)
        self.admission = Admission(self.pool, cfg.max_inflight_per_replica, cfg.max_queue_size, cfg.queue_timeout)
        self.logic = make_logic(cfg.routing_logic, self.stats, cfg.session_key, cfg.prefix_min_match_length,
                                cfg.prefix_max_imbalance)
        self.metrics = RouterMetrics()
        self.proxy = Proxy(self.pool, self.logic, self.admission, self.stats, self.metrics, cfg.proxy)
        self.sleep = SleepManager(self.pool, cfg.idle_sleep_after, cfg.idle_sleep_level, cfg.api_key,
                                  cfg.pool.health_check_interval)
        self._api_key = cfg.api_key.encode() if cfg.api_key else None
        self._log_task: asyncio.Task[None] | None = None

    # ---- app ----
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._auth])
        for path in PROXIED:
            app.router.add_post(path, self.handle_proxied)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model_id:.+}", self.retrieve_model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/engines", self.engines)
        app.router.add_get("/metrics", self.prometheus)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        register_dashboard(app, self, _version())
        return app

    async def _start(self, app: web.Application) -> None:
        await self.pool.start()
        await self.sleep.start()
        if self.cfg.log_stats:
            self._log_task = asyncio.create_task(self._log_stats())
        logger.info("Router ready: %d backend(s), %d healthy, routing logic %s", len(self.pool.backends),
                    self.pool.healthy_count(), self.cfg.routing_logic)

    async def _stop(self, app: web.Application) -> None:
        if self._log_task is not None:
            self._log_task.cancel()
        await self.sleep.stop()
        await self.pool.stop()

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.log_stats_interval)
            for b in self.pool.snapshot():
                s = self.stats.get().get(b["url"])
                logger.info("Server %s: healthy=%s in_flight=%d qps=%.2f avg_latency=%.3f", b["url"], b["healthy"],
                            b["in_flight"], s.qps if s else 0.0, s.avg_latency if s else 0.0)

    @web.middleware
    async def _auth(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        if self._api_key is not None and (request.path.startswith(("/v1", "/dashboard/api")) or
                                          request.path in PROXIED):
            auth = request.headers.get("Authorization", "")
            token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, self._api_key):
                return error_response(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    # ---- forwarded routes ----
    async def handle_proxied(self, request: web.Request) -> web.StreamResponse:
        t_in = time.time()
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        rid = {"X-Request-Id": request_id}
        body = await request.read()
        try:
            data = json.loads(body) if body else None
        except (ValueError, RecursionError):
            return error_response(400, "Invalid request: the body must be valid JSON.", headers=rid)
        if not isinstance(data, dict):
            return error_response(400, "Invalid request: the body must be a JSON object.", headers=rid)
        model = data.get("model")
        if model is None and request.path in MODEL_OPTIONAL and len(self.pool.models()) == 1:
            model = next(iter(self.pool.models()))
        if model is None:
            return error_response(400, "Invalid request: missing 'model' in the request body.", param="model",
                                  headers=rid)
        if not isinstance(model, str):
            return error_response(400, "Invalid request: 'model' must be a string.", param="model", headers=rid)
        priority = data.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            return error_response(400, "Invalid request: 'priority' must be an integer.", param="priority",
                                  headers=rid)
        self.metrics.incoming.labels(model=model).inc()
        try:
            await self.sleep.ensure_awake(model)  # a sleeping model's first request wakes a replica and waits
        except WakeFailed as e:
            return error_response(503, str(e), code="wake_failed", headers=rid)
        if not self.pool.candidates(model):
            if model not in self.pool.ever_seen:
                return error_response(404, f"The model '{model}' does not exist. Available models are listed at "
                                      "/v1/models.", code="model_not_found", param="model", headers=rid)
            return error_response(503, f"Model '{model}' has no live replica now; retry later.",
                                  code="no_live_replica", headers=rid)
        rreq = RoutingRequest(model, request.headers, data)
        rreq.session_id = self.logic.extract_session_id(request.headers, data)
        try:
            return await self.proxy.forward(request, request.path_qs, body, rreq, request_id, t_in, priority)
        finally:
            self.sleep.touch(model)

    # ---- the router's own routes ----
    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": list(self.pool.models().values())})

    async def retrieve_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        card = self.pool.models().get(model_id)
        if card is None:
            return error_response(404, f"The model '{model_id}' does not exist.", code="model_not_found")
        return web.json_response(card)

    async def health(self, request: web.Request) -> web.Response:
        if not self.pool.discovery_alive:
            return error_response(503, "service discovery is not working", code="discovery_dead")
        return web.json_response({"status": "healthy"})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": _version()})

    async def engines(self, request: web.Request) -> web.Response:
        return web.json_response(self.pool.snapshot())

    async def prometheus(self, request: web.Request) -> web.Response:
        body = self.metrics.render(self.pool, self.stats, self.admission)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger("slicelm")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def serve(cfg: RouterConfig) -> int:
    """Run the router until SIGINT/SIGTERM. A handler whose client disconnects is cancelled (aiohttp's
    ``handler_cancellation``): a queued request leaves the queue, a forwarded one closes its replica connection, so
    the replica aborts it too."""
    setup_logging(cfg.log_level)
    raise_open_files_limit()  # thousands of streams: a client and a replica socket each
    router = Router(cfg)
    app = router.build_app()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(app, host=cfg.host, port=cfg.port, access_log=None, print=None, backlog=4096,
                shutdown_timeout=5.0, handler_cancellation=True, loop=loop)
    return 0
