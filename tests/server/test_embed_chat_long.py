"""Embeddings from chat-style ``messages`` and chunked processing of long inputs (vLLM's
``--pooler-config '{"enable_chunked_processing": true, "max_embed_len": N}'``), real MiniLM server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from conftest import Server, start_server, stop_server
from pooling_helpers import MINILM

pytestmark = pytest.mark.slow
CTX, MAX_EMBED = 64, 200
TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
MESSAGES = [{"role": "user", "content": "The cat sat on the mat."},
            {"role": "assistant", "content": "A feline was resting on a rug."},
            {"role": "user", "content": "Stars twinkle brightly in the night sky."}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from utils_models import minilm_dir

    minilm_dir()  # skips when the wheel is missing
    s = start_server(tmp_path_factory.mktemp("embchat"), "--chat-template", TEMPLATE, "--max-model-len", str(CTX),
                     "--pooler-config", json.dumps({"enable_chunked_processing": True, "max_embed_len": MAX_EMBED}),
                     model=MINILM)
    yield s
    stop_server(s)


def test_messages_embed_as_the_rendered_template(srv: Server) -> None:
    chat = httpx.post(f"{srv.url}/v1/embeddings", json={"model": MINILM, "messages": MESSAGES}, timeout=60)
    assert chat.status_code == 200, chat.text
    text = "".join(f"{m['role']}: {m['content']}\n" for m in MESSAGES)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    plain = client.embeddings.create(model=MINILM, input=text, extra_body={"add_special_tokens": False})
    body = chat.json()
    assert body["usage"]["prompt_tokens"] == plain.usage.prompt_tokens
    assert body["data"][0]["embedding"] == pytest.approx(plain.data[0].embedding, abs=1e-5)
    with_special = client.embeddings.create(model=MINILM, input=text)
    assert with_special.usage.prompt_tokens == plain.usage.prompt_tokens + 2  # [CLS] ... [SEP]
    inv = httpx.post(f"{srv.url}/invocations", json={"model": MINILM, "messages": MESSAGES}, timeout=60)
    assert inv.status_code == 200 and inv.json()["data"][0]["embedding"] == pytest.approx(
        body["data"][0]["embedding"], abs=1e-5)


def test_messages_bad_requests(srv: Server) -> None:
    for payload in ({"input": "x", "messages": MESSAGES}, {}, {"messages": []},
                    {"messages": MESSAGES, "chat_template": "{{ 'x' }}"}):
        r = httpx.post(f"{srv.url}/v1/embeddings", json={"model": MINILM, **payload}, timeout=60)
        assert r.status_code == 400, (payload, r.text)
        assert r.json()["error"]["type"] == "BadRequestError"


def _embed(srv: Server, **body) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/embeddings", json={"model": MINILM, **body}, timeout=120)


def test_long_input_is_embedded_in_chunks(srv: Server) -> None:
    """A 150-token input: chunks of 64, 64 and 22 tokens, averaged by token count, then normalized."""
    ids = [101] + [1000 + (7 * i) % 20000 for i in range(148)] + [102]
    whole = _embed(srv, input=ids)
    assert whole.status_code == 200, whole.text
    assert whole.json()["usage"]["prompt_tokens"] == len(ids)
    parts = [ids[i : i + CTX] for i in range(0, len(ids), CTX)]
    raw = _embed(srv, input=parts, normalize=False).json()["data"]
    vecs = torch.tensor([d["embedding"] for d in raw])
    weights = torch.tensor([len(p) for p in parts], dtype=torch.float32).unsqueeze(1)
    expected = torch.nn.functional.normalize((vecs * weights).sum(0) / weights.sum(), dim=0)
    got = torch.tensor(whole.json()["data"][0]["embedding"])
    assert torch.allclose(got, expected, atol=1e-5)
    unnormalized = torch.tensor(_embed(srv, input=ids, normalize=False).json()["data"][0]["embedding"])
    assert torch.allclose(unnormalized, (vecs * weights).sum(0) / weights.sum(), atol=1e-5)
    # a short input in the same request is embedded as usual
    mixed = _embed(srv, input=[ids, ids[:10]]).json()["data"]
    alone = _embed(srv, input=ids[:10]).json()["data"][0]["embedding"]
    assert mixed[1]["embedding"] == pytest.approx(alone, abs=1e-5)
    assert mixed[0]["embedding"] == pytest.approx(got.tolist(), abs=1e-5)


def test_input_over_max_embed_len_is_400(srv: Server) -> None:
    r = _embed(srv, input=[5000] * (MAX_EMBED + 1))
    assert r.status_code == 400 and "max_embed_len" in r.json()["error"]["message"]
    text = "word " * 400
    r = _embed(srv, input=text)
    assert r.status_code == 400 and "max_embed_len" in r.json()["error"]["message"]
