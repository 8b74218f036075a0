"""``/v1/score``, ``/score``, ``/v1/rerank``, ``/rerank``, ``/v2/rerank`` on the real server: MiniLM (cosine of
embeddings, vs sentence-transformers) and a random XLM-R cross-encoder (vs transformers)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from conftest import Server, stop_server
from pooling_helpers import MINILM, error_of, start_model_server, write_random_xlmr_cross_encoder
from tokenizers import Tokenizer
from utils_models import minilm_dir, write_random_cross_encoder

pytestmark = pytest.mark.slow

QUERY = "What is the capital of France?"
DOCS = [
    "Bananas are rich in potassium and grow in tropical climates.",
    "The Great Barrier Reef is the largest coral reef system in the world.",
    "Python is a popular programming language for data science.",
    "Mount Everest is the highest mountain above sea level.",
    "The stock market fell sharply on Tuesday after the announcement.",
    "Paris is the capital and most populous city of France.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The Pacific Ocean is the largest and deepest ocean on Earth.",
    "Basketball was invented by James Naismith in 1891.",
    "Honey never spoils if it is stored properly.",
]
RELEVANT = 5


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, object]]:
    path = tmp_path_factory.mktemp("xlmr-ce")
    hf = write_random_xlmr_cross_encoder(path)
    s = start_model_server(path.parent, str(path), "--served-model-name", "xlmr-ce")
    yield s, hf
    stop_server(s)


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def scores(server: Server, text_1, text_2, path: str = "/v1/score", **kw) -> list[float]:
    r = post(server, path, {"text_1": text_1, "text_2": text_2, **kw})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["id"].startswith("score-")
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "score" for d in body["data"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    return [d["score"] for d in body["data"]]


# ------------------------------------------------------------------------------------------- embedding model
def test_minilm_score_is_cosine(minilm: Server, st_model) -> None:
    a, b = "A man is eating food.", "A man is eating a piece of bread."
    (s,) = scores(minilm, a, b, model=MINILM)
    assert abs(s - 0.755) < 0.002, s
    ea, eb = st_model.encode([a, b], convert_to_tensor=True)
    assert abs(s - torch.nn.functional.cosine_similarity(ea, eb, dim=0).item()) < 1e-4
    assert scores(minilm, a, b, path="/score") == pytest.approx([s], abs=1e-6)
    assert scores(minilm, [a], [b]) == pytest.approx([s], abs=1e-6)


def test_minilm_score_shapes(minilm: Server, st_model) -> None:
    left = ["A man is eating food.", "A woman plays the violin.", "The sky is blue."]
    right = ["Someone eats a meal.", "Music is being played.", "It is raining."]
    el, er = st_model.encode(left), st_model.encode(right)
    one_to_n = scores(minilm, left[0], right)
    assert np.allclose(one_to_n, er @ el[0], atol=1e-4)
    n_to_n = scores(minilm, left, right)
    assert np.allclose(n_to_n, (el * er).sum(-1), atol=1e-4)
    err = error_of(post(minilm, "/v1/score", {"text_1": left[:2], "text_2": right}))
    assert "text_1" in err["message"]


def test_minilm_rerank_finds_relevant_document(minilm: Server) -> None:
    r = post(minilm, "/v1/rerank", {"model": MINILM, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert len(results) == len(DOCS) and results[0]["index"] == RELEVANT
    rel = [x["relevance_score"] for x in results]
    assert rel == sorted(rel, reverse=True) and sorted(x["index"] for x in results) == list(range(len(DOCS)))
    assert all(x["document"] == {"text": DOCS[x["index"]]} for x in results)  # Jina / vLLM: documents by default
    assert body["usage"]["total_tokens"] > 0 and body["model"] == MINILM
    # scores equal /v1/score 1:N
    assert np.allclose([x["relevance_score"] for x in sorted(results, key=lambda x: x["index"])],
                       scores(minilm, QUERY, DOCS), atol=1e-6)


def test_rerank_top_n_and_return_documents_as_cohere(minilm: Server) -> None:
    top3 = post(minilm, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 3, "return_documents": False})
    assert top3.status_code == 200, top3.text
    res = top3.json()["results"]
    assert len(res) == 3 and res[0]["index"] == RELEVANT and all("document" not in x for x in res)
    v2 = post(minilm, "/v2/rerank", {"model": MINILM, "query": QUERY, "documents": DOCS, "top_n": 2})
    assert v2.status_code == 200, v2.text
    body = v2.json()
    assert [x["index"] for x in body["results"]] == [x["index"] for x in res[:2]]
    assert all("document" not in x for x in body["results"])  # Cohere: no documents unless asked
    assert body["meta"]["api_version"]["version"] == "2"
    objs = [{"text": d} for d in DOCS]
    with_docs = post(minilm, "/v2/rerank", {"query": QUERY, "documents": objs, "top_n": 50,
                                            "return_documents": True})
    res = with_docs.json()["results"]
    assert len(res) == len(DOCS)  # top_n above the number of documents: all of them
    assert res[0] == {"index": RELEVANT, "relevance_score": res[0]["relevance_score"],
                      "document": {"text": DOCS[RELEVANT]}}


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": [1, 2]}, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": ["a", {"text": 3}]}, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": -5}, "max_tokens_per_doc"),
    ("/v2/rerank", {"query": QUERY, "documents": DOCS, "top_n": -2}, "top_n"),
    ("/v1/rerank", {"query": 5, "documents": DOCS}, "query"),
    ("/v1/rerank", {"documents": DOCS}, "query"),
    ("/v1/rerank", {"query": "hello " * 300, "documents": DOCS}, "query"),  # over-long, no truncation
    ("/v1/rerank", {"query": "q", "documents": ["a", "hello " * 300]}, "documents[1]"),
    ("/v1/score", {"text_1": [], "text_2": "x"}, "text_1"),
    ("/v1/score", {"text_1": "x", "text_2": ["a", None]}, "text_2"),
    ("/score", {"text_1": "x"}, "text_2"),
])
def test_bad_input_is_400_and_server_keeps_serving(minilm: Server, path: str, body: dict, needle: str) -> None:
    err = error_of(post(minilm, path, body))
    assert needle in (err["param"] or "") or needle in err["message"], err
    assert scores(minilm, "still", "alive")[0] > 0


def test_rerank_truncation(minilm: Server) -> None:
    long_query = "what is the capital of France? " * 60
    r = post(minilm, "/v1/rerank", {"query": long_query, "documents": DOCS, "truncate_prompt_tokens": 32})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["index"] == RELEVANT


# ------------------------------------------------------------------------------------------- cross-encoder
def _hf_pair_scores(hf, tok: Tokenizer, left: list[str], right: list[str]) -> torch.Tensor:
    encs = [tok.encode(a, b) for a, b in zip(left, right)]
    n = max(len(e.ids) for e in encs)
    ids = torch.full((len(encs), n), hf.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    with torch.no_grad():
        return torch.sigmoid(hf(input_ids=ids, attention_mask=mask).logits.float())[:, 0]


def test_cross_encoder_scores_match_transformers(cross_encoder) -> None:
    server, hf = cross_encoder
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    left = ["what is the capital of France?", "hi", "how do plants make food?", "a"]
    right = ["Paris is the capital and largest city of France.", "hello there, how are you doing today?",
             "Photosynthesis turns light into sugar.", "b c d e f g h i j k l m n o p q r s"]
    got = torch.tensor(scores(server, left, right, model="xlmr-ce"))
    ref = _hf_pair_scores(hf, tok, left, right)
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-4, (got, ref)
    one_to_n = torch.tensor(scores(server, left[0], right))
    ref1 = _hf_pair_scores(hf, tok, [left[0]] * len(right), right)
    assert ((one_to_n - ref1).norm() / ref1.norm()).item() <= 1e-4
    raw = torch.tensor(scores(server, left, right, use_activation=False))
    assert torch.allclose(torch.sigmoid(raw), got, atol=1e-5)
    r = post(server, "/v1/rerank", {"query": left[0], "documents": right, "top_n": 2})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    order = torch.argsort(ref1, descending=True)[:2].tolist()
    assert [x["index"] for x in res] == order
    assert np.allclose([x["relevance_score"] for x in res], ref1[order].numpy(), rtol=1e-4)


def test_cross_encoder_serves_no_embeddings(cross_encoder) -> None:
    server, _ = cross_encoder
    err = error_of(post(server, "/v1/embeddings", {"model": "xlmr-ce", "input": "hi"}))
    assert err["code"] == "wrong_task" and "score" in err["message"]
    err = error_of(post(server, "/v1/completions", {"model": "xlmr-ce", "prompt": "hi"}))
    assert err["code"] == "wrong_task"
    assert scores(server, "still", "alive")[0] > 0


def test_vllm_texts_for_long_inputs_and_enum_fields(minilm: Server) -> None:
    """Clients match on vLLM's texts: over-long pooling / score inputs, truncation beyond the model, pydantic's
    ``literal_error`` for the enum fields."""
    for path, body in (("/v1/rerank", {"query": "hello " * 600, "documents": DOCS}),
                       ("/score", {"text_1": "q", "text_2": ["hello " * 600]}),
                       ("/v1/embeddings", {"input": "hello " * 600})):
        err = error_of(post(minilm, path, body))
        assert "Please reduce the length of the input prompt." in err["message"], err
    err = error_of(post(minilm, "/v1/embeddings", {"input": "hi", "truncate_prompt_tokens": 513}))
    assert err["message"] == ("truncate_prompt_tokens value is greater than max_model_len. Please request a smaller "
                              "truncation size."), err
    for field in ("encoding_format", "embed_dtype", "endianness"):
        err = error_of(post(minilm, "/v1/embeddings", {"input": "hi", field: "nope"}))
        assert "literal_error" in err["message"] and err["param"] == field, err


def test_pooling_tasks_as_vllm(minilm: Server, cross_encoder) -> None:
    """``/pooling``: the model's own task by default, vLLM's 400s for the others; a cross-encoder answers
    ``task: classify`` with its class probabilities."""
    ok = post(minilm, "/pooling", {"input": ["a", "b"], "task": "embed"})
    assert ok.status_code == 200 and len(ok.json()["data"][1]["data"]) == 384, ok.text
    usage = ok.json()["usage"]
    assert usage["completion_tokens"] == 0 and usage["total_tokens"] == usage["prompt_tokens"] > 0
    for task, start in (("plugin", "No IOProcessor plugin installed."), ("token_classify", "Unsupported task: "
                                                                                       "'token_classify'")):
        r = post(minilm, "/pooling", {"input": "a", "task": task})
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError", r.text
        assert r.json()["error"]["message"].startswith(start), r.text
    server, hf = cross_encoder
    r = post(server, "/pooling", {"input": "hi", "task": "embed"})
    assert r.json()["error"]["message"].startswith("Unsupported task: 'embed'"), r.text
    r = post(server, "/pooling", {"input": "hi", "task": "score"})
    assert r.json()["error"]["message"].startswith("Try switching the model's pooling_task via"), r.text
    r = post(server, "/pooling", {"model": "xlmr-ce", "input": ["hi there", "b"], "task": "classify"})
    assert r.status_code == 200, r.text
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    with torch.no_grad():
        ref = torch.sigmoid(hf(input_ids=torch.tensor([tok.encode("hi there").ids])).logits.float())[0]
    assert torch.allclose(torch.tensor(r.json()["data"][0]["data"]), ref, atol=1e-5)


def test_generative_model_serves_no_pooling(server: Server) -> None:
    """The shared SmolLM2 server (conftest): every pooling endpoint is a 400 saying why."""
    for path, body in (("/v1/embeddings", {"input": "hi"}), ("/v1/score", {"text_1": "a", "text_2": "b"}),
                       ("/v1/rerank", {"query": "a", "documents": ["b"]}),
                       ("/v2/rerank", {"query": "a", "documents": ["b"]})):
        err = error_of(post(server, path, body))
        assert err["code"] == "wrong_task" and "generate" in err["message"], err



def test_classify_and_invocations_on_a_cross_encoder(cross_encoder) -> None:
    """vLLM's ``/classify`` (probabilities, top label, class count; the id ``classify-…``), and ``/invocations``
    sending ``input`` there on a cross-encoder with the same keys and values."""
    server, hf = cross_encoder
    r = post(server, "/classify", {"model": "xlmr-ce", "input": "hi there"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("classify-") and body["object"] == "list"
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    with torch.no_grad():
        ref = torch.sigmoid(hf(input_ids=torch.tensor([tok.encode("hi there").ids])).logits.float())[0]
    (first,) = body["data"]
    assert set(first) == {"index", "label", "probs", "num_classes"} and first["num_classes"] == 1
    assert torch.allclose(torch.tensor(first["probs"]), ref, atol=1e-5) and first["label"] == "LABEL_0"
    batch = post(server, "/classify", {"model": "xlmr-ce", "input": ["hi there", "b"]}).json()
    via = post(server, "/invocations", {"model": "xlmr-ce", "input": ["hi there", "b"]}).json()
    assert via.keys() == batch.keys() and [d["probs"] for d in via["data"]] == [d["probs"] for d in batch["data"]]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = tmp_path_factory.mktemp("bert-cls")
    write_random_cross_encoder(path, "bert", seed=3, num_labels=2)
    s = start_model_server(path.parent, str(path), "--served-model-name", "cls")
    yield s
    stop_server(s)


def test_classifier_has_no_score_routes_and_pads_as_vllm(classifier: Server) -> None:
    """vLLM registers score / rerank only for one-label cross-encoders: on a two-label classifier they do not
    exist (``{"detail": "Not Found"}``); ``/classify`` pads with ``padding: max_length`` as embeddings do."""
    for path, body in (("/score", {"queries": "ping", "documents": "pong"}),
                       ("/v1/rerank", {"query": "ping", "documents": ["pong"]})):
        r = post(classifier, path, {"model": "cls", **body})
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}, (path, r.text)
    plain = post(classifier, "/classify", {"model": "cls", "input": "hi"}).json()
    padded = post(classifier, "/classify", {"model": "cls", "input": "hi", "padding": "max_length"}).json()
    assert plain["data"][0]["num_classes"] == 2 and plain["usage"]["prompt_tokens"] == 3
    assert padded["usage"]["prompt_tokens"] == 128
