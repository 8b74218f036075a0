"""The replicas as the router sees them: one connection pool each, health, served models, in-flight counts.

A health loop probes every backend's ``/health`` and ``/v1/models``; a dead one (connection refused) is ejected at
once, a stalled one (probe timeouts) after ``--health-failure-threshold`` probes in a row. Ejecting closes the
backend's connection pool, which aborts its in-flight requests, so none waits on a stalled process: those that have
not started streaming are retried elsewhere, streaming ones end with an error event. A backend that answers again is
re-admitted. A stats loop scrapes ``/metrics`` every ``--engine-stats-interval`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from slicelm.router.discovery import Endpoint, ServiceDiscovery
from slicelm.router.stats import EngineStats

logger = logging.getLogger("slicelm.router")


@dataclass
class PoolConfig:
    connect_timeout: float = 5.0
    health_check_interval: float = 2.0
    health_check_timeout: float = 3.0
    health_failure_threshold: int = 2
    engine_stats_interval: float = 30.0
    discovery_interval: float = 1.0


@dataclass(eq=False)
class Backend:
    endpoint: Endpoint
    session: aiohttp.ClientSession
    healthy: bool = True
    polled_models: tuple[str, ...] | None = None
    in_flight: int = 0
    failures: int = 0
    engine_stats: EngineStats | None = None
    ejected_reason: str | None = None
    model_cards: dict[str, dict] = field(default_factory=dict)
    sleeping: bool = False  # asleep (vLLM's sleep mode): not a routing candidate until woken (router/sleep.py)
    _users: dict[aiohttp.ClientSession, int] = field(default_factory=dict)  # requests in flight per session
    _retired: set[aiohttp.ClientSession] = field(default_factory=set)  # replaced, closed once no request uses them

    def acquire(self) -> aiohttp.ClientSession:
        """The session a new request uses; it counts in ``in_flight`` until ``release``."""
        session = self.session
        self.in_flight += 1
        self._users[session] = self._users.get(session, 0) + 1
        return session

    def release(self, session: aiohttp.ClientSession) -> None:
        self.in_flight -= 1
        left = self._users[session] - 1
        if left:
            self._users[session] = left
            return
        del self._users[session]
        if session in self._retired:
            self._retired.discard(session)
            _close_soon(session)

    def retire_session(self, replacement: aiohttp.ClientSession | None) -> None:
        """Stops using the current session (ejected: a fresh one replaces it; removed: ``None``). It closes once no
        request in flight uses it: aiohttp never wakes a response read whose session was closed under it, so such a
        request would wait forever, even after the replica's connection is gone (a killed engine core's streams did)."""
        old = self.session
        if replacement is not None:
            self.session = replacement
        if old in self._users:
            self._retired.add(old)
        else:
            _close_soon(old)

    async def close(self) -> None:
        """Router shutdown: every session, in use or not."""
        for session in {self.session, *self._retired}:
            await session.close()

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def models(self) -> tuple[str, ...]:
        return self.polled_models if self.polled_models is not None else self.endpoint.models

    def load(self) -> float:
        """Scraped running + waiting plus the router's own in-flight requests."""
        s = self.engine_stats
        return self.in_flight + ((s.num_running_requests + s.num_queuing_requests) if s else 0.0)


def _close_soon(session: aiohttp.ClientSession) -> None:
    if not session.closed:
        asyncio.get_running_loop().create_task(session.close())


def _new_session(connect_timeout: float) -> aiohttp.ClientSession:
    # limit=0: no cap on connections per backend (500 concurrent streams must not queue behind a pool limit)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                 skip_auto_headers=("User-Agent", "Accept-Encoding"))


class BackendPool:
    def __init__(self, discovery: ServiceDiscovery, config: PoolConfig) -> None:
        self.discovery = discovery
        self.config = config
        self.backends: dict[str, Backend] = {}
        self.ever_seen: set[str] = set()
        self._by_model: dict[str, list[Backend]] = {}
        self._control: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[Callable[[], None]] = []
        self.discovery_alive = True

    # ---- lifecycle ----
    async def start(self) -> None:
        self._control = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.health_check_timeout))
        await self.discovery.start()
        self.sync()
        await self.check_all()
        await self.scrape_all()
        self._tasks = [asyncio.create_task(self._loop(self.config.discovery_interval, self._sync_async)),
                       asyncio.create_task(self._loop(self.config.health_check_interval, self.check_all)),
                       asyncio.create_task(self._loop(self.config.engine_stats_interval, self.scrape_all))]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.discovery.stop()
        for b in self.backends.values():
            await b.close()
        if self._control is not None:
            await self._control.close()

    async def _loop(self, interval: float, fn: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()  # type: ignore[misc]
            except Exception:
                logger.exception("router background task %s failed", getattr(fn, "__name__", fn))

    # ---- membership ----
    def add_listener(self, fn: Callable[[], None]) -> None:
        """Called when capacity may have appeared: a slot freed, a backend admitted, models changed."""
        self._listeners.append(fn)

    def notify(self) -> None:
        for fn in self._listeners:
            fn()

    async def _sync_async(self) -> None:
        self.sync()

    def sync(self) -> None:
        try:
            endpoints = {e.url: e for e in self.discovery.endpoints()}
            self.discovery_alive = True
        except Exception:
            logger.exception("service discovery failed")
            self.discovery_alive = False
            return
        changed = False
        for url in list(self.backends):
            if url not in endpoints:
                b = self.backends.pop(url)
                b.retire_session(None)  # closed once the requests still on it end
                logger.info("Removed backend %s", url)
                changed = True
        for url, ep in endpoints.items():
            b = self.backends.get(url)
            if b is None:
                self.backends[url] = Backend(ep, _new_session(self.config.connect_timeout))
                logger.info("Added backend %s serving %s", url, ",".join(ep.models))
                changed = True
            elif b.endpoint != ep:
                b.endpoint = ep
                changed = True
        if changed:
            self._reindex()

    def reindex(self) -> None:
        self._reindex()

    def _reindex(self) -> None:
        by_model: dict[str, list[Backend]] = {}
        for b in sorted(self.backends.values(), key=lambda b: b.url):
            for m in b.models:
                self.ever_seen.add(m)
                if b.healthy:
                    by_model.setdefault(m, []).append(b)
        self._by_model = by_model
        self.notify()

    def candidates(self, model: str) -> list[Backend]:
        """Healthy, awake backends serving ``model``, sorted by URL."""
        backends = self._by_model.get(model, [])
        return [b for b in backends if not b.sleeping] if any(b.sleeping for b in backends) else backends

    def models(self) -> dict[str, dict]:
        """Healthy backends' model cards, de-duplicated by id (first URL wins)."""
        out: dict[str, dict] = {}
        for m, backends in sorted(self._by_model.items()):
            out[m] = backends[0].model_cards.get(m) or {"id": m, "object": "model", "created": 0,
                                                        "owned_by": "slicelm", "root": m, "parent": None}
        return out

    # ---- health ----
    def eject(self, b: Backend, reason: str) -> None:
        if self.backends.get(b.url) is not b:
            return
        b.retire_session(_new_session(self.config.connect_timeout))  # no pooled connection to it is reused
        if b.healthy:
            b.healthy = False
            b.ejected_reason = reason
            logger.warning("Ejected backend %s: %s", b.url, reason)
            self._reindex()

    def admit(self, b: Backend) -> None:
        b.failures = 0
        if not b.healthy:
            b.healthy = True
            b.ejected_reason = None
            logger.info("Re-admitted backend %s", b.url)
            self._reindex()

    def report_connect_error(self, b: Backend, exc: BaseException) -> None:
        """The proxy could not reach ``b`` (refused/reset before any response): eject it now."""
        self.eject(b, f"{type(exc).__name__}: {exc}")

    def report_timeout(self, b: Backend) -> None:
        """A request waited past the first-byte timeout on ``b``: probe it now rather than at the next tick."""
        asyncio.get_running_loop().create_task(self.check(b))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in list(self.backends.values())))

    async def check(self, b: Backend) -> None:
        assert self._control is not None
        try:
            async with self._control.get(b.url + "/health") as r:
                ok = r.status == 200
            if ok:
                await self._poll_models(b)
        except TimeoutError:
            b.failures += 1
            if b.failures >= self.config.health_failure_threshold:
                self.eject(b, f"/health timed out {b.failures} times in a row")
            return
        except (aiohttp.ClientError, OSError, ValueError) as e:
            self.eject(b, f"/health failed: {type(e).__name__}: {e}")
            return
        if ok:
            self.admit(b)
        else:
            b.failures += 1
            self.eject(b, f"/health answered {r.status}")

    async def _poll_models(self, b: Backend) -> None:
        assert self._control is not None
        async with self._control.get(b.url + "/v1/models") as r:
            if r.status != 200:
                return
            data = json.loads(await r.read())
        cards = {m["id"]: m for m in data.get("data", []) if isinstance(m, dict) and "id" in m}
        b.model_cards = cards
        models = tuple(cards)
        if models != b.polled_models:
            b.polled_models = models
            self._reindex()

    # ---- engine stats ----
    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(b) for b in list(self.backends.values()) if b.healthy))

    async def scrape(self, b: Backend) -> None:
        assert self._control is not None
        try:
            async with self._control.get(b.url + "/metrics") as r:
                if r.status != 200:
                    return
                text = (await r.read()).decode("utf-8", "replace")
            b.engine_stats = EngineStats.from_scrape(text)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            logger.debug("scraping %s/metrics failed: %s", b.url, e)

    def engine_stats(self) -> dict[str, EngineStats]:
        return {url: b.engine_stats for url, b in self.backends.items() if b.engine_stats is not None}

    def healthy_count(self) -> int:
        return sum(b.healthy for b in self.backends.values())

    def snapshot(self) -> list[dict]:
        now = time.time()
        return [{"url": b.url, "models": list(b.models), "model_type": b.endpoint.model_type,
                 "labels": b.endpoint.labels, "healthy": b.healthy, "in_flight": b.in_flight,
                 "ejected_reason": b.ejected_reason, "load": b.load(), "sleeping": b.sleeping, "time": now}
                for b in sorted(self.backends.values(), key=lambda b: b.url)]
