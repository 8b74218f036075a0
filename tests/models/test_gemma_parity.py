"""Random-weight Gemma 2 and Gemma 3 (text) vs transformers (CPU fp32) through the paged cache: sliding
layers with a window shorter than the prompts next to global ones, attention and final logit soft-capping
(Gemma 2), qk-norm and the two rope tables with linear scaling on the global one (Gemma 3), and a
``Gemma3ForConditionalGeneration`` checkpoint's text part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import utils_parity
from safetensors.torch import load_file
from utils_parity import hf_logits, make_tokens, run_schedule

from slicelm.layers.attention import TorchAttentionBackend
from slicelm.models.gemma import GemmaForCausalLM
from slicelm.models.registry import get_model_class

VOCAB = 512
SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 256,
         "rms_norm_eps": 1e-6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
CASES: dict[str, tuple[str, dict]] = {
    "gemma2_softcap": ("Gemma2Config", {"num_hidden_layers": 3, "sliding_window": 7, "query_pre_attn_scalar": 24,
                                        "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}),
    "gemma3_two_ropes": ("Gemma3TextConfig", {
        "num_hidden_layers": 4, "sliding_window": 9, "query_pre_attn_scalar": 48, "sliding_window_pattern": 2,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0}}}),
}


def build(case: str):
    cls_name, overrides = CASES[case]
    hf, config = utils_parity.build_hf(cls_name, {**SMALL, **overrides}, std=0.1)
    model = GemmaForCausalLM(config, attn_backend=TorchAttentionBackend()).eval()
    model.load_weights(hf.state_dict().items())
    return hf, model, config


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_decode_prefix_and_chunks(case: str) -> None:
    hf, model, _ = build(case)
    assert any(w is None for w in model.args.sliding_windows) and any(model.args.sliding_windows)
    seqs = make_tokens([30, 9, 44, 17], seed=1, vocab=VOCAB)
    schedule = [[20, 5, 14, 13], [7, 1, 27, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    run_schedule(model, seqs, hf_logits(hf, seqs), schedule, block_size=16)


def test_gemma3_old_style_config_and_multimodal_checkpoint(tmp_path: Path) -> None:
    """A transformers-4 style text config (rope_theta / rope_local_base_freq / rope_scaling) inside a
    Gemma3ForConditionalGeneration config, with its checkpoint's language_model.* names and vision
    tensors, loads into the same model and gives transformers' logits."""
    hf, _, config = build("gemma3_two_ropes")
    old_style = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    old_style.update(rope_theta=1000.0, rope_local_base_freq=10.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
                     sliding_window_pattern=2)
    mm = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": old_style}
    assert get_model_class(mm["architectures"]) is GemmaForCausalLM
    model = GemmaForCausalLM(mm, attn_backend=TorchAttentionBackend()).eval()
    hf.save_pretrained(tmp_path)
    weights = {f"model.language_model.{k.removeprefix('model.')}": v
               for k, v in load_file(tmp_path / "model.safetensors").items()}
    weights["model.vision_tower.encoder.weight"] = torch.zeros(2)
    model.load_weights(weights.items())
    seqs = make_tokens([21, 13], seed=3, vocab=VOCAB)
    run_schedule(model, seqs, hf_logits(hf, seqs), [[21, 13]], block_size=16)


def test_config_validation() -> None:
    _, _, config = build("gemma2_softcap")
    assert get_model_class(["Gemma2ForCausalLM"]) is GemmaForCausalLM
    with pytest.raises(ValueError, match="hidden_activation"):
        GemmaForCausalLM({**config, "hidden_activation": "relu"})
    with pytest.raises(ValueError, match="bidirectional"):
        GemmaForCausalLM({**config, "use_bidirectional_attention": True})
