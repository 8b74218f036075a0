"""Metrics of sleep mode and elastic KV, from the engine's stats snapshot (``EngineStats.sleep_level`` /
``is_sleeping`` / ``elastic``).

- ``vllm:engine_sleep_state{sleep_state=awake|weights_offloaded|discard_all}`` (vLLM's gauge);
- ``slicelm:kv_cache_mapped_bytes`` (KV memory the engine holds now), ``slicelm:kv_cache_guaranteed_bytes``
  (its share within the slice), ``slicelm:kv_cache_ceiling_bytes`` (the most the broker lets it hold),
  ``slicelm:kv_cache_borrowed_bytes`` (held beyond the guarantee) and ``slicelm:kv_reclaims_total`` (times
  the broker took borrowed memory back).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from slicelm.engine.stats import EngineStats

SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
BYTE_GAUGES = {  # ElasticKVStats field -> metric
    "mapped_bytes": ("slicelm:kv_cache_mapped_bytes", "KV cache memory this engine holds now."),
    "guarantee_bytes": ("slicelm:kv_cache_guaranteed_bytes", "KV cache memory guaranteed within the slice."),
    "ceiling_bytes": ("slicelm:kv_cache_ceiling_bytes", "Most KV cache memory the memory broker allows."),
    "borrowed_bytes": ("slicelm:kv_cache_borrowed_bytes", "KV cache memory held beyond the guarantee."),
}


class ElasticMetrics:
    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        names = list(labels)
        sleep = Gauge("vllm:engine_sleep_state", "Engine sleep state; awake = 0 means the engine is sleeping; "
                      "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
                      [*names, "sleep_state"], registry=registry, multiprocess_mode="mostrecent")
        self.sleep = {s: sleep.labels(**labels, sleep_state=s) for s in SLEEP_STATES}
        self.sleep["awake"].set(1)
        self.bytes: dict[str, Gauge] = {}
        self._registry, self._labels = registry, labels
        self.reclaims: Counter | None = None
        self._reclaims_seen = 0

    def record(self, stats: EngineStats) -> None:
        level, asleep = stats.sleep_level, stats.is_sleeping
        for state, value in (("awake", not asleep), ("weights_offloaded", asleep and level == 1),
                             ("discard_all", asleep and level == 2)):
            self.sleep[state].set(int(value))
        kv = stats.elastic
        if kv is None:
            return
        if not self.bytes:  # elastic engines only
            names = list(self._labels)
            for key, (name, doc) in BYTE_GAUGES.items():
                self.bytes[key] = Gauge(name, doc, names, registry=self._registry,
                                        multiprocess_mode="mostrecent").labels(**self._labels)
            self.reclaims = Counter("slicelm:kv_reclaims", "Times the memory broker took borrowed KV memory back.",
                                    names, registry=self._registry).labels(**self._labels)
        for key, gauge in self.bytes.items():
            gauge.set(getattr(kv, key))
        assert self.reclaims is not None
        self.reclaims.inc(max(0, kv.reclaims - self._reclaims_seen))
        self._reclaims_seen = kv.reclaims
