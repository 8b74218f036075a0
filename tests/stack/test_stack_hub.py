"""Stacks whose ``modelURL``s are Hub ids: ``slicelm up`` fetches each model once before any replica starts (and
pins replicas to the fetched commit), ``slicelm plan`` never touches the Hub, and the seed's own values file
(BAAI/bge-m3 + BAAI/bge-reranker-v2-m3; tiny random XLM-R under those ids, MiniLM's tokenizer) runs unchanged on
the CPU with its models found by name in the cache, answering through the router."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from hub_models import ROOT, add_seed_models, hub_env, slicelm
from hub_server import FakeHub

pytestmark = pytest.mark.slow
SEED = ROOT.parent / "shared" / "docs" / "stack-examples" / "seed-hami-rag.yaml"
EMBED, RERANK = "BAAI/bge-m3", "BAAI/bge-reranker-v2-m3"
PREFETCH = textwrap.dedent("""
    import json, sys
    from slicelm.stack.prefetch import prefetch
    from slicelm.stack.spec import load_stack
    print(json.dumps(prefetch(load_stack(sys.argv[1]))))
""")


@pytest.fixture(scope="module")
def seed_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeHub, dict[str, str]]]:
    if not SEED.is_file():
        pytest.fail(f"{SEED} is missing (../shared sits beside the checkout, in CI too)")
    with FakeHub() as hub:
        yield hub, add_seed_models(hub, tmp_path_factory.mktemp("seed-models"))


@pytest.fixture(scope="module")
def home(seed_hub: tuple[FakeHub, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`slicelm up`'s own fetch, online, into an empty HF_HOME: each file once, replicas pinned to the commits."""
    hub, commits = seed_hub
    home = tmp_path_factory.mktemp("hf-home")
    env = hub_env(hub, home, offline=False)
    r = slicelm("plan", str(SEED), "--format", "json", env=env, timeout=120)
    assert r.returncode == 0 and not hub.requests, "slicelm plan must not touch the Hub"
    for _ in range(2):  # the second finds everything in the cache
        r = subprocess.run([sys.executable, "-c", PREFETCH, str(SEED)], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"bge-m3-embed": ["--revision", commits[EMBED]],
                                        "bge-reranker-v2-m3": ["--revision", commits[RERANK]]}
    for repo in (EMBED, RERANK):
        got = hub.downloads(repo)
        assert sorted(got) == sorted(set(got)) and "model.safetensors" in got and "tokenizer.json" in got
        assert not {"pytorch_model.bin", "colbert_linear.pt"} & set(got)
    return home


def test_up_fetches_once_and_plan_never(home: Path) -> None:
    assert (home / "hub" / "models--BAAI--bge-m3" / "refs" / "main").is_file()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def seed_stack(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not _port_free(8000):
        pytest.skip("the seed file's router port 8000 is in use on this machine")
    run_dir = tmp_path_factory.mktemp("seed-run")
    env = hub_env(None, home, offline=True)
    r = slicelm("up", str(SEED), "--detach", "--run-dir", str(run_dir), env=env, timeout=900)
    try:
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        yield "http://127.0.0.1:8000"
    finally:
        slicelm("down", "--run-dir", str(run_dir), env=env, timeout=120)


def test_seed_values_file_runs_unchanged_through_the_router(seed_stack: str) -> None:
    ids = {m["id"] for m in httpx.get(f"{seed_stack}/v1/models", timeout=30).json()["data"]}
    assert ids == {EMBED, RERANK}
    client = openai.OpenAI(base_url=f"{seed_stack}/v1", api_key="x")
    emb = client.embeddings.create(model=EMBED, input=["what is a GPU slice?"]).data[0].embedding
    assert len(emb) == 32 and abs(sum(v * v for v in emb) - 1) < 1e-3  # CLS pooling + Normalize, from the repo
    r = httpx.post(f"{seed_stack}/v1/rerank", timeout=60, json={
        "model": RERANK, "query": "GPU sharing", "documents": ["HAMi slices GPUs", "bread recipes", "MPS"]})
    assert r.status_code == 200, r.text
    assert sorted(x["index"] for x in r.json()["results"]) == [0, 1, 2]
