"""Elastic KV on the CPU backend (anonymous mmap, pages dropped with MADV_DONTNEED so a page given back
reads as zeros): the virtual range, chunk mapping, the block pool growing and shrinking, and engines
that grow, give back, borrow through a real memory broker and are reclaimed — with their outputs
compared against an ordinary engine."""

from __future__ import annotations

import json
import time

import pytest
import torch

from slicelm.config import EngineArgs
from slicelm.engine.core import EngineCore
from slicelm.engine.core_messages import EngineCoreRequest
from slicelm.engine.kv_memory import KVLayout, PagedKVMemory, chunk_blocks_for
from slicelm.engine.vmm import HostVirtualRange
from slicelm.engine.warmup import warm_up
from slicelm.sampling_params import SamplingParams
from slicelm.slicing.broker_client import BROKER_ENV, REPLICA_ENV
from slicelm.stack.broker import BrokerState
from slicelm.stack.broker_server import BrokerServer

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
        "vocab_size": 256, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "torch_dtype": "float32"}
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # layers × K/V × block_size × kv heads × head_dim × fp32 = 8 KiB
CHUNK_BLOCKS = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is ~30x faster than oversubscribed ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps(TINY))
    return str(path)


def _core(model: str, kv_blocks: int, **kw: object) -> EngineCore:
    return EngineCore(EngineArgs(model=model, load_format="dummy", skip_tokenizer_init=True, device="cpu",
                                 max_model_len=512, max_num_seqs=16, kv_cache_memory_bytes=kv_blocks * BLOCK_BYTES,
                                 seed=0, **kw))


def _prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 255, (length,), generator=g).tolist() for _ in range(n)]


def _add(core: EngineCore, prompts: list[list[int]], max_tokens: int, prefix: str = "r") -> None:
    for i, p in enumerate(prompts):
        core.add_request(EngineCoreRequest(f"{prefix}{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                             ignore_eos=True)))


def _run(cores: list[EngineCore], timeout: float = 120.0) -> list[dict[str, list[int]]]:
    """Steps every core (one thread, round robin) until all are done; the tokens of each request."""
    outs: list[dict[str, list[int]]] = [{} for _ in cores]
    deadline = time.monotonic() + timeout
    while any(c.has_unfinished_requests() for c in cores):
        assert time.monotonic() < deadline, "requests hang"
        for c, out in zip(cores, outs):
            if c.is_runnable():
                for o in c.step():
                    out.setdefault(o.request_id, []).extend(o.new_token_ids)
            else:
                c.service()
    return outs


def test_host_range_gives_pages_back() -> None:
    r = HostVirtualRange(1 << 20)
    t = r.tensor(0, (r.size // 4,), torch.float32)
    r.map(0, r.granularity)
    t[:16] = 3.0
    r.unmap(0)
    assert r.mapped_bytes == 0 and float(t[:16].sum()) == 0.0  # the page went back to the OS
    with pytest.raises(ValueError):
        r.map(1, r.granularity)


def test_a_chunk_maps_one_slice_of_every_layer() -> None:
    layout = KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    assert chunk_blocks_for(layout, 4096) == CHUNK_BLOCKS and chunk_blocks_for(layout, 1 << 21) == 1024
    mem = PagedKVMemory(layout, max_blocks=40, device=torch.device("cpu"))
    assert mem.max_blocks == 48 and mem.chunk_bytes == CHUNK_BLOCKS * BLOCK_BYTES
    assert [tuple(kv.shape) for kv in mem.kv_caches] == [(2, 48, 16, 2, 16)] * 2
    mem.map_chunk(1)
    for kv in mem.kv_caches:
        kv[:, 16:32] = 1.0
    mem.unmap_chunk(1)
    assert mem.mapped_bytes == 0 and all(float(kv.abs().sum()) == 0 for kv in mem.kv_caches)


def test_elastic_engine_grows_on_demand_and_gives_free_chunks_back(tiny_dir: str) -> None:
    ref = _core(tiny_dir, 64)
    el = _core(tiny_dir, 64, elastic_kv=True, elastic_kv_watermark=0.0)
    assert el.elastic is not None and el.cache_config.num_blocks == 64
    assert len(el.elastic.memory.mapped) == 1  # one chunk to start with
    prompts = _prompts(12, 40)
    for core in (ref, el):
        _add(core, prompts, max_tokens=40)  # 12 × 80 tokens = 60 blocks: the whole guarantee, with preemption
    peak = 0
    outs = [{}, {}]
    while el.has_unfinished_requests() or ref.has_unfinished_requests():
        for core, out in zip((ref, el), outs):
            for o in core.step() if core.has_unfinished_requests() else []:
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        peak = max(peak, len(el.elastic.memory.mapped))
    assert outs[0] == outs[1] and all(len(t) == 40 for t in outs[1].values())
    assert peak == 4  # grew to its guarantee of 64 blocks
    el.service(idle=True)
    assert len(el.elastic.memory.mapped) == 1  # idle: back to chunk 0 (watermark 0)
    stats = el.get_stats()
    assert stats.elastic.mapped_bytes == CHUNK_BLOCKS * BLOCK_BYTES and stats.elastic.borrowed_bytes == 0
    _metrics_show(stats)


def _metrics_show(stats) -> None:
    """The server's gauges read the typed figures (``slicelm:kv_cache_*``, ``vllm:engine_sleep_state``)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from slicelm.entrypoints.server.elastic_metrics import ElasticMetrics

    registry = CollectorRegistry()
    ElasticMetrics(registry, {"model_name": "m"}).record(stats)
    text = generate_latest(registry).decode()
    assert f'slicelm:kv_cache_mapped_bytes{{model_name="m"}} {float(stats.elastic.mapped_bytes)}' in text
    assert f'slicelm:kv_cache_guaranteed_bytes{{model_name="m"}} {float(stats.elastic.guarantee_bytes)}' in text
    assert 'vllm:engine_sleep_state{model_name="m",sleep_state="awake"} 1.0' in text


def test_borrower_is_reclaimed_for_the_owner_and_no_request_is_lost(tiny_dir, tmp_path, monkeypatch) -> None:
    """Two engines and a real broker: B borrows everything free, then A asks for its share; B preempts by
    recompute and gives it back within the bound, A gets it, and every request of both finishes with the
    same tokens as on an engine alone."""
    chunk = CHUNK_BLOCKS * BLOCK_BYTES
    state = BrokerState({"cpu": 10 * chunk}, max_borrow=None, reclaim_timeout=1.0)
    overdue: list[str] = []
    broker = BrokerServer(f"ipc://{tmp_path}/broker.ipc", state, on_overdue=overdue.append).start()
    try:
        monkeypatch.setenv(BROKER_ENV, broker.address)
        monkeypatch.setenv(REPLICA_ENV, "owner")
        a = _core(tiny_dir, 4 * CHUNK_BLOCKS, elastic_kv=True, elastic_kv_max_bytes=10 * chunk)
        monkeypatch.setenv(REPLICA_ENV, "borrower")
        b = _core(tiny_dir, 2 * CHUNK_BLOCKS, elastic_kv=True, elastic_kv_max_bytes=10 * chunk)
        assert a.elastic.ceiling_chunks == 10 and b.elastic.ceiling_chunks == 10
        long = _prompts(16, 100, seed=1)
        _add(b, long, max_tokens=60)  # 16 × 160 tokens = 160 blocks: B borrows all it can (9 chunks)
        outs: list[dict[str, list[int]]] = [{}, {}]
        for _ in range(400):
            if len(b.elastic.memory.mapped) >= 9:
                break
            for o in b.step():
                outs[1].setdefault(o.request_id, []).extend(o.new_token_ids)
            b.service()
        assert len(b.elastic.memory.mapped) == 9 and broker.status()["gpus"]["cpu"]["free"] == 0
        _add(a, _prompts(8, 100, seed=2), max_tokens=28)  # 8 × 128 tokens = 64 blocks: A's whole share
        t0 = time.monotonic()
        reached = None
        while a.has_unfinished_requests() or b.has_unfinished_requests():
            assert time.monotonic() - t0 < 120, "requests hang"
            for core, out in zip((a, b), outs):
                for o in core.step() if core.is_runnable() else []:
                    out.setdefault(o.request_id, []).extend(o.new_token_ids)
                core.service()
            if reached is None and len(a.elastic.memory.mapped) == 4:
                reached = time.monotonic() - t0
        assert reached is not None and reached < state.reclaim_timeout  # B gave the memory back in time
        assert b.elastic.stats.reclaims >= 1 and b.scheduler.num_preemptions > 0 and overdue == []
        solo_a, solo_b = _core(tiny_dir, 64), _core(tiny_dir, 512)
        _add(solo_a, _prompts(8, 100, seed=2), max_tokens=28)
        _add(solo_b, long, max_tokens=60)
        assert outs == _run([solo_a, solo_b])
        members = broker.status()["members"]
        assert members["owner"]["used"] == len(a.elastic.memory.mapped) * chunk
        assert members["borrower"]["used"] == len(b.elastic.memory.mapped) * chunk
    finally:
        broker.stop()


def test_switching_to_static_slices_shrinks_borrowers(tiny_dir, tmp_path, monkeypatch) -> None:
    chunk = CHUNK_BLOCKS * BLOCK_BYTES
    broker = BrokerServer(f"ipc://{tmp_path}/b.ipc", BrokerState({"cpu": 8 * chunk}, None, 1.0)).start()
    try:
        monkeypatch.setenv(BROKER_ENV, broker.address)
        monkeypatch.setenv(REPLICA_ENV, "solo")
        core = _core(tiny_dir, 2 * CHUNK_BLOCKS, elastic_kv=True, elastic_kv_watermark=1.0)
        _add(core, _prompts(6, 100, seed=3), max_tokens=60)
        for _ in range(200):
            core.step()
            if len(core.elastic.memory.mapped) > 2:
                break
        assert len(core.elastic.memory.mapped) > 2
        from slicelm.slicing.broker_client import BrokerControl

        ctl = BrokerControl(broker.address)
        ctl.set_policy(0)
        ctl.close()
        deadline = time.monotonic() + 5
        while len(core.elastic.memory.mapped) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
            core.step()
        assert len(core.elastic.memory.mapped) <= 2 and core.elastic.ceiling_chunks == 2
        out = _run([core])[0]
        assert len(out) == 6  # every request still finishes inside the static slice
    finally:
        broker.stop()


def test_kv_memory_is_given_back_past_the_watermark_only(tiny_dir: str) -> None:
    core = _core(tiny_dir, 8 * CHUNK_BLOCKS, elastic_kv=True, elastic_kv_watermark=0.5)
    _add(core, _prompts(12, 100, seed=4), max_tokens=20)
    _run([core])
    core.service(idle=True)
    free = core.scheduler.kv_cache.pool.num_free_blocks
    assert core.elastic.high_water == 4 * CHUNK_BLOCKS
    assert CHUNK_BLOCKS < free <= core.elastic.high_water  # up to half the share stays mapped while idle
    warm_up(core)  # what the engine does before it is ready: its growth goes back, the core is as new
    assert len(core.elastic.memory.mapped) == 1 and core.elastic.stats.peak_chunks == 1


def test_offline_sleep_levels_drop_and_restore_the_weights(tiny_dir: str) -> None:
    from slicelm import LLM

    llm = LLM(tiny_dir, load_format="dummy", skip_tokenizer_init=True, device="cpu", max_model_len=256,
              kv_cache_memory_bytes=4 * CHUNK_BLOCKS * BLOCK_BYTES, enable_sleep_mode=True)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(3, 30, seed=5)]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    weights = llm.engine.core.worker.weights
    for level in (1, 2):
        llm.sleep(level)
        assert float(weights._bytes().abs().sum()) == 0.0  # pages given back: they read as zeros
        assert not llm.engine.core.elastic.memory.mapped
        assert llm.wake_up() > 0
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    with pytest.raises(ValueError, match="level"):
        llm.sleep(3)


def test_a_quantized_model_sleeps_at_level_1_only(tmp_path) -> None:
    """Level 2 would reload an AWQ checkpoint into weights already repacked for the kernels: refused, with the
    engine left as it was; level 1 keeps the repacked weights and wakes with the same outputs."""
    from utils_quant import base_model, write_awq

    from slicelm import LLM

    write_awq(base_model(), tmp_path)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, device="cpu", max_model_len=256,
              kv_cache_memory_bytes=4 << 20, enable_sleep_mode=True)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(2, 20, seed=6)]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with pytest.raises(ValueError, match="level 1 at most"):
        llm.sleep(2)
    assert not llm.engine.core.sleep_mode.is_sleeping
    llm.sleep(1)
    assert llm.wake_up() > 0
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want


def test_one_gpu_features_are_refused_with_tensor_parallelism() -> None:
    with pytest.raises(ValueError, match="--enable-sleep-mode, --elastic-kv: not supported with --tensor-parallel"):
        EngineArgs(model="m", tensor_parallel_size=2, enable_sleep_mode=True, elastic_kv=True)
    with pytest.raises(ValueError, match="--green-context-sms"):
        EngineArgs(model="m", tensor_parallel_size=2, green_context_sms="64")
