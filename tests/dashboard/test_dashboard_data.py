"""The dashboard's data path without a browser: real Prometheus text (prometheus_client, vLLM's and slicelm's metric
names) parsed and turned into windowed figures, HAMi's pod annotations, the ring buffer, and the state's GPU / CPU /
model views."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from slicelm.router.dashboard.hami import allocated_devices
from slicelm.router.dashboard.history import History, Sample, load_of
from slicelm.router.dashboard.rows import stack_rows
from slicelm.router.dashboard.scrape import Histogram as Hist
from slicelm.router.dashboard.scrape import ReplicaScrape, RoutedCounts
from slicelm.router.dashboard.view import Meta, build_state, history_json

BUCKETS = [0.01, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5]
MiB = 1 << 20


def replica_metrics(ttft: list[float], tpot: list[float] = (), hits: float = 0, queries: float = 0,
                    running: int = 0, device: str = "cpu", used_mib: int = 300, slice_mib: int | None = None) -> str:
    """A replica's /metrics text as prometheus_client writes it, with vLLM's names and labels."""
    r = CollectorRegistry()
    labels = {"model_name": "m", "engine": "0"}
    h = Histogram("vllm:time_to_first_token_seconds", "", list(labels), buckets=BUCKETS, registry=r).labels(**labels)
    for v in ttft:
        h.observe(v)
    h2 = Histogram("vllm:request_time_per_output_token_seconds", "", list(labels), buckets=BUCKETS, registry=r)
    for v in tpot:
        h2.labels(**labels).observe(v)
    Counter("vllm:prefix_cache_hits", "", list(labels), registry=r).labels(**labels).inc(hits)
    Counter("vllm:prefix_cache_queries", "", list(labels), registry=r).labels(**labels).inc(queries)
    Gauge("vllm:num_requests_running", "", list(labels), registry=r).labels(**labels).set(running)
    Gauge("vllm:kv_cache_usage_perc", "", list(labels), registry=r).labels(**labels).set(0.25)
    succ = Counter("vllm:request_success", "", [*labels, "finished_reason"], registry=r)
    succ.labels(**labels, finished_reason="stop").inc(len(ttft))
    Gauge("slicelm:memory_used_bytes", "", [*labels, "device"], registry=r).labels(**labels, device=device).set(
        used_mib * MiB)
    if slice_mib:
        Gauge("slicelm:slice_memory_limit_bytes", "", list(labels), registry=r).labels(**labels).set(slice_mib * MiB)
        Gauge("slicelm:slice_sm_percent", "", list(labels), registry=r).labels(**labels).set(40)
    return generate_latest(r).decode()


def test_scrape_reads_vllm_and_slice_metrics() -> None:
    s = ReplicaScrape.parse(replica_metrics([0.15] * 3, hits=30, queries=40, running=2, device="cuda:0",
                                            used_mib=900, slice_mib=1024))
    assert s.ttft is not None and s.ttft.count == 3 and s.finished == 3
    assert (s.prefix_hits, s.prefix_queries, s.running, s.kv_usage) == (30, 40, 2, 0.25)
    assert (s.slice_memory_bytes, s.slice_sm_percent, s.memory_used_bytes, s.device) == (1024 * MiB, 40, 900 * MiB,
                                                                                          "cuda:0")
    assert math.isinf(s.ttft.bounds[-1]) and s.tpot is None  # a histogram with no series yet


def test_quantiles_are_prometheus_histogram_quantile() -> None:
    s = ReplicaScrape.parse(replica_metrics([0.15] * 10 + [0.6] * 10))
    assert s.ttft.quantile(0.5) == pytest.approx(0.25)  # rank 10 ends bucket (0.1, 0.25]
    assert s.ttft.quantile(0.99) == pytest.approx(0.5 + 0.25 * 9.8 / 10)  # inside (0.5, 0.75]
    beyond = ReplicaScrape.parse(replica_metrics([0.15, 9.0, 9.0, 9.0]))
    assert beyond.ttft.quantile(0.99) == 2.5  # the +Inf bucket: the largest finite bound
    assert Hist((1.0, math.inf), (0.0, 0.0)).quantile(0.5) is None


def test_histogram_difference_and_restart() -> None:
    before = ReplicaScrape.parse(replica_metrics([2.0] * 5)).ttft
    after = ReplicaScrape.parse(replica_metrics([2.0] * 5 + [0.05] * 5)).ttft
    window = after.minus(before)
    assert window.count == 5 and window.quantile(0.99) <= 0.1
    restarted = ReplicaScrape.parse(replica_metrics([0.05] * 2)).ttft
    assert restarted.minus(before) is restarted  # counters began again: everything since the restart


def test_hami_annotations() -> None:
    ann = {"hami.io/vgpu-devices-allocated": "GPU-aa,NVIDIA,8000,30:;GPU-bb,NVIDIA,5000,0:;",
           "hami.io/vgpu-node": "node-1"}
    devs = allocated_devices(ann)
    assert [(d.uuid, d.memory_mib, d.cores) for d in devs] == [("GPU-aa", 8000, 30), ("GPU-bb", 5000, 0)]
    assert allocated_devices({"hami.io/vgpu-devices-to-allocate": "GPU-cc,NVIDIA,100,10:;"})[0].uuid == "GPU-cc"
    assert allocated_devices({"hami.io/vgpu-devices-allocated": "garbage,,x:;"}) == []
    assert allocated_devices({}) == []


def sample(t: float, routed: float, text: str, key: str = "chat/0") -> Sample:
    return Sample(t, {key: ReplicaScrape.parse(text)}, {key: RoutedCounts(requests=routed, errors=1)})


def test_windows_rate_latency_and_prefix_hits() -> None:
    h = History(horizon_s=600, max_samples=400)
    for i in range(40):  # 3 requests/s for 78 s; slow first tokens until t=10, fast after
        t = 2.0 * i
        ttft = [2.0] * 5 + ([0.05] * (i - 5) if i > 5 else [])
        h.add(sample(t, 3 * t, replica_metrics(ttft, hits=10 * i, queries=20 * i)))
    load = load_of(h, ["chat/0"])
    assert load.requests_per_s == pytest.approx(3.0)
    assert load.requests == 3 * 78 and load.errors == 1
    assert load.ttft_p99 is not None and load.ttft_p99 <= 0.1  # the slow ones left the 60 s window
    assert load.prefix_hit_rate == pytest.approx(0.5)
    assert load.running == 0 and load.kv_usage == 0.25


def test_ring_buffer_is_bounded_in_time_and_count() -> None:
    h = History(horizon_s=10, max_samples=4)
    for t in range(20):
        h.add(Sample(float(t), {}, {}))
    assert [s.t for s in h.samples] == [16.0, 17.0, 18.0, 19.0]
    h2 = History(horizon_s=5, max_samples=100)
    for t in range(20):
        h2.add(Sample(float(t), {}, {}))
    assert h2.samples[0].t == 14.0


def ps_like() -> dict:
    gpu = {"uuid": "GPU-1", "index": 0, "type": "NVIDIA H200", "memory_mib": 143771, "memory_used_mib": 60000}
    rep = dict(pid=1, url="", state="ready", restarts=0, uptime_s=5.0, memory_used_mib=1000, cores=40,
               policy="binpack", device="cuda", gpus=[{"uuid": "GPU-1", "index": 0}], memory_mib=57508)
    return {"phase": "ready", "gpus": [gpu], "replicas": [
        {**rep, "model": "chat", "replica": 0, "url": "http://h:1", "served_names": ["qwen"]},
        {**rep, "model": "chat", "replica": 1, "url": "http://h:2", "served_names": ["qwen"], "state": "starting",
         "restarts": 2},
        {**rep, "model": "embed", "replica": 0, "url": "http://h:3", "device": "cpu", "gpus": [], "memory_mib": None,
         "cores": None, "policy": None}]}


def test_state_groups_slices_by_gpu_and_models() -> None:
    st = ps_like()
    rows = stack_rows(st, {})
    assert [r.status for r in rows] == ["ready", "restarting", "ready"]  # starting again after a death
    h = History(600, 100)
    h.add(Sample(1.0, {"chat/0": ReplicaScrape.parse(replica_metrics([0.2]))},
                 {"chat/0": RoutedCounts(4, 0), "chat/1": RoutedCounts(2, 1), "embed/0": RoutedCounts()}))
    state = build_state(Meta(discovery="stack", run_dir="/r", phase="ready", host_memory_mib=24000), rows, st["gpus"],
                        h, 1.0)
    (gpu,) = state["gpus"]
    assert gpu["memory_mib"] == 143771 and [s["key"] for s in gpu["slices"]] == ["chat/0", "chat/1"]
    assert gpu["slices"][0] == {"key": "chat/0", "model": "chat", "replica": 0, "memory_mib": 57508,
                                "memory_used_mib": 1000, "cores": 40, "policy": "binpack", "status": "ready"}
    assert [s["key"] for s in state["cpu"]["slices"]] == ["embed/0"] and state["cpu"]["memory_mib"] == 24000
    chat = next(m for m in state["models"] if m["name"] == "chat")
    assert (chat["replicas"], chat["ready"], chat["requests"], chat["errors"]) == (2, 1, 6, 1)
    hist = history_json(h)
    assert hist["t"] == [1.0] and hist["models"]["chat"]["running"] == [0.0] and hist["gpus"]["GPU-1"] == [60000]
