"""GGUF loading: SmolLM2 config/weights against transformers' own GGUF loader, name mapping, q/k unpermute."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from slicelm.loader.gguf_loader import gguf_to_hf_name, unpermute_qk
from slicelm.loader.model_files import CorruptModelFileError, resolve_model

transformers = pytest.importorskip("transformers")

SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def source():
    return resolve_model(SMOLLM)


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp(n_head: int) -> None:
    w = torch.randn(n_head * 8, 5)
    permuted = _llama_cpp_permute(w, n_head)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, n_head), w)


def test_name_mapping() -> None:
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None


def test_config_matches_transformers(source) -> None:
    assert source.kind == "gguf" and source.path.suffix == ".gguf"
    ref = transformers.AutoConfig.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    cfg = source.config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "head_dim",
                "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps)
    assert cfg["rope_theta"] == pytest.approx(ref.rope_parameters["rope_theta"])
    assert cfg["torch_dtype"] == "bfloat16"
    assert source.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@pytest.mark.slow
def test_weights_match_transformers(source, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.modeling_utils as modeling_utils

    # transformers only needs accelerate for device maps; a plain CPU load works without it.
    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32
    )
    ref = model.state_dict()
    seen = set()
    for name, tensor in source.iter_weights():
        assert tensor.dtype == torch.float32
        assert tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name
        seen.add(name)
    # tied: lm_head.weight is the embedding and is not in the file
    assert set(ref) - seen == {"lm_head.weight"}
    assert len(seen) == 272


def test_garbage_gguf(tmp_path: Path) -> None:
    file = tmp_path / "garbage.gguf"
    file.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(CorruptModelFileError, match=r"garbage\.gguf"):
        resolve_model(str(file))


def test_truncated_gguf(tmp_path: Path, source) -> None:
    file = tmp_path / "truncated.gguf"
    with open(source.path, "rb") as f:
        file.write_bytes(f.read(3_000_000))
    with pytest.raises(CorruptModelFileError, match=r"truncated\.gguf"):
        resolve_model(str(file))
