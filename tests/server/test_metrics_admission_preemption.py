"""vLLM's newer metrics on the real server (SmolLM2, a 5-block KV cache of 16 tokens, 2 sequences at once, one
waiting request allowed), driven by the official ``openai`` client: ``vllm:request_num_preemptions`` (per finished
request, its sequences' preemptions summed, matching the engine's ``vllm:num_preemptions``),
``vllm:admission_rejections`` (one per ``--max-waiting-requests`` refusal) and the KV capacity labels of
``vllm:cache_config_info``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, Server, start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN = 5, 16, 80


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("metrics"), "--num-gpu-blocks-override", str(BLOCKS), "--block-size",
                     str(BLOCK_SIZE), "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "2",
                     "--max-waiting-requests", "1")
    yield s
    stop_server(s)


def samples(server: Server, name: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of every sample of the metric family ``name``."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) if fam.name == name
            for s in fam.samples]


def value(server: Server, sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum").removesuffix("_bucket")
    found = [v for n, lab, v in samples(server, family) if n == sample and labels.items() <= lab.items()]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


def client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


async def complete(c: openai.AsyncOpenAI, max_tokens: int, n: int = 1) -> openai.types.Completion | int:
    """The completion, or the HTTP status of a refusal."""
    try:
        return await c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=max_tokens, n=n,
                                          temperature=0, extra_body={"ignore_eos": True})
    except openai.APIStatusError as e:
        return e.status_code


def test_cache_config_info_has_the_kv_capacity(server: Server) -> None:
    ((_, labels, v),) = samples(server, "vllm:cache_config_info")
    assert v == 1
    assert labels == {"block_size": str(BLOCK_SIZE), "num_gpu_blocks": str(BLOCKS), "enable_prefix_caching": "True",
                      "kv_cache_size_tokens": str(BLOCKS * BLOCK_SIZE),
                      "kv_cache_max_concurrency": str(BLOCKS * BLOCK_SIZE / MAX_MODEL_LEN)}


def test_request_num_preemptions_sums_to_the_engine_preemptions(server: Server) -> None:
    engine_before = value(server, "vllm:num_preemptions_total")
    count_before = value(server, "vllm:request_num_preemptions_count")
    sum_before = value(server, "vllm:request_num_preemptions_sum")

    async def main() -> list[openai.types.Completion | int]:
        c = client(server)
        first = asyncio.create_task(complete(c, 42, n=2))  # two 46-token sequences need 6 of the 5 blocks
        await asyncio.sleep(0.2)
        return [await first, await complete(c, 42)]

    results = asyncio.run(main())
    assert all(not isinstance(r, int) for r in results), results
    assert [len(r.choices) for r in results] == [2, 1]
    assert all(ch.finish_reason == "length" for r in results for ch in r.choices)
    preempted = value(server, "vllm:num_preemptions_total") - engine_before
    assert preempted >= 1
    assert value(server, "vllm:request_num_preemptions_count") - count_before == 2
    assert value(server, "vllm:request_num_preemptions_sum") - sum_before == preempted
    buckets = [float(lab["le"]) for n, lab, _ in samples(server, "vllm:request_num_preemptions")
               if n.endswith("_bucket") and lab["le"] != "+Inf"]
    assert buckets == [1, 2, 3, 4, 5, 10, 20]


def test_overload_refusals_count_as_admission_rejections(server: Server) -> None:
    reasons = {lab["reason"]: v for n, lab, v in samples(server, "vllm:admission_rejections")
               if n == "vllm:admission_rejections_total"}
    assert set(reasons) == {"max_num_queued_reqs", "max_num_queued_tokens"}
    assert all(lab.keys() == {"model_name", "reason"} for _, lab, _ in samples(server, "vllm:admission_rejections"))

    async def main() -> list[openai.types.Completion | int]:
        c = client(server)
        return list(await asyncio.gather(*(complete(c, 8) for _ in range(8))))  # 2 run, 1 waits, the rest: 503

    results = asyncio.run(main())
    refused = sum(r == 503 for r in results)
    assert refused >= 1 and all(r == 503 or not isinstance(r, int) for r in results), results
    after = value(server, "vllm:admission_rejections_total", reason="max_num_queued_reqs")
    assert after - reasons["max_num_queued_reqs"] == refused
    assert value(server, "vllm:admission_rejections_total", reason="max_num_queued_tokens") == 0
