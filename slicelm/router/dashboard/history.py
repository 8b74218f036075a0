"""The router's memory of the last minutes: a bounded ring of samples (each replica's scrape and the router's
own request counts), and the figures derived from two samples a window apart (rates, latency percentiles,
prefix-cache hit rate)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from slicelm.router.dashboard.scrape import Histogram, ReplicaScrape, RoutedCounts

RATE_WINDOW_S = 10.0  # requests/s over the last 10 s: moves within a refresh or two
LATENCY_WINDOW_S = 60.0  # TTFT / TPOT percentiles and prefix-cache hit rate over the last minute


@dataclass
class Sample:
    t: float
    scrapes: dict[str, ReplicaScrape]  # by replica key
    routed: dict[str, RoutedCounts]  # by replica key
    point: dict[str, Any] = field(default_factory=dict)  # the charts' values at ``t`` (see view.chart_point)


class History:
    """Samples of the last ``horizon_s`` seconds, oldest first; at most ``max_samples``."""

    def __init__(self, horizon_s: float, max_samples: int) -> None:
        assert horizon_s > 0 and max_samples > 1
        self.horizon_s = horizon_s
        self.samples: deque[Sample] = deque(maxlen=max_samples)

    def add(self, sample: Sample) -> None:
        assert not self.samples or sample.t >= self.samples[-1].t
        self.samples.append(sample)
        while self.samples[0].t < sample.t - self.horizon_s:
            self.samples.popleft()

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def base(self, key: str, window: float, what: str) -> Sample | None:
        """The newest earlier sample at least ``window`` seconds before the latest that has ``key`` in its
        ``what`` (``scrapes`` / ``routed``); else the oldest earlier one that has it; None if there is none."""
        latest = self.latest
        if latest is None:
            return None
        oldest = None
        for s in reversed(self.samples):
            if s is latest or key not in getattr(s, what):
                continue
            if s.t <= latest.t - window:
                return s
            oldest = s
        return oldest


@dataclass
class Load:
    """A replica's (or a model's, summed) load figures; None where nothing was measured."""

    requests: float | None = None  # routed through this router, since it started
    errors: float | None = None
    requests_per_s: float | None = None
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None  # 0..1 (a model: the mean of its replicas)
    prefix_hit_rate: float | None = None  # 0..1
    ttft_p50: float | None = None  # seconds
    ttft_p99: float | None = None
    tpot_p50: float | None = None
    tpot_p99: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return dict(vars(self))


@dataclass
class _Window:
    """One replica's changes over the windows: what a model's figures are summed from."""

    scrape: ReplicaScrape | None
    routed: RoutedCounts | None
    rate: float | None
    ttft: Histogram | None
    tpot: Histogram | None
    prefix_hits: float
    prefix_queries: float


def _since(cur: float, base: float | None) -> float:
    """A counter's increase; all of it when there is no base or the counter began again (a restart)."""
    return cur if base is None or base > cur else cur - base


def _window(history: History, key: str) -> _Window:
    latest = history.latest
    assert latest is not None
    scrape, routed = latest.scrapes.get(key), latest.routed.get(key)
    rate = None
    rb = history.base(key, RATE_WINDOW_S, "routed") if routed else None
    if rb is not None and latest.t > rb.t:
        rate = _since(routed.requests, rb.routed[key].requests) / (latest.t - rb.t)
    lb = history.base(key, LATENCY_WINDOW_S, "scrapes") if scrape else None
    base = lb.scrapes[key] if lb else None
    if scrape is None:
        return _Window(None, routed, rate, None, None, 0.0, 0.0)
    hits = _since(scrape.prefix_hits, base.prefix_hits if base else None)
    queries = _since(scrape.prefix_queries, base.prefix_queries if base else None)
    if not queries:  # nothing in the window: the cumulative rate
        hits, queries = scrape.prefix_hits, scrape.prefix_queries
    return _Window(scrape, routed, rate, scrape.ttft.minus(base.ttft if base else None) if scrape.ttft else None,
                   scrape.tpot.minus(base.tpot if base else None) if scrape.tpot else None, hits, queries)


def _sum(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _merge(hists: list[Histogram | None]) -> Histogram | None:
    out = None
    for h in hists:
        if h is None:
            continue
        if out is None:
            out = h
        elif out.bounds == h.bounds:  # replicas of one model share their buckets
            out = out.plus(h)
    return out


def load_of(history: History, keys: list[str]) -> Load:
    """The figures of ``keys`` together (one replica, or every replica of a model) at the latest sample."""
    ws = [_window(history, k) for k in keys] if history.latest else []
    scraped = [w.scrape for w in ws if w.scrape]
    ttft, tpot = _merge([w.ttft for w in ws]), _merge([w.tpot for w in ws])
    queries = sum(w.prefix_queries for w in ws)
    kv = [s.kv_usage for s in scraped if s.kv_usage is not None]
    return Load(
        requests=_sum([w.routed.requests if w.routed else None for w in ws]),
        errors=_sum([w.routed.errors if w.routed else None for w in ws]),
        requests_per_s=_sum([w.rate for w in ws]),
        running=_sum([s.running for s in scraped]), waiting=_sum([s.waiting for s in scraped]),
        kv_usage=sum(kv) / len(kv) if kv else None,
        prefix_hit_rate=sum(w.prefix_hits for w in ws) / queries if queries else None,
        ttft_p50=ttft.quantile(0.5) if ttft else None, ttft_p99=ttft.quantile(0.99) if ttft else None,
        tpot_p50=tpot.quantile(0.5) if tpot else None, tpot_p99=tpot.quantile(0.99) if tpot else None)
