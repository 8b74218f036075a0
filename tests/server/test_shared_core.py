"""One core loop serving two clients (the ``--api-server-count`` wiring, in one process, fast).

The real ``CoreLoop`` runs a ``FakeEngineCore`` in a thread with one PULL socket connected to both
clients and one PUSH socket per client; each client is a real ``SharedCoreClient`` under a real
``AsyncLLM``. Each must get exactly its own requests' outputs, aborts must reach the core, and the
core must forget finished / aborted sequences' owners.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator

import pytest
import zmq
from fake_engine import FakeEngineCore, FakeTokenizer

from slicelm.engine.async_llm import AsyncLLM
from slicelm.engine.core_proc import CoreLoop
from slicelm.engine.core_shared import SharedCoreClient
from slicelm.sampling_params import SamplingParams


@pytest.fixture
def two_clients() -> Iterator[tuple[CoreLoop, FakeEngineCore, list[AsyncLLM]]]:
    ctx = zmq.Context.instance()
    name = uuid.uuid4().hex
    addrs = [(f"inproc://{name}-in-{i}", f"inproc://{name}-out-{i}") for i in range(2)]
    core = FakeEngineCore(max_num_seqs=8, step_delay=0.002)
    clients = [SharedCoreClient(i, a, b, os.getpid(), core.info()) for i, (a, b) in enumerate(addrs)]
    in_sock = ctx.socket(zmq.PULL)
    outs = []
    for a, b in addrs:
        in_sock.connect(a)
        out = ctx.socket(zmq.PUSH)
        out.connect(b)
        outs.append(out)
    loop = CoreLoop(core, in_sock, outs)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    llms = [AsyncLLM(c, c.wait_ready(), FakeTokenizer()) for c in clients]
    yield loop, core, llms
    loop.stopped = True
    thread.join(5)
    for llm in llms:
        llm.shutdown()
    in_sock.close(linger=0)
    for out in outs:
        out.close(linger=0)


def test_each_client_gets_only_its_own_outputs(two_clients: tuple[CoreLoop, FakeEngineCore, list[AsyncLLM]]) -> None:
    loop, core, llms = two_clients

    async def run(llm: AsyncLLM, rid: str, max_tokens: int) -> tuple[str, int]:
        text, n = "", 0
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        async for out in llm.generate({"prompt_token_ids": [3 + ord("a")]}, params, rid):
            assert out.request_id == rid
            text += out.outputs[0].text
            n += len(out.outputs[0].token_ids)
        return text, n

    async def main() -> list[tuple[str, int]]:
        jobs = [run(llms[i % 2], f"c{i % 2}-r{i}", 5 + i) for i in range(8)]
        results = await asyncio.wait_for(asyncio.gather(*jobs), 20)  # a misrouted output: a stream waits forever
        for _ in range(100):  # client 0's message of the last step may come after client 1's last output
            if llms[0].last_stats.num_generation_tokens == core.num_generation_tokens:
                break
            await asyncio.sleep(0.01)
        return results

    results = asyncio.run(main())
    assert [n for _, n in results] == [5 + i for i in range(8)]
    assert all(text == "bcdefghijklm"[: 5 + i] for i, (text, _) in enumerate(results))
    assert loop.client_adds == [4, 4] and loop.owners == {}
    assert llms[0].last_stats.num_generation_tokens == core.num_generation_tokens  # client 0: every step's stats
    assert all(llm.num_active_requests == 0 for llm in llms)


def test_abort_from_the_second_client_reaches_the_core(
        two_clients: tuple[CoreLoop, FakeEngineCore, list[AsyncLLM]]) -> None:
    loop, core, llms = two_clients

    async def main() -> None:
        params = SamplingParams(max_tokens=100_000, ignore_eos=True)
        stream = await llms[1].add_request("long", {"prompt_token_ids": [3 + ord("a")]}, params)
        await asyncio.wait_for(stream.__anext__(), 10)
        llms[1].release(stream)  # the caller left: abort
        for _ in range(200):
            if "long" in core.aborted:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert core.aborted == ["long"] and loop.owners == {} and not core.reqs
