"""The official ``openai`` client against the real server with SmolLM2 (chat, completions, streaming)."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import MODEL, Server

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_greedy_chat_answers_paris(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.model == MODEL and r.id.startswith("chatcmpl-")


def test_streamed_chat_equals_non_streamed_with_seed(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Write a short poem about the sea."}],
              temperature=0.9, seed=1234, max_tokens=24)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]


def test_streamed_completion_equals_non_streamed(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=0.7, seed=7, max_tokens=20)
    full = client.completions.create(**kw)
    text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert text == full.choices[0].text and len(text) > 0


def test_n3_and_seed_reproducible(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=QUESTION, n=3, temperature=1.0, seed=5, max_tokens=12)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1
    streamed = client.chat.completions.create(**kw, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in a.choices]


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content)  # + eos, as vLLM
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert t.token == t.top_logprobs[0].token  # greedy picks the best token
        assert bytes(t.bytes).decode() == t.token


def test_completion_logprobs_echo_and_multi_prompt(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4,
                                  logprobs=2, echo=True)
    choice = r.choices[0]
    assert choice.text.startswith("The capital of France is")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.token_logprobs[-1] <= 0
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(len(d) == 2 for d in lp.top_logprobs[r.usage.prompt_tokens:])
    multi = client.completions.create(model=MODEL, prompt=[[19556], [504, 3575]], temperature=0, max_tokens=3,
                                      n=2)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]


def test_models_version_tokenize(server: Server, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/version").json()["version"]
    tok = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    detok = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json()
    assert detok["prompt"] == "Hello world"
    chat_tok = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}).json()
    assert chat_tok["count"] > tok["count"]


def test_stop_and_vllm_extras(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30, stop=["Paris"],
                                       extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
                                                   "min_tokens": 2})
    assert "Paris" not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
