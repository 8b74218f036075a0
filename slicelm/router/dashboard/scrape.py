"""One replica's ``/metrics`` as the dashboard reads it: vLLM's gauges, counters and latency histograms, and the
``slicelm:*`` figures of its slice (memory limit, SM share, memory used on its device)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram: upper bounds (``+Inf`` last) and cumulative counts, summed over label sets."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    def __post_init__(self) -> None:
        assert len(self.bounds) == len(self.counts) and self.bounds and math.isinf(self.bounds[-1])

    @property
    def count(self) -> float:
        return self.counts[-1]

    def minus(self, base: Histogram | None) -> Histogram:
        """Observations since ``base``; all of them when ``base`` is None, differs in shape, or is larger (the
        replica restarted: its counters began again)."""
        if base is None or base.bounds != self.bounds or any(b > c for b, c in zip(base.counts, self.counts)):
            return self
        return Histogram(self.bounds, tuple(c - b for c, b in zip(self.counts, base.counts)))

    def plus(self, other: Histogram | None) -> Histogram:
        if other is None:
            return self
        assert other.bounds == self.bounds, "histograms of one model share their buckets"
        return Histogram(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts)))

    def quantile(self, q: float) -> float | None:
        """Prometheus's ``histogram_quantile``: linear inside the bucket holding rank ``q * count``; the largest
        finite bound when the rank falls in ``+Inf``; None without observations."""
        assert 0 <= q <= 1
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for bound, cum in zip(self.bounds, self.counts):
            if cum >= rank and cum > below:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - below) / (cum - below)
            lower, below = bound, cum
        return lower


@dataclass
class ReplicaScrape:
    """What one scrape of a replica says (cumulative counters as read, gauges as of now)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float | None = None
    prefix_hits: float = 0.0
    prefix_queries: float = 0.0
    finished: float = 0.0  # vllm:request_success_total, every finish reason
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    ttft: Histogram | None = None
    tpot: Histogram | None = None
    slice_memory_bytes: float | None = None
    slice_sm_percent: float | None = None
    memory_used_bytes: float | None = None
    device: str | None = None  # "cuda:0" / "cpu", from slicelm:memory_used_bytes

    @classmethod
    def parse(cls, text: str) -> ReplicaScrape:
        s = cls()
        hists: dict[str, dict[float, float]] = {}
        for family in text_string_to_metric_families(text):
            if family.type == "histogram":
                buckets = hists.setdefault(family.name, {})
                for sample in family.samples:
                    if sample.name.endswith("_bucket"):
                        le = float(sample.labels["le"])
                        buckets[le] = buckets.get(le, 0.0) + sample.value
                continue
            for sample in family.samples:
                s._read(sample.name, sample.value, sample.labels)
        s.ttft = _histogram(hists.get("vllm:time_to_first_token_seconds"))
        s.tpot = _histogram(hists.get("vllm:request_time_per_output_token_seconds"))
        return s

    def _read(self, name: str, v: float, labels: dict[str, str]) -> None:
        if name == "vllm:num_requests_running":
            self.running += v
        elif name == "vllm:num_requests_waiting":
            self.waiting += v
        elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            self.kv_usage = max(self.kv_usage or 0.0, v)
        elif name in SUMMED:
            setattr(self, SUMMED[name], getattr(self, SUMMED[name]) + v)
        elif name == "slicelm:slice_memory_limit_bytes":
            self.slice_memory_bytes = v
        elif name == "slicelm:slice_sm_percent":
            self.slice_sm_percent = v
        elif name == "slicelm:memory_used_bytes":
            self.memory_used_bytes = (self.memory_used_bytes or 0.0) + v
            self.device = labels.get("device", self.device)


SUMMED = {"vllm:prefix_cache_hits_total": "prefix_hits", "vllm:gpu_prefix_cache_hits_total": "prefix_hits",
          "vllm:prefix_cache_queries_total": "prefix_queries",
          "vllm:gpu_prefix_cache_queries_total": "prefix_queries", "vllm:request_success_total": "finished",
          "vllm:prompt_tokens_total": "prompt_tokens", "vllm:generation_tokens_total": "generation_tokens"}


def _histogram(buckets: dict[float, float] | None) -> Histogram | None:
    if not buckets or not math.isinf(max(buckets)):
        return None
    bounds = tuple(sorted(buckets))
    return Histogram(bounds, tuple(buckets[b] for b in bounds))


@dataclass
class RoutedCounts:
    """Requests the router sent to one replica and how many ended in an error (cumulative, from its own metrics)."""

    requests: float = 0.0
    errors: float = 0.0
