"""``slicelm serve org/name`` offline, from a cache that huggingface_hub laid out from a local Hub: the official
``openai`` client gets answers, the served name is the id typed, a revision pin picks its snapshot, nothing reaches
the Hub, and a model missing from the cache ends the CLI with exit code 2 and the message."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Server, start_server, stop_server
from hub_models import MINILM_ID, SMOLLM_ID, add_minilm, add_smollm_gguf, hub_env, slicelm
from hub_server import FakeHub

pytestmark = pytest.mark.slow
SMOLLM = f"{SMOLLM_ID}:Q4_1"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeHub, Path]]:
    home = tmp_path_factory.mktemp("hf-home")
    with FakeHub() as hub:
        add_minilm(hub)
        add_smollm_gguf(hub)
        env = hub_env(hub, home, offline=False)
        for args in ([SMOLLM], [MINILM_ID, "--revision", "v1"]):
            r = slicelm("download", *args, env=env)
            assert r.returncode == 0, r.stderr
        yield hub, home


@pytest.fixture(scope="module")
def served(cache: tuple[FakeHub, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    hub, home = cache
    before = len(hub.requests)
    tmp = tmp_path_factory.mktemp("serve-hub")
    with pytest.MonkeyPatch.context() as mp:  # start_server passes os.environ (and HF_HUB_OFFLINE=1) on
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_ENDPOINT", hub.url)
        mp.delenv("HF_HUB_CACHE", raising=False)
        servers = {"chat": start_server(tmp, "--max-model-len", "1024", "--max-num-seqs", "4", model=SMOLLM,
                                             timeout=600)}
        try:
            servers["embed"] = start_server(tmp, "--revision", "v1", model=MINILM_ID, timeout=600)
            yield servers
        finally:
            for s in servers.values():
                stop_server(s)
    assert len(hub.requests) == before, f"offline servers reached the Hub: {hub.requests[before:]}"


def test_chat_by_hub_id_through_openai(served: dict[str, Server]) -> None:
    client = openai.OpenAI(base_url=f"{served['chat'].url}/v1", api_key="x")
    assert [m.id for m in client.models.list().data] == [SMOLLM]  # the served name is the id typed
    out = client.chat.completions.create(model=SMOLLM, temperature=0, max_tokens=16,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in out.choices[0].message.content


def test_embeddings_at_a_pinned_revision(served: dict[str, Server]) -> None:
    client = openai.OpenAI(base_url=f"{served['embed'].url}/v1", api_key="x")
    out = client.embeddings.create(model=MINILM_ID, input=["a sentence to embed"])
    assert len(out.data[0].embedding) == 384
    info = httpx.get(f"{served['embed'].url}/v1/models").json()["data"][0]
    assert info["id"] == MINILM_ID and info["max_model_len"] == 128  # v1's sentence_bert_config, not main's 256


def test_serve_missing_model_exits_2(cache: tuple[FakeHub, Path]) -> None:
    _, home = cache
    r = slicelm("serve", "org/not-cached", "--device", "cpu", env={**hub_env(None, home, offline=True),
                                                                   "PATH": os.environ.get("PATH", "")}, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "slicelm serve: error: model 'org/not-cached' is not in the cache" in r.stderr
    assert "slicelm download org/not-cached" in r.stderr
