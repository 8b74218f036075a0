"""Fast in-process tests of AsyncLLM and the app against the fake engine (no model weights)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fake_engine import EchoEngineClient, make_fake_engine
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from slicelm.engine.async_llm import EngineDeadError, EngineOverloadedError
from slicelm.engine.protocol import EngineClient
from slicelm.entrypoints.server.app import build_app
from slicelm.entrypoints.server.metrics import METRIC_NAMES
from slicelm.entrypoints.server.state import ServerState
from slicelm.sampling_params import SamplingParams, SamplingParamsError


def make_client(api_key: str | None = None, max_waiting: int | None = None, **kw: object) -> TestClient:
    engine, _ = make_fake_engine(max_waiting_requests=max_waiting, **kw)
    state = ServerState.from_engine(engine, api_keys=[api_key] if api_key else None, log_stats=False)
    return TestClient(build_app(state, max_body_bytes=1 << 16))


def chat_body(**kw: object) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **kw}


# ------------------------------------------------------------------------------------------ AsyncLLM
def test_async_llm_generate_abort_and_validation() -> None:
    async def main() -> None:
        llm, fake = make_fake_engine()
        assert isinstance(llm, EngineClient)
        outs = [o async for o in llm.generate([5, 6, 7], SamplingParams(max_tokens=4), "r1")]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
        ids = [t for o in outs for t in o.outputs[0].token_ids]  # deltas: each output has only the new tokens
        assert len(ids) == 4 and "".join(o.outputs[0].text for o in outs) == llm.tokenizer.decode(ids)
        with pytest.raises(SamplingParamsError):
            SamplingParams(temperature=-1)
        with pytest.raises(ValueError, match="prompt"):
            await llm.add_request("r2", [], SamplingParams())
        # a caller that stops early aborts the request in the engine
        gen = llm.generate([5], SamplingParams(max_tokens=1000), "r3")
        await gen.__anext__()
        await gen.aclose()
        for _ in range(100):
            if "r3" in fake.aborted:
                break
            await asyncio.sleep(0.01)
        assert "r3" in fake.aborted and not fake.reqs
        assert llm.num_active_requests == 0
        # server-initiated abort: the stream ends with finish_reason "abort"
        stream = await llm.add_request("r4", [5], SamplingParams(max_tokens=1000))
        llm.abort("r4")
        last = [o async for o in stream][-1]
        llm.release(stream)
        assert last.finished and last.outputs[0].finish_reason == "abort"
        llm.shutdown()

    asyncio.run(main())


def test_async_llm_overload_and_death() -> None:
    async def main() -> None:
        llm, fake = make_fake_engine(max_waiting_requests=2, max_num_seqs=1, step_delay=0.05)
        streams = []
        with pytest.raises(EngineOverloadedError):
            for i in range(10):
                streams.append(await llm.add_request(f"o{i}", [5], SamplingParams(max_tokens=50)))
        assert 2 <= len(streams) <= 4
        for s in streams:
            llm.release(s)
        await asyncio.sleep(0.3)
        assert llm.num_waiting_estimate == 0
        fake.fail_on_step = True
        s = await llm.add_request("dead", [5], SamplingParams(max_tokens=5))
        with pytest.raises(EngineDeadError):
            async for _ in s:
                pass
        assert llm.errored and not llm.is_running
        with pytest.raises(EngineDeadError):
            await llm.add_request("after", [5], SamplingParams())
        llm.shutdown()

    asyncio.run(main())


def test_output_processing_bug_fails_requests_instead_of_hanging() -> None:
    async def main() -> None:
        llm, _ = make_fake_engine()

        def broken(*_args, **_kwargs):
            raise RuntimeError("planted bug")

        llm.output_processor.process = broken
        s = await llm.add_request("bug", [5], SamplingParams(max_tokens=5))
        with pytest.raises(EngineDeadError, match="planted bug"):
            async with asyncio.timeout(10):
                async for _ in s:
                    pass
        llm.shutdown()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ app
def test_an_add_the_dead_core_refuses_leaves_nothing_registered() -> None:
    """The core can die between the liveness check and the send: the request that raised must not stay counted as
    active (a SIGTERM drain would wait its whole grace period for it) nor hold a stream or output state."""
    async def main() -> None:
        llm, _ = make_fake_engine()

        def dead(_reqs) -> None:
            raise EngineDeadError("the engine core process died (exit code -9)")

        llm.client.add_requests = dead
        with pytest.raises(EngineDeadError):
            await llm.add_request("lost", [5], SamplingParams(max_tokens=5))
        assert llm.num_active_requests == 0 and llm.num_waiting_estimate == 0
        assert "lost" not in llm._states and "lost" not in llm.output_processor.parents
        assert await llm.wait_idle(0.1)
        llm.shutdown()

    asyncio.run(main())


def test_chat_and_completion_shapes() -> None:
    with make_client() as c:
        r = c.post("/v1/chat/completions", json=chat_body(n=2, logprobs=True, top_logprobs=1))
        assert r.status_code == 200, r.text
        body = r.json()
        assert [ch["index"] for ch in body["choices"]] == [0, 1]
        assert body["usage"]["completion_tokens"] == 6
        assert len(body["choices"][0]["logprobs"]["content"]) == 3
        r = c.post("/v1/completions", json={"model": "fake-model", "prompt": [[100, 101], [70, 71]], "max_tokens": 2,
                                            "echo": True})
        assert r.status_code == 200, r.text
        texts = [ch["text"] for ch in r.json()["choices"]]
        assert texts[0].startswith("ab") and texts[1].startswith("CD") and len(texts) == 2
        with c.stream("POST", "/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 3,
                                                         "stream": True,
                                                         "stream_options": {"include_usage": True}}) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 3
        assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]) == "yza"


def test_auth_and_open_paths() -> None:
    with make_client(api_key="sekret") as c:
        assert c.post("/v1/chat/completions", json=chat_body()).status_code == 401
        r = c.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = c.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_overload_returns_503_with_retry_after() -> None:
    with make_client(max_waiting=1, max_num_seqs=1, step_delay=0.05) as c:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(12) as pool:
            rs = list(pool.map(lambda _: c.post("/v1/chat/completions", json=chat_body(max_tokens=10)),
                               range(12)))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
        rejected = next(r for r in rs if r.status_code == 503)
        assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["code"] == "overloaded"


def test_health_503_when_engine_loop_died_and_draining() -> None:
    with make_client() as c:
        assert c.get("/health").status_code == 200
        state: ServerState = c.app.state.server  # type: ignore[attr-defined]
        state.draining = True
        assert c.get("/health").status_code == 503
        r = c.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        state.draining = False
        state.engine.client.core.fail_on_step = True  # type: ignore[attr-defined]
        r = c.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 503
        deadline = time.time() + 2
        while c.get("/health").status_code == 200 and time.time() < deadline:
            time.sleep(0.02)
        assert c.get("/health").status_code == 503


def test_metrics_names_and_wrong_task() -> None:
    with make_client() as c:
        c.post("/v1/chat/completions", json=chat_body())
        text = c.get("/metrics").text
        names = {f.name for f in text_string_to_metric_families(text)}
        assert set(METRIC_NAMES) <= names, set(METRIC_NAMES) - names
        state: ServerState = c.app.state.server  # type: ignore[attr-defined]
        state.task = "embed"
        r = c.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 400 and "does not support" in r.json()["error"]["message"]


def test_body_limit_and_content_type() -> None:
    with make_client() as c:
        big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 70000}]))
        r = c.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = c.post("/v1/chat/completions", content=json.dumps(chat_body()), headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        assert c.get("/health").status_code == 200


def test_stop_strings_end_the_sequence_in_the_core() -> None:
    async def main() -> None:
        llm, fake = make_fake_engine(step_delay=0.001)
        params = SamplingParams(max_tokens=20, stop=["de"])
        outs = [o async for o in llm.generate([3 + ord("a")], params, "s1")]
        assert "".join(o.outputs[0].text for o in outs) == "bc"
        assert outs[-1].outputs[0].finish_reason == "stop" and outs[-1].outputs[0].stop_reason == "de"
        for _ in range(100):
            if "s1" in fake.aborted:
                break
            await asyncio.sleep(0.01)
        assert "s1" in fake.aborted and not fake.reqs
        llm.shutdown()

    asyncio.run(main())


def test_server_runs_on_any_engine_client() -> None:
    engine = EchoEngineClient()
    assert isinstance(engine, EngineClient)
    state = ServerState.from_engine(engine, log_stats=False)  # type: ignore[arg-type]
    with TestClient(build_app(state)) as c:
        r = c.post("/v1/completions", json={"model": "echo-model", "prompt": [100, 101, 102], "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "abc"
