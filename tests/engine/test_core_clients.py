"""Every core client implements ``CoreClient`` and reports the same ``EngineCoreInfo`` for the same engine.

Real cores of one tiny random Llama (``--load-format dummy``): in a thread (``ThreadCoreClient``), in their own
process (``MPCoreClient``) and shared by two API-server clients (``CoreProcess`` for two clients +
``SharedCoreClient``).
Each then serves one real greedy request through ``AsyncLLM``: the same tokens from all of them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from utils_models import write_tiny_llama

from slicelm.config import EngineArgs
from slicelm.engine.async_llm import AsyncLLM
from slicelm.engine.core import EngineCore
from slicelm.engine.core_client import CoreClient, MPCoreClient, ThreadCoreClient
from slicelm.engine.core_launcher import CoreProcess
from slicelm.engine.core_messages import EngineCoreInfo
from slicelm.engine.core_shared import SharedCoreClient
from slicelm.engine.protocol import EngineClient
from slicelm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def args(tmp_path_factory: pytest.TempPathFactory) -> EngineArgs:
    return EngineArgs(model=write_tiny_llama(tmp_path_factory.mktemp("tiny")), load_format="dummy", device="cpu",
                      max_model_len=128, max_num_seqs=4, skip_tokenizer_init=True, seed=0)


@pytest.fixture(scope="module")
def clients(args: EngineArgs) -> Iterator[dict[str, CoreClient]]:
    shared = CoreProcess(args, client_count=2)
    made: dict[str, CoreClient] = {}
    try:
        made["thread"] = ThreadCoreClient(EngineCore(args))
        made["process"] = MPCoreClient(args)
        info = shared.wait_ready(120)
        for i, (in_addr, out_addr) in enumerate(shared.client_addrs):
            made[f"shared-{i}"] = SharedCoreClient(i, in_addr, out_addr, shared.pid, info)
        yield made
    finally:
        for c in made.values():
            c.shutdown()
        shared.shutdown()


def test_every_core_client_satisfies_the_protocol(clients: dict[str, CoreClient]) -> None:
    assert set(clients) == {"thread", "process", "shared-0", "shared-1"}
    for name, client in clients.items():
        assert isinstance(client, CoreClient), name
        assert client.death_reason() is None, name
    assert clients["thread"].pid is None
    assert clients["process"].pid not in (None, os.getpid())
    assert clients["shared-0"].pid == clients["shared-1"].pid not in (None, os.getpid())


def test_wait_ready_gives_the_same_info_everywhere(clients: dict[str, CoreClient]) -> None:
    infos = {name: c.wait_ready(120) for name, c in clients.items()}
    first = infos["thread"]
    assert isinstance(first, EngineCoreInfo) and first.cache_config.num_blocks > 0
    for name, info in infos.items():
        assert isinstance(info, EngineCoreInfo), name
        assert info == first, name


def test_each_client_serves_the_same_tokens_through_async_llm(clients: dict[str, CoreClient]) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def run(client: CoreClient) -> list[int]:
        llm = AsyncLLM(client, client.wait_ready(), None)
        assert isinstance(llm, EngineClient)
        ids: list[int] = []
        async for out in llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, params, "r"):
            ids += out.outputs[0].token_ids
        return ids

    tokens = {name: asyncio.run(run(c)) for name, c in clients.items()}
    assert len(tokens["thread"]) == 6
    assert all(t == tokens["thread"] for t in tokens.values()), tokens
