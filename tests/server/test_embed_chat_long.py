"""Embeddings from chat-style ``messages`` and chunked processing of long inputs (vLLM's
``--pooler-config '{"enable_chunked_processing": true, "max_embed_len": N}'``), real MiniLM server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import Server, start_server, stop_server
from pooling_helpers import MINILM

pytestmark = pytest.mark.slow
TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
MESSAGES = [{"role": "user", "content": "The cat sat on the mat."},
            {"role": "assistant", "content": "A feline was resting on a rug."},
            {"role": "user", "content": "Stars twinkle brightly in the night sky."}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from utils_models import minilm_dir

    minilm_dir()  # skips when the wheel is missing
    s = start_server(tmp_path_factory.mktemp("embchat"), "--chat-template", TEMPLATE, model=MINILM)
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
