"""The router's ``/metrics``: production-stack's router metric names and labels, in a registry of our own."""

from __future__ import annotations

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from slicelm.router.backends import BackendPool
from slicelm.router.queue import Admission
from slicelm.router.stats import RequestStatsMonitor

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("server",)) -> Gauge:
            return Gauge(name, doc, list(labels), registry=r)

        self.num_requests_running = gauge("vllm:num_requests_running", "Number of running requests")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Number of waiting requests")
        self.prefix_hit_rate = gauge("vllm:gpu_prefix_cache_hit_rate", "GPU Prefix Cache Hit Rate")
        self.prefix_hits = gauge("vllm:gpu_prefix_cache_hits_total", "Total GPU Prefix Cache Hits")
        self.prefix_queries = gauge("vllm:gpu_prefix_cache_queries_total", "Total GPU Prefix Cache Queries")
        self.current_qps = gauge("vllm:current_qps", "Current Queries Per Second")
        self.avg_decoding_length = gauge("vllm:avg_decoding_length", "Average Decoding Length")
        self.num_prefill_requests = gauge("vllm:num_prefill_requests", "Number of Prefill Requests")
        self.num_decoding_requests = gauge("vllm:num_decoding_requests", "Number of Decoding Requests")
        self.healthy_pods_total = gauge("vllm:healthy_pods_total", "Number of healthy vLLM pods")
        self.avg_latency = gauge("vllm:avg_latency", "Average end-to-end request latency")
        self.avg_itl = gauge("vllm:avg_itl", "Average Inter-Token Latency")
        self.num_requests_swapped = gauge("vllm:num_requests_swapped", "Number of swapped requests")
        self.incoming = Counter("vllm:num_incoming_requests", "Total valid incoming requests to router",
                                ["model"], registry=r)
        self.input_tokens = Counter("vllm:input_tokens_total", "Total input tokens processed",
                                    ["server", "model"], registry=r)
        self.output_tokens = Counter("vllm:output_tokens_total", "Total output tokens generated",
                                     ["server", "model"], registry=r)
        self.errors = Counter("vllm:request_errors_total", "Total request errors",
                              ["server", "model", "error_type"], registry=r)
        self.latency = Histogram("vllm:request_latency_seconds", "End-to-end request latency observed at the router",
                                 ["server", "model", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.cpu = Gauge("router_cpu_usage_percent", "CPU usage percent", registry=r)
        self.memory = Gauge("router_memory_usage_percent", "Memory usage percent", registry=r)
        self.queued = Gauge("slicelm_router_queued_requests", "Requests waiting in the router's queue", ["model"],
                            registry=r)
        self.failovers = Counter("slicelm_router_failovers", "Requests retried on another replica",
                                 ["server", "model"], registry=r)
        self._label_gauges = [self.num_requests_running, self.num_requests_waiting, self.prefix_hit_rate,
                              self.prefix_hits, self.prefix_queries, self.current_qps, self.avg_decoding_length,
                              self.num_prefill_requests, self.num_decoding_requests, self.healthy_pods_total,
                              self.avg_latency, self.avg_itl, self.num_requests_swapped, self.queued]
        self._process = psutil.Process()
        self._process.cpu_percent(None)

    def render(self, pool: BackendPool, stats: RequestStatsMonitor, admission: Admission) -> bytes:
        for g in self._label_gauges:
            g.clear()
        self.cpu.set(self._process.cpu_percent(None))
        self.memory.set(psutil.virtual_memory().percent)
        for server, s in stats.get().items():
            self.current_qps.labels(server=server).set(s.qps)
            self.avg_decoding_length.labels(server=server).set(s.avg_decoding_length)
            self.num_prefill_requests.labels(server=server).set(s.in_prefill_requests)
            self.num_decoding_requests.labels(server=server).set(s.in_decoding_requests)
            self.avg_latency.labels(server=server).set(s.avg_latency)
            self.avg_itl.labels(server=server).set(s.avg_itl)
            self.num_requests_swapped.labels(server=server).set(0)
        for b in pool.backends.values():
            self.healthy_pods_total.labels(server=b.url).set(1 if b.healthy else 0)
            es = b.engine_stats
            self.num_requests_running.labels(server=b.url).set(b.in_flight)  # the router's view, as production-stack
            self.num_requests_waiting.labels(server=b.url).set(es.num_queuing_requests if es else 0)
            if es:
                self.prefix_hit_rate.labels(server=b.url).set(es.prefix_cache_hit_rate)
                self.prefix_hits.labels(server=b.url).set(es.prefix_cache_hits)
                self.prefix_queries.labels(server=b.url).set(es.prefix_cache_queries)
        for model, n in admission.queue_sizes().items():
            self.queued.labels(model=model).set(n)
        return generate_latest(self.registry)
