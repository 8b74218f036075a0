"""``RouterConfig``: the router's settings, from production-stack's flag names plus ours; bad values name the flag."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from slicelm.router.backends import PoolConfig
from slicelm.router.discovery import ServiceDiscovery, StackDiscovery, StaticDiscovery
from slicelm.router.logic import LOGICS
from slicelm.router.proxy import ProxyConfig

DISCOVERY_TYPES = ("static", "k8s")


def _csv(value: str | None) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()] if value else []


@dataclass
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 8001
    service_discovery: str = "static"
    static_backends: list[str] = field(default_factory=list)
    static_models: list[str] = field(default_factory=list)
    static_model_types: list[str] = field(default_factory=list)
    stack: str | None = None
    k8s_namespace: str = "default"
    k8s_label_selector: str = ""
    k8s_port: int = 8000
    routing_logic: str = "roundrobin"
    session_key: str | None = None
    prefix_min_match_length: int = 0
    prefix_max_imbalance: float = 4
    request_stats_window: float = 60.0
    api_key: str | None = None
    max_inflight_per_replica: int = 256
    max_queue_size: int = 1024
    queue_timeout: float = 60.0
    log_stats: bool = False
    log_stats_interval: float = 10.0
    log_level: str = "info"
    idle_sleep_after: float | None = None  # seconds without requests before a replica is put to sleep
    idle_sleep_level: int = 1
    pool: PoolConfig = field(default_factory=PoolConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)

    def validate(self) -> None:
        if self.routing_logic not in LOGICS:
            raise ValueError(f"--routing-logic: unknown value {self.routing_logic!r} (choose from {', '.join(LOGICS)})")
        if self.service_discovery not in DISCOVERY_TYPES:
            raise ValueError(f"--service-discovery: unknown value {self.service_discovery!r} "
                             f"(choose from {', '.join(DISCOVERY_TYPES)})")
        if self.routing_logic == "session" and not self.session_key:
            raise ValueError("--session-key: required with --routing-logic session")
        if self.service_discovery == "static" and not self.stack:
            if not self.static_backends:
                raise ValueError("--static-backends: required with --service-discovery static (or give --stack)")
            if len(self.static_models) != len(self.static_backends):
                raise ValueError(f"--static-models: {len(self.static_models)} names for "
                                 f"{len(self.static_backends)} --static-backends")
            if self.static_model_types and len(self.static_model_types) != len(self.static_backends):
                raise ValueError(f"--static-model-types: {len(self.static_model_types)} types for "
                                 f"{len(self.static_backends)} --static-backends")
        if self.service_discovery == "k8s" and self.stack:
            raise ValueError("--stack: not used with --service-discovery k8s")
        positive = {"--engine-stats-interval": self.pool.engine_stats_interval,
                    "--request-stats-window": self.request_stats_window,
                    "--connect-timeout": self.pool.connect_timeout,
                    "--first-byte-timeout": self.proxy.first_byte_timeout,
                    "--stream-idle-timeout": self.proxy.stream_idle_timeout,
                    "--health-check-interval": self.pool.health_check_interval,
                    "--health-check-timeout": self.pool.health_check_timeout,
                    "--queue-timeout": self.queue_timeout, "--log-stats-interval": self.log_stats_interval}
        for flag, v in positive.items():
            if not v > 0:
                raise ValueError(f"{flag}: must be > 0 (got {v})")
        non_negative = {"--max-instance-failover-reroute-attempts": self.proxy.max_failover,
                        "--prefix-min-match-length": self.prefix_min_match_length,
                        "--prefix-max-imbalance": self.prefix_max_imbalance,
                        "--max-inflight-per-replica": self.max_inflight_per_replica,
                        "--max-queue-size": self.max_queue_size}
        for flag, v in non_negative.items():
            if v < 0:
                raise ValueError(f"{flag}: must be >= 0 (got {v})")
        if self.idle_sleep_after is not None and self.idle_sleep_after <= 0:
            raise ValueError(f"--idle-sleep-after: must be > 0 seconds (got {self.idle_sleep_after})")
        if self.idle_sleep_level not in (0, 1, 2):
            raise ValueError(f"--idle-sleep-level: must be 0, 1 or 2 (got {self.idle_sleep_level})")
        if self.pool.health_failure_threshold < 1:
            raise ValueError("--health-failure-threshold: must be >= 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port: {self.port} is not a TCP port")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> RouterConfig:
        cfg = cls(
            host=a.host, port=a.port, service_discovery=a.service_discovery or "static",
            static_backends=_csv(a.static_backends), static_models=_csv(a.static_models),
            static_model_types=_csv(a.static_model_types), stack=a.stack, k8s_namespace=a.k8s_namespace,
            k8s_label_selector=a.k8s_label_selector, k8s_port=a.k8s_port, routing_logic=a.routing_logic,
            session_key=a.session_key, prefix_min_match_length=a.prefix_min_match_length,
            prefix_max_imbalance=a.prefix_max_imbalance,
            request_stats_window=a.request_stats_window,
            api_key=a.api_key or os.environ.get("VLLM_API_KEY") or os.environ.get("SLICELM_API_KEY"),
            max_inflight_per_replica=a.max_inflight_per_replica, max_queue_size=a.max_queue_size,
            queue_timeout=a.queue_timeout, log_stats=a.log_stats, log_stats_interval=a.log_stats_interval,
            log_level=a.log_level, idle_sleep_after=getattr(a, "idle_sleep_after", None),
            idle_sleep_level=getattr(a, "idle_sleep_level", 1),
            pool=PoolConfig(connect_timeout=a.connect_timeout, health_check_interval=a.health_check_interval,
                            health_check_timeout=a.health_check_timeout,
                            health_failure_threshold=a.health_failure_threshold,
                            engine_stats_interval=a.engine_stats_interval),
            proxy=ProxyConfig(first_byte_timeout=a.first_byte_timeout, stream_idle_timeout=a.stream_idle_timeout,
                              max_failover=a.max_instance_failover_reroute_attempts))
        cfg.validate()
        return cfg

    def build_discovery(self) -> ServiceDiscovery:
        if self.service_discovery == "k8s":
            try:
                from slicelm.router.discovery_k8s import K8sDiscovery
            except ImportError as e:
                raise ValueError(f"--service-discovery k8s: slicelm.router.discovery_k8s is not available ({e}); "
                                 "install the Kubernetes support (pip install kubernetes) or use static") from None
            return K8sDiscovery(namespace=self.k8s_namespace, label_selector=self.k8s_label_selector,
                                port=self.k8s_port)
        if self.stack:
            return StackDiscovery(self.stack)
        return StaticDiscovery(self.static_backends, self.static_models, self.static_model_types or None)
