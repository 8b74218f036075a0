"""The dashboard's sampler: every few seconds it reads the stack's state (``slicelm.stack.status``, when the router
follows a ``slicelm up`` run dir), scrapes every live replica's ``/metrics`` and the router's own request counts,
adds a sample to the history and rebuilds the state the page polls.

It samples every ``LIVE_INTERVAL_S`` while someone watched in the last ``LIVE_FOR_S`` seconds, else every
``IDLE_INTERVAL_S`` (so the charts have the last minutes when the page opens, at little cost to the replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import psutil

from slicelm.router.dashboard.history import History, Sample
from slicelm.router.dashboard.rows import MiB, pool_rows, stack_rows
from slicelm.router.dashboard.scrape import ReplicaScrape, RoutedCounts
from slicelm.router.dashboard.view import Meta, build_state, history_json
from slicelm.router.discovery import StackDiscovery
from slicelm.stack.status import status as stack_status

if TYPE_CHECKING:
    from slicelm.router.app import Router
    from slicelm.router.metrics import RouterMetrics

logger = logging.getLogger("slicelm.router")

LIVE_INTERVAL_S = 2.0
IDLE_INTERVAL_S = 10.0
LIVE_FOR_S = 120.0
HISTORY_S = 600.0
SCRAPE_TIMEOUT_S = 3.0
FIRST_SAMPLE_WAIT_S = 10.0  # at most this long for a fresh sample


def routed_counts(metrics: RouterMetrics) -> dict[str, RoutedCounts]:
    """Per backend URL: requests the router finished there and how many ended in an error (its latency
    histogram's counts, labelled ``server`` and ``status``)."""
    out: dict[str, RoutedCounts] = {}
    for family in metrics.latency.collect():
        for s in family.samples:
            if s.name.endswith("_count"):
                c = out.setdefault(s.labels["server"], RoutedCounts())
                c.requests += s.value
                if s.labels.get("status") == "error":
                    c.errors += s.value
    return out


class Sampler:
    def __init__(self, router: Router, version: str) -> None:
        self.router = router
        self.version = version
        discovery = router.pool.discovery
        self.run_dir: Path | None = discovery.path.parent if isinstance(discovery, StackDiscovery) else None
        self.history = History(HISTORY_S, int(HISTORY_S / LIVE_INTERVAL_S) + 2)
        self.state: dict[str, Any] | None = None
        self.viewed_at = float("-inf")
        self._wake: asyncio.Event | None = None
        self._sampled: asyncio.Condition | None = None
        self._count = 0  # samples taken
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    # ---- lifecycle (aiohttp startup / cleanup hooks) ----
    async def start(self, _app: object = None) -> None:
        self._wake, self._sampled = asyncio.Event(), asyncio.Condition()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        self._task = asyncio.create_task(self._run())

    async def stop(self, _app: object = None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def interval(self, now: float) -> float:
        return LIVE_INTERVAL_S if now - self.viewed_at < LIVE_FOR_S else IDLE_INTERVAL_S

    async def _run(self) -> None:
        assert self._wake is not None and self._sampled is not None
        while True:
            try:
                await self.sample_once()
            except Exception:
                logger.exception("dashboard sample failed")
            async with self._sampled:
                self._count += 1
                self._sampled.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval(time.time()))
            self._wake.clear()

    # ---- what the API serves ----
    async def view(self) -> dict[str, Any] | None:
        """The latest state with its history; a request keeps the sampling live for ``LIVE_FOR_S``. After a quiet
        spell (slow sampling) it waits for a fresh sample rather than answer with an old one."""
        assert self._wake is not None and self._sampled is not None
        now = time.time()
        latest = self.history.latest
        stale = latest is None or now - latest.t > 1.5 * LIVE_INTERVAL_S or now - self.viewed_at >= LIVE_FOR_S
        self.viewed_at = now
        if stale:
            seen = self._count
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                async with self._sampled:
                    await asyncio.wait_for(self._sampled.wait_for(lambda: self._count > seen), FIRST_SAMPLE_WAIT_S)
        if self.state is None:
            return None
        return {**self.state, "history": history_json(self.history)}

    # ---- one sample ----
    async def sample_once(self) -> None:
        st = await asyncio.to_thread(stack_status, self.run_dir) if self.run_dir else None
        backends = list(self.router.pool.backends.values())
        live = [b for b in backends if b.healthy]
        scraped = await asyncio.gather(*(self._scrape(b.url) for b in live))
        scrapes = {b.url: s for b, s in zip(live, scraped) if s is not None}
        rows = stack_rows(st, {b.url: b for b in backends}) if st else pool_rows(backends, scrapes)
        routed = routed_counts(self.router.metrics)
        now = time.time()
        self.history.add(Sample(now, {r.key: scrapes[r.url] for r in rows if r.url in scrapes},
                                {r.key: routed.get(r.url, RoutedCounts()) for r in rows}))
        self.state = build_state(self._meta(st), rows, st["gpus"] if st else [], self.history, now)

    async def _scrape(self, url: str) -> ReplicaScrape | None:
        assert self._http is not None
        try:
            async with self._http.get(f"{url}/metrics") as r:
                if r.status != 200:
                    return None
                text = (await r.read()).decode("utf-8", "replace")
            return await asyncio.to_thread(ReplicaScrape.parse, text)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            logger.debug("dashboard: scraping %s/metrics failed: %s", url, e)
            return None

    def _meta(self, st: dict[str, Any] | None) -> Meta:
        cfg, pool = self.router.cfg, self.router.pool
        k8s = cfg.service_discovery == "k8s"
        return Meta(discovery="stack" if self.run_dir else cfg.service_discovery, routing_logic=cfg.routing_logic,
                    run_dir=str(self.run_dir) if self.run_dir else None, phase=st["phase"] if st else None,
                    interval_s=LIVE_INTERVAL_S, history_s=HISTORY_S, version=self.version,
                    backends=len(pool.backends), healthy=pool.healthy_count(),
                    queued=self.router.admission.queue_sizes(),
                    host_memory_mib=None if k8s else psutil.virtual_memory().total // MiB)
