"""Engine statistics: a snapshot the engine fills and the server's metrics / log lines read.

``EngineStats`` is plain data. Gauges (``num_running``, ``num_waiting``, ``kv_cache_usage``) describe
the engine right now; the other counters are cumulative since the engine started, so readers advance
their Prometheus counters by deltas between two snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOKEN_COUNTERS = ("num_prompt_tokens", "num_generation_tokens", "num_preemptions", "prefix_cache_queries",
                  "prefix_cache_hits")
# Why the front end refused a request (vLLM's ``vllm:admission_rejections`` reasons). slicelm's one queue limit,
# ``--max-waiting-requests``, counts requests: its refusals are ``max_num_queued_reqs``; it has no token limit.
MAX_NUM_QUEUED_REQS = "max_num_queued_reqs"
ADMISSION_REASONS = (MAX_NUM_QUEUED_REQS, "max_num_queued_tokens")


@dataclass
class PoolingStats:
    """How a pooling engine batched its requests: cumulative counters, and the largest batch so far."""

    num_steps: int = 0
    num_multi_request_steps: int = 0  # steps that ran 2+ pooling requests
    num_requests: int = 0
    max_batch_requests: int = 0

    def count_step(self, num_requests: int) -> None:
        self.num_steps += 1
        self.num_requests += num_requests
        self.num_multi_request_steps += int(num_requests > 1)
        self.max_batch_requests = max(self.max_batch_requests, num_requests)


@dataclass
class ElasticKVStats:
    """An elastic KV cache's memory (bytes) and how often the memory broker took borrowed memory back."""

    mapped_bytes: int = 0  # KV memory the engine holds now
    guarantee_bytes: int = 0  # its share within the slice
    ceiling_bytes: int = 0  # the most the broker lets it hold
    borrowed_bytes: int = 0  # held beyond the guarantee
    reclaims: int = 0  # cumulative


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
    pooling: PoolingStats | None = None  # pooling engines only (None keeps a generation step's message small)
    elastic: ElasticKVStats | None = None  # engines with an elastic (or broker-managed) KV cache only
    sleep_level: int = 0  # the level of the last sleep (vLLM's ``vllm:engine_sleep_state``)
    is_sleeping: bool = False
    # optional extras (engines may leave them at their defaults)
    num_steps: int = 0
    timestamp: float = 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def delta(self, prev: EngineStats | None) -> dict[str, int]:
        """Counter increments since ``prev`` (all counters when ``prev`` is None), never negative."""
        return {n: max(0, getattr(self, n) - (getattr(prev, n) if prev is not None else 0)) for n in TOKEN_COUNTERS}



@dataclass
class FinishedRequestStats:
    """Latencies (seconds) and counts of one finished request, for histograms."""

    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    queue_time: float | None = None
    prefill_time: float | None = None
    decode_time: float | None = None
    inference_time: float | None = None
    time_per_output_token: float | None = None
    num_preemptions: int = 0  # times the core preempted its sequences (summed over ``n``)


@dataclass
class IterationStats:
    """What one engine-loop iteration produced (or one refused request), handed to stat loggers with the engine
    snapshot."""

    now: float
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    admission_rejections: list[str] = field(default_factory=list)  # one reason (ADMISSION_REASONS) per refusal
