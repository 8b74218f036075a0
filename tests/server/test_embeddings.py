"""``/v1/embeddings`` on the real server with the real all-MiniLM-L6-v2, against sentence-transformers."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import openai
import pytest
from conftest import Server
from pooling_helpers import MINILM, error_of
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer
from utils_models import minilm_dir

pytestmark = pytest.mark.slow

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome",
    "slicelm packs variable-length sequences without padding, " * 8,
    "Hi",
    "Ünïcödé — 東京は日本の首都です。",
]


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def post(server: Server, body: dict, path: str = "/v1/embeddings") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def embed(server: Server, inp, **kw) -> np.ndarray:
    r = post(server, {"model": MINILM, "input": inp, **kw})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_openai_client_matches_sentence_transformers(minilm: Server, st_model) -> None:
    client = openai.OpenAI(base_url=f"{minilm.url}/v1", api_key="unused", max_retries=0, timeout=120)
    ref = st_model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False)
    for kw in ({"encoding_format": "float"}, {}):  # without a format the client asks for base64 and decodes it
        r = client.embeddings.create(model=MINILM, input=TEXTS, **kw)
        assert r.object == "list" and r.model == MINILM and [d.index for d in r.data] == list(range(len(TEXTS)))
        assert all(d.object == "embedding" for d in r.data)
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert got.shape == (len(TEXTS), 384)
        cos = cosines(got, ref)
        assert (cos >= 0.9999).all(), cos
        assert np.allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)  # the model's Normalize module
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(st_model.tokenizer(t)["input_ids"])
                                                                for t in TEXTS)
    one = client.embeddings.create(model=MINILM, input=TEXTS[0])
    assert len(one.data) == 1 and cosines(np.array(one.data[0].embedding), ref[0]) >= 0.9999


def test_base64_is_little_endian_float32(minilm: Server) -> None:
    floats = embed(minilm, TEXTS[:2])
    r = post(minilm, {"model": MINILM, "input": TEXTS[:2], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    for i, d in enumerate(r.json()["data"]):
        vec = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        # Two requests may be batched differently (last-bit float differences); a wrong byte order or
        # width would give garbage, not values within 1e-6.
        assert vec.shape == np.asarray(floats[i]).shape and np.allclose(vec, floats[i], rtol=0, atol=1e-6)


def test_token_id_inputs_equal_text(minilm: Server, tokenizer: Tokenizer) -> None:
    texts = embed(minilm, TEXTS[:3])
    ids = [tokenizer.encode(t).ids for t in TEXTS[:3]]
    assert np.allclose(embed(minilm, ids), texts, atol=1e-5)
    assert np.allclose(embed(minilm, ids[1])[0], texts[1], atol=1e-5)  # one list of ids = one input
    r = post(minilm, {"model": MINILM, "input": ids[1]})
    assert r.json()["usage"]["prompt_tokens"] == len(ids[1])


def test_64_concurrent_requests_are_batched_and_equal_sequential(minilm: Server) -> None:
    texts = [f"request {i}: {'a fairly long sentence about the ocean ' * (1 + i % 5)}" for i in range(64)]

    def multi_steps() -> float:
        text = httpx.get(minilm.url + "/metrics", timeout=10).text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "slicelm:pooling_multi_request_steps_total":
                    return s.value
        return 0.0

    sequential = [embed(minilm, t)[0] for t in texts]
    before = multi_steps()

    async def concurrent() -> list[np.ndarray]:
        async with httpx.AsyncClient(base_url=minilm.url, timeout=120) as client:
            async def one(t: str) -> np.ndarray:
                r = await client.post("/v1/embeddings", json={"model": MINILM, "input": t})
                assert r.status_code == 200, r.text
                return np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
            return await asyncio.gather(*(one(t) for t in texts))

    together = asyncio.run(concurrent())
    after = multi_steps()
    assert after > before, (before, after)  # the engine ran several requests in one step
    for i, (a, b) in enumerate(zip(sequential, together)):
        assert np.abs(a - b).max() <= 1e-5, (i, np.abs(a - b).max())
    text = httpx.get(minilm.url + "/metrics", timeout=10).text
    assert "slicelm:pooling_max_batch_requests" in text


def test_truncate_prompt_tokens(minilm: Server, tokenizer: Tokenizer) -> None:
    long = "the quick brown fox jumps over the lazy dog " * 60  # ~540 tokens > 256
    err = error_of(post(minilm, {"model": MINILM, "input": long}))
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    assert err["message"].endswith("Please reduce the length of the input prompt.")  # vLLM's text
    r = post(minilm, {"model": MINILM, "input": long, "truncate_prompt_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 16
    ids = tokenizer.encode(long).ids
    expected = embed(minilm, [*ids[:15], ids[-1]])  # [CLS] first 14 words… [SEP]: right truncation
    assert np.allclose(np.array(r.json()["data"][0]["embedding"]), expected[0], atol=1e-5)
    full = post(minilm, {"model": MINILM, "input": long, "truncate_prompt_tokens": -1})
    assert full.status_code == 200 and full.json()["usage"]["prompt_tokens"] == 256
    err = error_of(post(minilm, {"model": MINILM, "input": long, "truncate_prompt_tokens": 100000}))
    assert err["param"] == "truncate_prompt_tokens"
    ids_long = post(minilm, {"model": MINILM, "input": ids, "truncate_prompt_tokens": 20})
    assert ids_long.status_code == 200 and ids_long.json()["usage"]["prompt_tokens"] == 20


@pytest.mark.parametrize("body,param", [
    ({"input": []}, "input"),
    ({"input": [[]]}, "input[0]"),
    ({"input": ""}, "input[0]"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": ["ok", 3]}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "hi", "dimensions": 0}, "dimensions"),
    ({"input": "hi", "dimensions": 128}, "dimensions"),  # MiniLM is not a Matryoshka model
    ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"input": "hi", "encoding_format": "hex"}, "encoding_format"),
    ({"input": [10**9]}, "input"),
    ({}, "input"),
])
def test_bad_input_is_400_and_server_keeps_serving(minilm: Server, body: dict, param: str) -> None:
    err = error_of(post(minilm, {"model": MINILM, **body}))
    assert err["param"] == param or param in err["message"], err
    assert embed(minilm, "still alive").shape == (1, 384)


def test_unknown_model_is_404(minilm: Server) -> None:
    err = error_of(post(minilm, {"model": "nope", "input": "hi"}), 404)
    assert err["code"] == "model_not_found"
    r = post(minilm, {"input": "hi"})  # model may be left out, as in vLLM
    assert r.status_code == 200 and r.json()["model"] == MINILM


def test_embedding_model_rejects_generation(minilm: Server) -> None:
    err = error_of(post(minilm, {"model": MINILM, "messages": [{"role": "user", "content": "hi"}]},
                        "/v1/chat/completions"))
    assert err["code"] == "wrong_task" and "embed" in err["message"]


def test_messages_without_chat_template_is_400(minilm: Server) -> None:
    """MiniLM has no chat template: chat-style input is a 400 with vLLM's type and message (and our hint)."""
    err = error_of(post(minilm, {"model": MINILM, "messages": [{"role": "user", "content": "hi"}]}))
    assert err["type"] == "BadRequestError" and err["param"] is None
    assert err["message"].startswith("As of transformers v4.44, default chat template is no longer allowed, so you "
                                     "must provide a chat template if the tokenizer does not define one.")
    assert "--chat-template" in err["message"]
    with openai.OpenAI(base_url=minilm.url + "/v1", api_key="x", max_retries=0) as client, \
            pytest.raises(openai.BadRequestError, match="default chat template is no longer allowed"):
        client.post("/embeddings", body={"model": MINILM, "messages": [{"role": "user", "content": "hi"}]},
                    cast_to=object)


def test_api_paths_in_openapi(minilm: Server) -> None:
    paths = httpx.get(minilm.url + "/openapi.json", timeout=10).json()["paths"]
    for p in ("/v1/embeddings", "/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank"):
        assert p in paths



def test_large_pooling_requests_are_split_across_steps(minilm: Server) -> None:
    """1,281 inputs / 1,500 documents exceed what one step (and the waiting queue) admits: they still succeed."""
    r = httpx.post(minilm.url + "/v1/embeddings", json={"input": [f"text {i}" for i in range(1281)]}, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["data"]) == 1281
    r = httpx.post(minilm.url + "/rerank", json={"query": "q", "documents": [f"doc {i}" for i in range(1500)],
                                                 "top_n": 0}, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["results"]) == 1500  # top_n 0: all, as vLLM
    assert httpx.get(minilm.url + "/health").status_code == 200


def test_vllm_pooling_surface(minilm: Server) -> None:
    import base64

    import numpy as np

    u = minilm.url
    ref = httpx.post(u + "/score", json={"text_1": "a cat", "text_2": ["a dog", "a car"]}).json()["data"]
    for left, right in (("queries", "documents"), ("queries", "items"), ("data_1", "data_2")):
        got = httpx.post(u + "/v1/score", json={left: "a cat", right: ["a dog", "a car"]}).json()["data"]
        assert [d["score"] for d in got] == pytest.approx([d["score"] for d in ref]), left
    doc = "The capital of France is Paris. " * 5
    full = httpx.post(u + "/rerank", json={"query": "capital", "documents": [doc]}).json()
    cut = httpx.post(u + "/rerank", json={"query": "capital", "documents": [doc], "max_tokens_per_doc": 5}).json()
    assert cut["usage"]["prompt_tokens"] < full["usage"]["prompt_tokens"]
    whole = httpx.post(u + "/rerank", json={"query": "capital", "documents": [doc], "max_tokens_per_doc": 0})
    assert whole.json()["usage"] == full["usage"]  # vLLM: 0 = no truncation
    bad = httpx.post(u + "/rerank", json={"query": "q", "documents": [doc], "max_tokens_per_doc": -5})
    assert bad.status_code == 400 and "max_tokens_per_doc must be a non-negative integer" in bad.text
    floats = httpx.post(u + "/v1/embeddings", json={"input": ["hello"]}).json()["data"][0]["embedding"]
    b64 = httpx.post(u + "/v1/embeddings", json={"input": ["hello"], "encoding_format": "base64",
                                                  "embed_dtype": "float16", "endianness": "big"}).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype=">f2")
    assert vec.astype(np.float32) == pytest.approx(floats, abs=2e-3)
    r = httpx.post(u + "/v1/embeddings", json={"input": ["hello", "world"], "encoding_format": "bytes"})
    meta = json.loads(r.headers["metadata"])
    assert r.headers["content-type"] == "application/octet-stream" and len(r.content) == 2 * 4 * len(floats)
    assert [d["index"] for d in meta["data"]] == [0, 1]
    assert np.frombuffer(r.content[:4 * len(floats)], dtype="<f4") == pytest.approx(floats, abs=1e-5)
    r = httpx.post(u + "/v1/embeddings", json={"input": ["hello"], "encoding_format": "bytes_only"})
    assert "metadata" not in r.headers and len(r.content) == 4 * len(floats)
    pooled = httpx.post(u + "/pooling", json={"input": ["hello"]}).json()
    assert pooled["data"][0]["object"] == "pooling" and pooled["data"][0]["data"] == pytest.approx(floats)
    cohere = httpx.post(u + "/v2/embed", json={"texts": ["hello"], "embedding_types": ["float"]}).json()
    assert cohere["embeddings"]["float"][0] == pytest.approx(floats)
    inv = httpx.post(u + "/invocations", json={"input": "hello"}).json()
    assert inv["data"][0]["embedding"] == pytest.approx(floats)


def test_vllm_token_id_texts_padding_and_truncation_side(minilm: Server, tokenizer: Tokenizer) -> None:
    """vLLM's texts for ids outside the vocabulary; ``padding`` (``max_length`` fills the prompt with the pad
    token up to the model's length, counted in usage); ``truncation_side`` with ``truncate_prompt_tokens``."""
    for ids, bad in (([5, -1, 7], -1), ([5, 10**9], 10**9)):
        assert error_of(post(minilm, {"input": ids}))["message"] == f"Token id {bad} is out of vocabulary"
    usage = [post(minilm, {"input": ["Hello"], **extra}).json()["usage"]["prompt_tokens"]
             for extra in ({}, {"padding": "max_length"}, {"padding": "do_not_pad"})]
    assert usage == [3, 256, 3]
    ids = tokenizer.encode("Hello").ids
    padded = embed(minilm, [ids + [tokenizer.token_to_id("[PAD]")] * (256 - len(ids))])
    assert np.allclose(embed(minilm, "Hello", padding="max_length"), padded, atol=1e-5)
    assert error_of(post(minilm, {"input": "Hello", "padding": "longest"}))["param"] == "padding"
    long = "the quick brown fox jumps over the lazy dog " * 4
    ids = tokenizer.encode(long).ids
    for side, kept in (("left", [ids[0], *ids[-9:]]), ("right", [*ids[:9], ids[-1]])):
        got = embed(minilm, long, truncate_prompt_tokens=10, truncation_side=side)
        assert np.allclose(got, embed(minilm, [kept]), atol=1e-5), side
    assert np.allclose(embed(minilm, [ids], truncate_prompt_tokens=5, truncation_side="right"),
                       embed(minilm, [ids[:5]]), atol=1e-5)


def test_bytes_metadata_as_vllm(minilm: Server) -> None:
    """``encoding_format: bytes``: the ``metadata`` header's items name their dtype and byte order (vLLM's
    ``MetadataItem``), and usage has vLLM's two counts."""
    floats = embed(minilm, ["hello", "world"])
    r = post(minilm, {"input": ["hello", "world"], "encoding_format": "bytes", "embed_dtype": "float16",
                      "endianness": "big"})
    meta = json.loads(r.headers["metadata"])
    assert set(meta) == {"id", "created", "model", "data", "usage"} and meta["usage"] == {"prompt_tokens": 6,
                                                                                         "total_tokens": 6}
    for item, ref in zip(meta["data"], floats, strict=True):
        assert item["embed_dtype"] == "float16" and item["endianness"] == "big" and item["shape"] == [384]
        vec = np.frombuffer(r.content[item["start"]:item["end"]], dtype=">f2").astype(np.float32)
        assert vec == pytest.approx(ref, abs=2e-3)
