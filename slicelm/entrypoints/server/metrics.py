"""Prometheus metrics with vLLM's names, labels and buckets, and the periodic throughput log line.

Both are ``AsyncLLM`` stat listeners: they run on the engine-loop thread after every iteration with the
engine's ``EngineStats`` snapshot (gauges set, cumulative counters advanced by deltas) and the
iteration's per-request latencies (histograms).

Several API servers (``--api-server-count N``): prometheus_client's multiprocess mode (the parent sets
``PROMETHEUS_MULTIPROC_DIR``, as vLLM does), so any server's ``/metrics`` adds up every server's series.
Request-level metrics (request counts, latency and size histograms) are recorded by every server and
summed; engine-level ones (running / waiting / KV gauges, token / preemption / prefix-cache counters,
``iteration_tokens_total``) by server 0 only (``record_engine=False`` elsewhere), so each counts once.

A pooling model's server also shows how its requests were batched (``EngineStats``' pooling fields):
``slicelm:pooling_steps_total``, ``slicelm:pooling_multi_request_steps_total``, ``slicelm:pooling_requests_total``
and ``slicelm:pooling_max_batch_requests``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from slicelm.config import CacheConfig
from slicelm.engine.stats import ADMISSION_REASONS, EngineStats, IterationStats, PoolingStats
from slicelm.entrypoints.server.elastic_metrics import ElasticMetrics

logger = logging.getLogger("slicelm.stats")
disable_created_metrics()  # as vLLM: no *_created series

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISH_REASONS = ("stop", "length", "abort")
ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
REQUEST_N_BUCKETS = [1, 2, 5, 10, 20]
REQUEST_NUM_PREEMPTIONS_BUCKETS = [1, 2, 3, 4, 5, 10, 20]
WAITING_REASONS = ("capacity", "deferred")

METRIC_NAMES = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions", "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits", "vllm:request_success", "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds", "vllm:request_time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
    "vllm:request_inference_time_seconds", "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds", "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
    "vllm:cache_config_info", "vllm:iteration_tokens_total", "vllm:num_requests_waiting_by_reason",
    "vllm:request_params_n", "vllm:request_params_max_tokens", "vllm:engine_sleep_state",
    "vllm:request_num_preemptions", "vllm:admission_rejections",
)


def _token_buckets(max_model_len: int) -> list[float]:
    """vLLM's 1-2-5 series up to ``max_model_len``."""
    out: list[float] = []
    exp = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_model_len:
                return out
            out.append(float(v))
        exp += 1


def cache_config_info(cache: CacheConfig, max_model_len: int) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info``: the KV cache's shape, its capacity in tokens (blocks x block size)
    and how many ``max_model_len`` requests it holds at once (each takes whole blocks, as vLLM counts)."""
    blocks_per_request = -(-max(1, max_model_len) // cache.block_size)
    return {"block_size": str(cache.block_size), "num_gpu_blocks": str(cache.num_blocks),
            "enable_prefix_caching": str(cache.enable_prefix_caching),
            "kv_cache_size_tokens": str(cache.num_blocks * cache.block_size),
            "kv_cache_max_concurrency": str(cache.num_blocks / blocks_per_request)}


class PrometheusStatLogger:
    """Owns a ``CollectorRegistry`` (one per server) holding the ``vllm:*`` metrics."""

    def __init__(self, model_name: str, max_model_len: int, cache_info: dict[str, str] | None = None,
                 engine_index: int = 0, record_engine: bool = True, pooling: bool = False) -> None:
        self.record_engine = record_engine
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name", "engine"]
        self.labels = {"model_name": model_name, "engine": str(engine_index)}
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r, multiprocess_mode="mostrecent").labels(**self.labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(**self.labels)

        def hist(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(**self.labels)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions.")
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in terms of number of cached tokens.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*labels, "finished_reason"], registry=r)
        self.success = {reason: success.labels(**self.labels, finished_reason=reason) for reason in FINISH_REASONS}
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference_time = hist("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.",
                                   REQUEST_LATENCY_BUCKETS)
        self.prefill_time = hist("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = hist("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        token_buckets = _token_buckets(max(1, max_model_len))
        self.req_prompt_tokens = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                      token_buckets)
        self.req_gen_tokens = hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                   token_buckets)
        self.iteration_tokens = hist("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                     ITERATION_TOKEN_BUCKETS)
        self.req_preemptions = hist("vllm:request_num_preemptions",
                                    "Histogram of the number of times a request was preempted.",
                                    REQUEST_NUM_PREEMPTIONS_BUCKETS)
        rejections = Counter("vllm:admission_rejections", "Number of admission attempts rejected by a queue limit, "
                             "by reason.", ["model_name", "reason"], registry=r)
        self.admission_rejections = {reason: rejections.labels(model_name=model_name, reason=reason)
                                     for reason in ADMISSION_REASONS}
        self.params_n = hist("vllm:request_params_n", "Histogram of the n request parameter.", REQUEST_N_BUCKETS)
        self.params_max_tokens = hist("vllm:request_params_max_tokens", "Histogram of the max_tokens request "
                                      "parameter.", token_buckets)
        by_reason = Gauge("vllm:num_requests_waiting_by_reason", "Number of requests waiting, by the reason they "
                          "wait.", [*labels, "reason"], registry=r, multiprocess_mode="mostrecent")
        self.waiting_by_reason = {reason: by_reason.labels(**self.labels, reason=reason) for reason in WAITING_REASONS}
        self.pooling: dict[str, Counter] = {}
        if pooling:
            self.pooling = {
                "num_steps": counter("slicelm:pooling_steps", "Engine steps that ran pooling requests."),
                "num_multi_request_steps": counter("slicelm:pooling_multi_request_steps",
                                                   "Pooling steps that batched 2+ requests."),
                "num_requests": counter("slicelm:pooling_requests", "Pooling requests run by the engine."),
            }
            self.pooling_max_batch = Gauge("slicelm:pooling_max_batch_requests", "Most pooling requests in one step.",
                                           labels, registry=r, multiprocess_mode="max").labels(**self.labels)
        info = {k: str(v) for k, v in (cache_info or {}).items()}
        cache_gauge = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", sorted(info),
                            registry=r, multiprocess_mode="max")
        (cache_gauge.labels(**info) if info else cache_gauge).set(1)
        self.elastic = ElasticMetrics(r, self.labels)
        slice_collector = SliceCollector(self.labels)
        r.register(slice_collector)
        self.scrape_registry = r
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # every API server's series, from the shared files
            self.scrape_registry = CollectorRegistry()
            MultiProcessCollector(self.scrape_registry)
            self.scrape_registry.register(slice_collector)
        self._prev: EngineStats | None = None

    def __call__(self, stats: EngineStats, it: IterationStats) -> None:
        if self.record_engine:
            self._record_engine(stats)
        self._record_requests(it)

    def _record_engine(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.waiting_by_reason["capacity"].set(stats.num_waiting)  # nothing is deferred (no KV transfer)
        self.waiting_by_reason["deferred"].set(0)
        self.kv_usage.set(stats.kv_cache_usage)
        self.elastic.record(stats)
        prev, self._prev = self._prev, stats
        d = stats.delta(prev)
        self.prompt_tokens.inc(d["num_prompt_tokens"])
        self.generation_tokens.inc(d["num_generation_tokens"])
        self.preemptions.inc(d["num_preemptions"])
        self.prefix_queries.inc(d["prefix_cache_queries"])
        self.prefix_hits.inc(d["prefix_cache_hits"])
        step_tokens = d["num_prompt_tokens"] + d["num_generation_tokens"]
        if step_tokens > 0:
            self.iteration_tokens.observe(step_tokens)
        if self.pooling and stats.pooling is not None:
            self._record_pooling(stats.pooling, prev.pooling if prev is not None else None)

    def _record_pooling(self, now: PoolingStats, prev: PoolingStats | None) -> None:
        for name, counter in self.pooling.items():
            counter.inc(max(0, getattr(now, name) - (getattr(prev, name) if prev is not None else 0)))
        self.pooling_max_batch.set(now.max_batch_requests)

    def _record_requests(self, it: IterationStats) -> None:
        for t in it.time_to_first_tokens:
            self.ttft.observe(t)
        for t in it.inter_token_latencies:
            self.itl.observe(t)
        for f in it.finished:
            self.success.get(f.finish_reason, self.success["stop"]).inc()
            self.e2e.observe(f.e2e_latency)
            self.req_prompt_tokens.observe(f.num_prompt_tokens)
            self.req_gen_tokens.observe(f.num_generation_tokens)
            self.req_preemptions.observe(f.num_preemptions)
            for h, v in ((self.queue_time, f.queue_time), (self.prefill_time, f.prefill_time),
                         (self.decode_time, f.decode_time), (self.inference_time, f.inference_time),
                         (self.tpot, f.time_per_output_token)):
                if v is not None:
                    h.observe(v)
        for reason in it.admission_rejections:
            self.admission_rejections[reason].inc()

    def observe_request_params(self, n: int, max_tokens: int | None) -> None:
        self.params_n.observe(n)
        if max_tokens:
            self.params_max_tokens.observe(max_tokens)

    def render(self) -> bytes:
        return generate_latest(self.scrape_registry)


def _slice_figures() -> tuple[int | None, int | None]:
    """(memory bytes, SM percent) of this replica's GPU slice: ours (SLICELM_SLICE_*, set by ``slicelm up``) or
    HAMi-core's env (slicelm.slicing), else MPS's thread percentage alone."""
    from slicelm.slicing.spec import slice_from_env

    found = slice_from_env()
    mem, sm = (found.memory_bytes, found.sm_percent) if found else (None, None)
    mps = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    if sm is None and mps:
        sm = int(float(mps))
    return mem, sm


def _memory_used() -> tuple[int, str] | None:
    """This process's memory on its device: NVML per process (else torch's reserved bytes) on a GPU once CUDA
    is in use, resident memory on the CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        from slicelm.engine.memory import process_gpu_memory

        index = torch.cuda.current_device()
        used = process_gpu_memory(index)
        return (used if used is not None else torch.cuda.memory_reserved(index)), f"cuda:{index}"
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "cpu"
    except (OSError, ValueError, IndexError):
        return None


class SliceCollector:
    """``slicelm:slice_memory_limit_bytes`` / ``slicelm:slice_sm_percent`` (the replica's slice, when it has
    one) and ``slicelm:memory_used_bytes{device}``, read at scrape time."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        names, values = list(self.labels), list(self.labels.values())
        mem, sm = _slice_figures()
        if mem is not None:
            g = GaugeMetricFamily("slicelm:slice_memory_limit_bytes", "GPU memory of this replica's slice.",
                                  labels=names)
            g.add_metric(values, mem)
            yield g
        if sm is not None:
            g = GaugeMetricFamily("slicelm:slice_sm_percent", "Share of the GPU's SMs given to this replica.",
                                  labels=names)
            g.add_metric(values, sm)
            yield g
        used = _memory_used()
        if used is not None:
            g = GaugeMetricFamily("slicelm:memory_used_bytes", "Memory this replica's process uses on its device.",
                                  labels=[*names, "device"])
            g.add_metric([*values, used[1]], used[0])
            yield g


class LoggingStatLogger:
    """Logs throughput, queue and cache figures every ``interval`` seconds while there is activity."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last_time = time.monotonic()
        self._last: EngineStats | None = None
        self.last_line: str | None = None

    def __call__(self, stats: EngineStats, it: IterationStats) -> None:
        now = time.monotonic()
        if now - self._last_time < self.interval:
            return
        elapsed = now - self._last_time
        prev = self._last or EngineStats()
        d = stats.delta(prev)
        self._last_time, self._last = now, stats
        if not any(d.values()) and stats.num_running == 0 and stats.num_waiting == 0:
            return
        hit_rate = d["prefix_cache_hits"] / d["prefix_cache_queries"] if d["prefix_cache_queries"] else 0.0
        self.last_line = (
            f"Avg prompt throughput: {d['num_prompt_tokens'] / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {d['num_generation_tokens'] / elapsed:.1f} tokens/s, "
            f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
            f"GPU KV cache usage: {100 * stats.kv_cache_usage:.1f}%, "
            f"Prefix cache hit rate: {100 * hit_rate:.1f}%")
        logger.info(self.last_line)
