"""Load signals: engine stats scraped from each backend's ``/metrics`` and the router's own request stats over a
sliding window (production-stack's ``--engine-stats-interval`` and ``--request-stats-window``)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class EngineStats:
    num_running_requests: float = 0.0
    num_queuing_requests: float = 0.0
    prefix_cache_hits: float = 0.0
    prefix_cache_queries: float = 0.0
    kv_cache_usage_perc: float = 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @classmethod
    def from_scrape(cls, text: str) -> EngineStats:
        """Sums over label sets; reads vLLM v1's names and the older ``gpu_*`` ones."""
        s = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, v = sample.name, sample.value
                if name == "vllm:num_requests_running":
                    s.num_running_requests += v
                elif name == "vllm:num_requests_waiting":
                    s.num_queuing_requests += v
                elif name in ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"):
                    s.prefix_cache_hits += v
                elif name in ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"):
                    s.prefix_cache_queries += v
                elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
                    s.kv_cache_usage_perc = max(s.kv_cache_usage_perc, v)
        return s


@dataclass
class RequestStats:
    qps: float
    ttft: float
    avg_latency: float
    avg_itl: float
    avg_decoding_length: float
    in_prefill_requests: int
    in_decoding_requests: int
    finished_requests: int


@dataclass
class _ServerWindow:
    arrivals: deque[float] = field(default_factory=deque)
    ttfts: deque[tuple[float, float]] = field(default_factory=deque)
    latencies: deque[tuple[float, float]] = field(default_factory=deque)
    decodes: deque[tuple[float, float, int]] = field(default_factory=deque)  # (t, decode seconds, chunks)
    in_prefill: int = 0
    in_decoding: int = 0
    finished: int = 0

    def prune(self, horizon: float) -> None:
        for q in (self.arrivals,):
            while q and q[0] < horizon:
                q.popleft()
        for q2 in (self.ttfts, self.latencies, self.decodes):
            while q2 and q2[0][0] < horizon:
                q2.popleft()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class RequestStatsMonitor:
    """Per-server counters fed by the proxy; ``get(now)`` summarizes the last ``window`` seconds."""

    def __init__(self, window: float) -> None:
        assert window > 0
        self.window = window
        self._servers: dict[str, _ServerWindow] = {}

    def _server(self, url: str) -> _ServerWindow:
        w = self._servers.get(url)
        if w is None:
            w = self._servers[url] = _ServerWindow()
        return w

    def on_new_request(self, url: str, now: float) -> None:
        w = self._server(url)
        w.arrivals.append(now)
        w.in_prefill += 1
        if len(w.arrivals) > 4096:
            w.prune(now - self.window)

    def on_first_byte(self, url: str, started: float, now: float) -> None:
        w = self._server(url)
        w.in_prefill -= 1
        w.in_decoding += 1
        w.ttfts.append((now, now - started))

    def on_complete(self, url: str, started: float, first_byte: float | None, now: float, chunks: int) -> None:
        w = self._server(url)
        if first_byte is None:
            w.in_prefill -= 1
        else:
            w.in_decoding -= 1
            w.decodes.append((now, now - first_byte, chunks))
        w.finished += 1
        w.latencies.append((now, now - started))
        if len(w.latencies) > 4096:
            w.prune(now - self.window)

    def qps(self, url: str, now: float | None = None) -> float | None:
        """Requests per second sent to ``url`` in the window; ``None`` for a server never used."""
        w = self._servers.get(url)
        if w is None:
            return None
        now = time.time() if now is None else now
        horizon = now - self.window
        while w.arrivals and w.arrivals[0] < horizon:
            w.arrivals.popleft()
        return len(w.arrivals) / self.window

    def get(self, now: float | None = None) -> dict[str, RequestStats]:
        now = time.time() if now is None else now
        out = {}
        for url, w in self._servers.items():
            w.prune(now - self.window)
            decode_s = sum(d for _, d, _ in w.decodes)
            tokens = sum(n for _, _, n in w.decodes)
            out[url] = RequestStats(
                qps=len(w.arrivals) / self.window, ttft=_mean([x for _, x in w.ttfts]),
                avg_latency=_mean([x for _, x in w.latencies]),
                avg_itl=decode_s / tokens if tokens else 0.0,
                avg_decoding_length=_mean([d for _, d, _ in w.decodes]),
                in_prefill_requests=w.in_prefill, in_decoding_requests=w.in_decoding, finished_requests=w.finished)
        return out
