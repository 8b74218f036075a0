"""Engine statistics: a snapshot the engine fills and the server's metrics / log lines read.

``EngineStats`` is plain data. Gauges (``num_running``, ``num_waiting``, ``kv_cache_usage``) describe
the engine right now; the other counters are cumulative since the engine started, so readers advance
their Prometheus counters by deltas between two snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOKEN_COUNTERS = ("num_prompt_tokens", "num_generation_tokens", "num_preemptions", "prefix_cache_queries",
                  "prefix_cache_hits")
POOLING_COUNTERS = ("num_pooling_steps", "num_pooling_multi_request_steps", "num_pooling_requests")


@dataclass
class EngineStats:
    # gauges
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0-1
    # cumulative counters
    num_prompt_tokens: int = 0  # prompt tokens computed (prefix-cache hits excluded)
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # tokens found there
    # pooling models: how pooling requests were batched (cumulative counters; the largest batch so far)
    num_pooling_steps: int = 0
    num_pooling_multi_request_steps: int = 0  # steps that ran 2+ pooling requests
    num_pooling_requests: int = 0
    pooling_max_batch_requests: int = 0
    # optional extras (engines may leave them at their defaults)
    num_steps: int = 0
    timestamp: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def delta(self, prev: EngineStats | None, names: tuple[str, ...] = TOKEN_COUNTERS) -> dict[str, int]:
        """Increments of the counters ``names`` since ``prev`` (all of their values when ``prev`` is None), never
        negative."""
        return {n: max(0, getattr(self, n) - (getattr(prev, n) if prev is not None else 0)) for n in names}



@dataclass
class FinishedRequestStats:
    """Latencies of one finished request (seconds), for histograms."""

    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    queue_time: float | None = None
    prefill_time: float | None = None
    decode_time: float | None = None
    inference_time: float | None = None
    time_per_output_token: float | None = None


@dataclass
class IterationStats:
    """What one engine-loop iteration produced, handed to stat loggers with the engine snapshot."""

    now: float
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
