"""Forwarding one request: admission, routing, failover before the first byte, streaming pass-through after it.

A request is retried on another replica (``--max-instance-failover-reroute-attempts`` times) while nothing has been
sent to the client: connection refused or reset, no first byte within ``--first-byte-timeout``, or a 502/503/504
answer. SSE bodies are passed through chunk by chunk; if the backend dies or stays silent past
``--stream-idle-timeout`` once streaming has started, the stream ends with an error event and ``[DONE]``.
Other bodies are read whole before answering, so a failure anywhere in them can still be retried.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from slicelm.router.backends import Backend, BackendPool
from slicelm.router.errors import error_response, sse_error_event
from slicelm.router.logic import RoutingLogic, RoutingRequest
from slicelm.router.metrics import RouterMetrics
from slicelm.router.queue import Admission, NoReplica, QueueRejected
from slicelm.router.stats import RequestStatsMonitor

logger = logging.getLogger("slicelm.router")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "x-request-id"}
RESPONSE_DROP = HOP_BY_HOP | {"content-length", "server", "date", "x-request-id"}
RETRY_STATUSES = frozenset({502, 503, 504})
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


@dataclass
class ProxyConfig:
    first_byte_timeout: float = 300.0
    stream_idle_timeout: float = 300.0
    max_failover: int = 2


class _Retry(Exception):
    def __init__(self, kind: str, message: str, response: web.Response | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.response = response


def backend_headers(request: web.Request, request_id: str) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in REQUEST_DROP}
    headers["X-Request-Id"] = request_id
    return headers


def client_headers(resp: aiohttp.ClientResponse, request_id: str) -> dict[str, str]:
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in RESPONSE_DROP}
    headers["X-Request-Id"] = request_id
    return headers


class Proxy:
    def __init__(self, pool: BackendPool, logic: RoutingLogic, admission: Admission, stats: RequestStatsMonitor,
                 metrics: RouterMetrics, config: ProxyConfig) -> None:
        self.pool = pool
        self.logic = logic
        self.admission = admission
        self.stats = stats
        self.metrics = metrics
        self.config = config

    def _avg_latency(self, model: str) -> float:
        """Mean latency of the model's replicas in the stats window (for Retry-After; only on refusals)."""
        stats = self.stats.get()
        lat = [stats.get(b.url) for b in self.pool.candidates(model)]
        vals = [s.avg_latency for s in lat if s and s.avg_latency]
        return sum(vals) / len(vals) if vals else 1.0

    async def forward(self, request: web.Request, path: str, body: bytes, rreq: RoutingRequest, request_id: str,
                      t_in: float, priority: int) -> web.StreamResponse:
        model = rreq.model
        try:
            await self.admission.acquire(model, priority, lambda: self._avg_latency(model))
        except QueueRejected as e:
            return error_response(429, str(e), code=e.code,
                                  headers={"Retry-After": str(e.retry_after), "X-Request-Id": request_id})
        except NoReplica:
            return error_response(503, f"Model '{model}' has no live replica now; retry later.",
                                  code="no_live_replica", headers={"X-Request-Id": request_id})
        headers = backend_headers(request, request_id)
        tried: set[str] = set()
        last: _Retry | None = None
        for attempt in range(1 + self.config.max_failover):
            cands = [b for b in self.pool.candidates(model) if b.url not in tried]
            if not cands:
                break
            b = self.logic.route(self.admission.free(cands) or cands, rreq)
            tried.add(b.url)
            now = time.time()
            if attempt == 0:
                logger.info(f"Routing request {request_id} with session id {rreq.session_id} to {b.url} "
                            f"at {now}, process time = {now - t_in:.4f}")
            else:
                self.metrics.failovers.labels(server=b.url, model=model).inc()
                logger.warning(f"Failover of request {request_id} to {b.url} (attempt {attempt + 1}) after "
                               f"{last.kind if last else '?'}: {last}")
            try:
                return await self._attempt(b, request, path, body, headers, model, request_id,
                                           retry_left=attempt < self.config.max_failover)
            except _Retry as r:
                last = r
        if last is not None and last.response is not None:
            return last.response
        if last is None:
            return error_response(503, f"Model '{model}' has no live replica now; retry later.",
                                  code="no_live_replica", headers={"X-Request-Id": request_id})
        status = 504 if last.kind == "first_byte_timeout" else 502
        return error_response(status, f"no replica of '{model}' answered ({len(tried)} tried; last: {last})",
                              code=last.kind, headers={"X-Request-Id": request_id})

    async def _attempt(self, b: Backend, request: web.Request, path: str, body: bytes, headers: dict[str, str],
                       model: str, request_id: str, retry_left: bool) -> web.StreamResponse:
        start = time.time()
        session = b.acquire()
        self.stats.on_new_request(b.url, start)
        first: float | None = None
        chunks = 0
        status = "error"
        resp: aiohttp.ClientResponse | None = None
        try:
            try:
                async with asyncio.timeout(self.config.first_byte_timeout):
                    resp = await session.request(request.method, b.url + path, data=body, headers=headers)
                    if resp.status in RETRY_STATUSES and retry_left:
                        kept = web.Response(status=resp.status, body=await resp.read(),
                                            headers=client_headers(resp, request_id))
                        raise _Retry("backend_status", f"{b.url} answered {resp.status}", kept)
                    streaming = resp.headers.get("Content-Type", "").startswith("text/event-stream")
                    data = await (resp.content.readany() if streaming else resp.read())
            except aiohttp.ConnectionTimeoutError:  # a TimeoutError too: caught first
                self.pool.report_timeout(b)
                self._error(b, model, "connect_timeout")
                raise _Retry("connect_timeout", f"{b.url}: no connection in {self.pool.config.connect_timeout:g} s"
                             ) from None
            except TimeoutError:
                self.pool.report_timeout(b)
                self._error(b, model, "first_byte_timeout")
                raise _Retry("first_byte_timeout", f"{b.url} sent nothing in {self.config.first_byte_timeout:g} s"
                             ) from None
            except aiohttp.ClientConnectorError as e:
                self.pool.report_connect_error(b, e)
                self._error(b, model, type(e).__name__)
                raise _Retry("connect_error", f"{b.url}: {e}") from None
            except (aiohttp.ClientError, OSError) as e:
                self.pool.report_timeout(b)  # reset or closed before the first byte: probe it now
                self._error(b, model, type(e).__name__)
                raise _Retry("backend_disconnected", f"{b.url}: {type(e).__name__}: {e}") from None
            first = time.time()
            self.stats.on_first_byte(b.url, start, first)
            if not streaming:
                status = "success" if resp.status < 400 else "error"
                self._count_tokens(b.url, model, data)
                return web.Response(status=resp.status, body=data, headers=client_headers(resp, request_id))
            out = web.StreamResponse(status=resp.status, headers=client_headers(resp, request_id))
            await out.prepare(request)
            await out.write(data)
            chunks, status = await self._pump(b, resp, out, model)
            return out
        finally:
            if resp is not None:
                resp.close()
            b.release(session)
            end = time.time()
            self.stats.on_complete(b.url, start, first, end, chunks)
            self.metrics.latency.labels(server=b.url, model=model, status=status).observe(end - start)
            self.pool.notify()

    async def _pump(self, b: Backend, resp: aiohttp.ClientResponse, out: web.StreamResponse,
                    model: str) -> tuple[int, str]:
        """Copy the rest of an SSE stream; a backend failure ends it with an error event (never a hang)."""
        loop = asyncio.get_running_loop()
        idle = self.config.stream_idle_timeout
        chunks = 1
        async with asyncio.timeout(None) as cm:
            while True:
                cm.reschedule(loop.time() + idle)
                try:
                    chunk = await resp.content.readany()
                except TimeoutError:
                    cm.reschedule(None)
                    return chunks, await self._backend_failed(
                        b, out, model, 504, f"the replica {b.url} sent nothing for {idle:g} s", "stream_timeout")
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                    cm.reschedule(None)
                    return chunks, await self._backend_failed(
                        b, out, model, 502, f"the replica {b.url} failed mid-stream: {type(e).__name__}",
                        "backend_failed")
                cm.reschedule(None)
                if not chunk:
                    break
                chunks += 1
                if b'"usage"' in chunk:
                    self._count_tokens(b.url, model, chunk)
                try:
                    await out.write(chunk)
                except ConnectionError:  # the client went away; closing resp aborts the backend's request
                    return chunks, "error"
        await out.write_eof()
        return chunks, "success" if resp.status < 400 else "error"

    async def _backend_failed(self, b: Backend, out: web.StreamResponse, model: str, status: int, message: str,
                              code: str) -> str:
        self._error(b, model, code)
        self.pool.report_timeout(b)
        logger.warning("%s; ending the stream with an error event", message)
        await self._end_stream(out, status, message, code)
        return "error"

    @staticmethod
    async def _end_stream(out: web.StreamResponse, status: int, message: str, code: str) -> None:
        try:
            await out.write(sse_error_event(status, message, code))
            await out.write_eof()
        except ConnectionError:
            pass

    def _error(self, b: Backend, model: str, kind: str) -> None:
        self.metrics.errors.labels(server=b.url, model=model, error_type=kind).inc()

    def _count_tokens(self, server: str, model: str, data: bytes) -> None:
        i = data.rfind(b'"usage"')
        if i < 0:
            return
        tail = data[i:i + 400]
        if m := _PROMPT_TOKENS.search(tail):
            self.metrics.input_tokens.labels(server=server, model=model).inc(int(m.group(1)))
        if m := _COMPLETION_TOKENS.search(tail):
            self.metrics.output_tokens.labels(server=server, model=model).inc(int(m.group(1)))

