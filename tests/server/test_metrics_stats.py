"""``PrometheusStatLogger`` over ``EngineStats`` snapshots: a pooling model's batch series exist from start-up
(``EngineStats.pooling``, no route involved), counters advance by deltas, and only the recording server
records engine figures."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from slicelm.engine.stats import EngineStats, IterationStats, PoolingStats
from slicelm.entrypoints.server.metrics import PrometheusStatLogger

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
