"""Cohere's ``/v2/embed`` as vLLM serves it, on a real MiniLM whose sentence-transformers config names prompts."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Server, stop_server
from pooling_helpers import error_of, start_model_server
from tokenizers import Tokenizer
from utils_models import minilm_dir

from slicelm.loader.tokenizer import load_tokenizer_from

pytestmark = pytest.mark.slow
PROMPTS = {"query": "query: ", "passage": "passage: "}
LONG = " ".join(f"alpha{i}" for i in range(150)) + " " + " ".join(f"omega{i}" for i in range(150))


def minilm_with_prompts(path: Path) -> Path:
    shutil.copytree(minilm_dir(), path, dirs_exist_ok=True)
    cfg = json.loads((path / "config_sentence_transformers.json").read_text())
    (path / "config_sentence_transformers.json").write_text(json.dumps({**cfg, "prompts": PROMPTS}))
    return path


@pytest.fixture(scope="module")
def prompted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = minilm_with_prompts(tmp_path_factory.mktemp("minilm-prompts") / "model")
    server = start_model_server(path.parent, str(path), "--served-model-name", "m")
    yield server
    stop_server(server)


def cohere(server: Server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v2/embed", json={"model": "m", **body}, timeout=120)


def embeddings(server: Server, inp, **kw) -> np.ndarray:
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "m", "input": inp, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


def test_tokenizer_reads_sentence_transformers_prompts(tmp_path: Path) -> None:
    assert load_tokenizer_from(str(minilm_with_prompts(tmp_path / "m"))).prompts == PROMPTS
    assert load_tokenizer_from(str(minilm_dir())).prompts == {}


def test_input_type_is_the_models_prompt(prompted: Server) -> None:
    r = cohere(prompted, texts=["a cat", "a dog"], input_type="query", embedding_types=["float"])
    assert r.status_code == 200, r.text
    got = np.array(r.json()["embeddings"]["float"])
    assert got == pytest.approx(embeddings(prompted, ["query: a cat", "query: a dog"]), abs=1e-5)
    plain = np.array(cohere(prompted, texts=["a cat"]).json()["embeddings"]["float"])
    assert plain == pytest.approx(embeddings(prompted, ["a cat"]), abs=1e-5)
    err = error_of(cohere(prompted, texts=["a cat"], input_type="nonexistent_type"))
    assert err["message"] == "Unsupported input_type 'nonexistent_type'. Supported values: passage, query"


def test_embedding_types_and_response(prompted: Server) -> None:
    body = cohere(prompted, texts=["hello world"], embedding_types=["float", "binary", "ubinary", "base64"]).json()
    floats = np.array(body["embeddings"]["float"][0])
    bits = np.packbits(floats >= 0)
    assert body["embeddings"]["ubinary"][0] == bits.tolist()
    assert body["embeddings"]["binary"][0] == (bits.astype(np.int16) - 128).tolist()
    decoded = np.frombuffer(base64.b64decode(body["embeddings"]["base64"][0]), dtype="<f4")
    assert decoded == pytest.approx(floats, abs=1e-6)
    assert body["texts"] == ["hello world"] and body["response_type"] == "embeddings_by_type"
    assert body["meta"]["billed_units"] == {"input_tokens": 4, "image_tokens": 0}
    assert body["meta"]["api_version"] == {"version": "2"}
    assert "Exactly one of texts" in error_of(cohere(prompted, texts=[]))["message"]
    assert error_of(cohere(prompted, images=["data:image/png;base64,AAAA"]))["param"] == "images"


def test_truncate_start_end_none_and_max_tokens(prompted: Server) -> None:
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    ids = tok.encode(LONG).ids
    assert len(ids) > 256  # MiniLM's max_seq_length
    end = np.array(cohere(prompted, texts=[LONG], truncate="END").json()["embeddings"]["float"])
    start = np.array(cohere(prompted, texts=[LONG], truncate="START").json()["embeddings"]["float"])
    assert end == pytest.approx(embeddings(prompted, [ids[:255] + ids[-1:]]), abs=1e-5)  # [CLS] ... [SEP]
    assert start == pytest.approx(embeddings(prompted, [ids[:1] + ids[-255:]]), abs=1e-5)
    assert float((start * end).sum()) < 0.99
    assert "Please reduce the length" in error_of(cohere(prompted, texts=[LONG], truncate="NONE"))["message"]
    short = cohere(prompted, texts=["one two three four five six"], truncate="END", max_tokens=4).json()
    assert short["meta"]["billed_units"]["input_tokens"] == 4
    err = error_of(cohere(prompted, texts=["one two three four five six"], truncate="NONE", max_tokens=4))
    assert err["message"].startswith("Input of 8 tokens exceeds max_tokens=4 with truncate=NONE.")
