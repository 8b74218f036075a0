"""A real stack on the CPU from one file: SmolLM2 (chat, 2 replicas) + MiniLM (embeddings) + a random BERT
cross-encoder.

`slicelm up --detach`, requests to each model (through the router's one URL), `ps --format json`, a client that
times out on a long non-streamed completion through the router -> the replica aborts it at once,
kill -9 of one replica -> restarted within 10 s while the others keep answering; kill -9 of one replica's engine
core under load -> only the requests in flight on it fail, each with an error, the router stops sending to it within
one health interval and takes it back once the supervisor restarted it; `down` -> no process left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from stack_load import HEALTH_INTERVAL_S, LOAD_TIMEOUT_S, router_events, run_load_and_kill_core, running, stuck_report
from utils_models import minilm_dir, write_random_cross_encoder
from utils_stack import processes_mentioning, ps, slicelm

from slicelm.stack.procs import free_port

pytestmark = pytest.mark.slow


def write_stack(tmp: Path, models: list[dict], router_port: int) -> Path:
    spec = {"servingEngineSpec": {"modelSpec": models},
            "routerSpec": {"routingLogic": "roundrobin", "containerPort": router_port},
            "slicelm": {"runDir": str(tmp / "run"), "startupTimeout": 240}}
    path = tmp / "stack.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("stack")
    minilm_dir()  # skips without the wheel
    rerank_dir = tmp / "rerank-bert"
    write_random_cross_encoder(rerank_dir, "bert")
    path = write_stack(tmp, [
        {"name": "chat", "modelURL": "smollm2-135m-instruct", "replicaCount": 2,
         "vllmConfig": {"maxModelLen": 2048, "maxNumSeqs": 4}},
        {"name": "embed", "modelURL": "all-minilm-l6-v2", "vllmConfig": {"extraArgs": ["--task", "embed"]}},
        {"name": "rerank", "modelURL": str(rerank_dir), "vllmConfig": {"maxModelLen": 128,
                                                                        "extraArgs": ["--task", "score"]}},
    ], free_port("127.0.0.1"))
    run_dir = tmp / "run"
    r = slicelm("up", str(path), "--detach", timeout=400)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    try:
        yield {"run_dir": run_dir, "rerank": str(rerank_dir), "up": r}
    finally:
        slicelm("down", "--run-dir", str(run_dir), timeout=120)


def url_of(st: dict, model: str) -> str:
    """Every model answers through the stack's one URL: the router that `up` started."""
    assert st["router"], "slicelm up started no router"
    return st["router"]["url"]


def chat(url: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60)
    out = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=8, temperature=0,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    return out.choices[0].message.content


def embed(url: str) -> list[float]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60)
    return client.embeddings.create(model="all-minilm-l6-v2", input=["a sentence"]).data[0].embedding


def rerank(url: str, model: str) -> list[dict]:
    r = httpx.post(f"{url}/v1/rerank", json={"model": model, "query": "q", "documents": ["a", "b"]}, timeout=60)
    r.raise_for_status()
    return r.json()["results"]


def test_ps_json_contract(stack) -> None:
    st = ps(stack["run_dir"])
    assert set(st["router"]) >= {"url"} and st["router"]["url"].startswith("http://127.0.0.1:")
    assert [(r["model"], r["replica"]) for r in st["replicas"]] == [("chat", 0), ("chat", 1), ("embed", 0),
                                                                    ("rerank", 0)]
    for r in st["replicas"]:
        assert {"model", "replica", "pid", "url", "state", "restarts", "gpus", "memory_mib", "cores"} <= set(r)
        assert r["state"] == "ready" and r["restarts"] == 0 and r["gpus"] == [] and r["memory_mib"] is None
        assert r["pid"] and r["url"].startswith("http://127.0.0.1:")
    table = slicelm("ps", "--run-dir", str(stack["run_dir"]), timeout=60)
    assert "chat" in table.stdout and "ready" in table.stdout and "cpu" in table.stdout


def test_each_model_answers(stack) -> None:
    st = ps(stack["run_dir"])
    assert "Paris" in chat(url_of(st, "chat"))
    assert len(embed(url_of(st, "embed"))) == 384
    assert len(rerank(url_of(st, "rerank"), stack["rerank"])) == 2


def aborted(url: str) -> float:
    """The replica's ``vllm:request_success_total{finished_reason="abort"}``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line)


def test_client_timeout_through_the_router_aborts_the_replica_request(stack) -> None:
    """Issue 22's report: a 1500-token non-streamed completion through the router with a 2-s client timeout kept
    the replica generating for minutes (~13 tokens/s here). Now the replica aborts it as soon as the client leaves."""
    st = ps(stack["run_dir"])
    replicas = [r["url"] for r in st["replicas"] if r["model"] == "chat"]
    before = sum(aborted(u) for u in replicas)
    client = openai.OpenAI(base_url=f"{st['router']['url']}/v1", api_key="x", timeout=2.0, max_retries=0)
    with pytest.raises(openai.APITimeoutError):
        client.completions.create(model="smollm2-135m-instruct", prompt="Count: 1, 2,", max_tokens=1500,
                                  extra_body={"ignore_eos": True})
    left = time.time()
    while sum(running(u) for u in replicas) > 0 or sum(aborted(u) for u in replicas) == before:
        assert time.time() - left < 15, ("the replica still generates for a client that left (or never got it)",
                                         [running(u) for u in replicas], [aborted(u) for u in replicas], before)
        time.sleep(0.2)
    assert sum(aborted(u) for u in replicas) == before + 1


def test_killed_replica_restarts_while_the_others_answer(stack) -> None:
    run_dir = stack["run_dir"]
    st = ps(run_dir)
    victim = next(r for r in st["replicas"] if r["model"] == "chat")
    failures, answered, stop = [], [0], threading.Event()

    def poll_others() -> None:
        while not stop.is_set():
            try:
                assert len(embed(url_of(st, "embed"))) == 384
                assert len(rerank(url_of(st, "rerank"), stack["rerank"])) == 2
                answered[0] += 1
            except Exception as e:
                failures.append(repr(e))
            time.sleep(0.2)

    poller = threading.Thread(target=poll_others, daemon=True)
    poller.start()
    try:
        killed_at = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        new_pid = None
        while time.time() - killed_at < 10 and not new_pid:
            r = next(r for r in ps(run_dir)["replicas"] if r["model"] == "chat")
            new_pid = r["pid"] if r["pid"] and r["pid"] != victim["pid"] else None
            time.sleep(0.2)
        assert new_pid, "the killed replica was not restarted within 10 s"
        deadline = time.time() + 180
        while next(r for r in ps(run_dir)["replicas"] if r["model"] == "chat")["state"] != "ready":
            assert time.time() < deadline, "the restarted replica did not become ready"
            time.sleep(0.5)
        assert "Paris" in chat(url_of(ps(run_dir), "chat"))
    finally:
        stop.set()
        poller.join(60)
    assert not failures, failures[:3]
    assert answered[0] > 0
    after = ps(run_dir)["replicas"]
    assert [r["restarts"] for r in after] == [1, 0, 0, 0]
    assert all(r["state"] == "ready" for r in after)


def test_killed_engine_core_fails_only_its_requests(stack) -> None:
    run_dir = stack["run_dir"]
    st = ps(run_dir)
    chat0, chat1 = (r for r in st["replicas"] if r["model"] == "chat")
    load = run_load_and_kill_core(st["router"]["url"], chat0["url"], chat1, run_dir)
    routed, gone_at, back_at = router_events(run_dir / "logs" / "router.log", chat1["url"])
    failed = [o for o in load.outcomes if not o.ok]
    assert failed, "no request was in flight on the killed replica"
    hung = [(o, routed.get(o.rid)) for o in load.outcomes if o.end - o.start >= LOAD_TIMEOUT_S]
    if hung:  # the processes dumped their stacks into their logs when the first request got stuck
        print(stuck_report(run_dir, [o.rid for o, _ in hung]))
    assert not hung, (load.killed_at, chat0["url"], chat1["url"], hung)
    first = {o.rid: routed.get(o.rid, [("never routed", 0.0)])[0][0] for o in load.outcomes}
    for o in failed:  # each failure: routed to the killed replica while it was dying, ended with an error body
        assert first[o.rid] == chat1["url"], (o, routed.get(o.rid))
        assert o.start < load.killed_at + HEALTH_INTERVAL_S, o
        assert o.error and '"error"' in o.error, o
    assert all(o.ok for o in load.outcomes if first[o.rid] == chat0["url"])
    assert gone_at - load.killed_at <= HEALTH_INTERVAL_S + 1.0, (load.killed_at, gone_at)
    late = [(rid, t) for rid, hops in routed.items() for url, t in hops
            if url == chat1["url"] and gone_at < t < back_at]
    assert not late, late  # nothing was sent to it between its ejection and its return
    after = next(r for r in ps(run_dir)["replicas"] if r["model"] == "chat" and r["replica"] == 1)
    assert after["restarts"] == 1 and after["state"] == "ready" and after["pid"] != chat1["pid"]
    assert "Paris" in chat(st["router"]["url"])


def test_down_leaves_no_process(stack) -> None:
    run_dir = stack["run_dir"]
    st = json.loads((run_dir / "state.json").read_text())
    pids = [st["supervisor_pid"], *(r["pid"] for r in st["replicas"])]
    r = slicelm("down", "--run-dir", str(run_dir), timeout=120)
    assert r.returncode == 0 and "stopped supervisor" in r.stdout
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and
                Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert processes_mentioning(str(run_dir)) == []
    assert processes_mentioning(stack["rerank"]) == []
    assert ps(run_dir)["replicas"][0]["state"] == "stopped"
    for name in ("chat-0.log", "chat-1.log", "embed-0.log", "rerank-0.log"):
        assert (run_dir / "logs" / name).stat().st_size > 0
