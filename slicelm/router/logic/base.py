"""The interface every routing logic implements, and the least-loaded choice they fall back on."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slicelm.router.backends import Backend
from slicelm.router.stats import RequestStatsMonitor


@dataclass
class RoutingRequest:
    model: str
    headers: Mapping[str, str]
    body: dict[str, Any]
    session_id: str | None = None


class RoutingLogic:
    """``route`` picks one of ``backends`` (healthy, serving the model, sorted by URL, never empty)."""

    name = "base"

    def __init__(self, stats: RequestStatsMonitor, session_key: str | None = None) -> None:
        self.stats = stats
        self.session_key = session_key

    def extract_session_id(self, headers: Mapping[str, str], body: dict[str, Any]) -> str | None:
        """The ``--session-key`` value: the header first, then the body field."""
        if not self.session_key:
            return None
        val = headers.get(self.session_key)
        if val is None:
            v = body.get(self.session_key)
            val = None if v is None else str(v)
        return val

    def route(self, backends: list[Backend], req: RoutingRequest) -> Backend:
        raise NotImplementedError

    def least_loaded(self, backends: list[Backend]) -> Backend:
        """Lowest load (scraped running + waiting + router in-flight); ties go to the lowest QPS in the stats
        window, a backend with no requests yet first; then the lowest URL."""
        assert backends, "routing needs at least one endpoint"
        now = time.time()
        best, best_key = backends[0], None
        for b in backends:
            qps = self.stats.qps(b.url, now)
            key = (b.load(), -1.0 if qps is None else qps)
            if best_key is None or key < best_key:
                best, best_key = b, key
        return best
