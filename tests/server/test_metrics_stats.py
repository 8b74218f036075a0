"""``PrometheusStatLogger`` over ``EngineStats`` snapshots: a pooling model's batch series exist from start-up
(``EngineStats.pooling``, no route involved), counters advance by deltas, and only the recording server
records engine figures; per-request preemptions and admission rejections (every server records them); the KV
capacity labels of ``vllm:cache_config_info``."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from slicelm.config import CacheConfig
from slicelm.engine.stats import MAX_NUM_QUEUED_REQS, EngineStats, FinishedRequestStats, IterationStats, PoolingStats
from slicelm.entrypoints.server.metrics import PrometheusStatLogger, cache_config_info

POOLING_SERIES = ("slicelm:pooling_steps_total", "slicelm:pooling_multi_request_steps_total",
                  "slicelm:pooling_requests_total", "slicelm:pooling_max_batch_requests")


def samples(logger: PrometheusStatLogger) -> dict[str, float]:
    text = logger.render().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_pooling_series_exist_at_start_up_and_follow_the_engine() -> None:
    logger = PrometheusStatLogger("m", 512, pooling=True)
    found = samples(logger)
    assert all(found[name] == 0 for name in POOLING_SERIES), found
    logger(EngineStats(pooling=PoolingStats(3, 1, 5, 3)), IterationStats(now=0.0))
    logger(EngineStats(pooling=PoolingStats(4, 2, 9, 4)), IterationStats(now=1.0))
    found = samples(logger)
    assert [found[name] for name in POOLING_SERIES] == [4, 2, 9, 4]


def test_generation_servers_have_no_pooling_series_and_other_servers_record_no_engine_figures() -> None:
    assert not set(POOLING_SERIES) & set(samples(PrometheusStatLogger("m", 512)))
    follower = PrometheusStatLogger("m", 512, record_engine=False, pooling=True)
    follower(EngineStats(pooling=PoolingStats(3, 1, 5, 3)), IterationStats(now=0.0))
    assert all(samples(follower)[name] == 0 for name in POOLING_SERIES)


def test_cache_config_info_labels_give_the_kv_capacity() -> None:
    info = cache_config_info(CacheConfig(block_size=16, num_blocks=5, enable_prefix_caching=True), 80)
    assert info == {"block_size": "16", "num_gpu_blocks": "5", "enable_prefix_caching": "True",
                    "kv_cache_size_tokens": "80", "kv_cache_max_concurrency": "1.0"}
    # a request of max_model_len tokens takes whole blocks: 32 tokens take 2, 50 take 4, 72 take 5 of the 5
    assert cache_config_info(CacheConfig(16, 5), 50)["kv_cache_max_concurrency"] == "1.25"
    assert cache_config_info(CacheConfig(16, 5), 72)["kv_cache_max_concurrency"] == "1.0"
    assert cache_config_info(CacheConfig(16, 5), 32)["kv_cache_max_concurrency"] == "2.5"
    labels = next(s.labels for fam in text_string_to_metric_families(
        PrometheusStatLogger("m", 80, info).render().decode()) if fam.name == "vllm:cache_config_info"
        for s in fam.samples)
    assert labels == info


def test_preemptions_per_request_and_admission_rejections_on_every_server() -> None:
    for logger in (PrometheusStatLogger("m", 512), PrometheusStatLogger("m", 512, record_engine=False)):
        found = samples(logger)
        assert found["vllm:request_num_preemptions_count"] == 0
        assert found["vllm:admission_rejections_total"] == 0  # both reasons' series exist from start-up
        finished = [FinishedRequestStats("length", 4, 8, 1.0, num_preemptions=k) for k in (0, 3, 25)]
        logger(EngineStats(), IterationStats(now=0.0, finished=finished))
        logger(EngineStats(), IterationStats(now=1.0, admission_rejections=[MAX_NUM_QUEUED_REQS] * 2))
        text = logger.render().decode()
        hist = {(s.name, s.labels.get("le")): s.value for fam in text_string_to_metric_families(text)
                if fam.name == "vllm:request_num_preemptions" for s in fam.samples}
        assert hist[("vllm:request_num_preemptions_count", None)] == 3
        assert hist[("vllm:request_num_preemptions_sum", None)] == 28
        assert [hist[("vllm:request_num_preemptions_bucket", le)] for le in ("1.0", "2.0", "3.0", "20.0", "+Inf")] \
            == [1, 1, 2, 2, 3]
        rejected = {s.labels["reason"]: s.value for fam in text_string_to_metric_families(text)
                    if fam.name == "vllm:admission_rejections" for s in fam.samples}
        assert rejected == {"max_num_queued_reqs": 2, "max_num_queued_tokens": 0}
