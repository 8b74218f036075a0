"""Random-weight Llama / Mistral / Qwen2 / Qwen3 / Phi-3 models vs transformers (CPU fp32), through the paged
cache: one packed prefill of mixed-length prompts, decode steps, prefix-hit / chunked prefill mixed with decode.
Sliding windows (Mistral, Phi-3, Qwen2's upper layers) are shorter than the prompts so they change results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import utils_parity
from safetensors.torch import load_file
from utils_paged import PagedBatch, make_kv_caches
from utils_parity import hf_logits, rel_err, run_schedule

from slicelm.layers.attention import TorchAttentionBackend
from slicelm.models.llama import LlamaForCausalLM
from slicelm.models.registry import get_model_class

VOCAB = 512
SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES: dict[str, tuple[str, dict]] = {
    "llama3_gqa2": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                    "rope_parameters": LLAMA3_ROPE}),
    "llama_mha_tied_bias": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 4,
                                            "num_hidden_layers": 3, "tie_word_embeddings": True,
                                            "attention_bias": True, "mlp_bias": True}),
    "mistral_gqa4": ("MistralConfig", {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2,
                                       "sliding_window": None,
                                       "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen2_tied_gqa2": ("Qwen2Config", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                        "tie_word_embeddings": True}),
    "qwen3_headdim_gqa4": ("Qwen3Config", {"num_attention_heads": 4, "num_key_value_heads": 1,
                                           "head_dim": 32}),
    "qwen3_tied_gqa2": ("Qwen3Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                                        "tie_word_embeddings": True, "num_hidden_layers": 3}),
    "mistral_window": ("MistralConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8}),
    "qwen2_window_upper": ("Qwen2Config", {"num_attention_heads": 4, "num_key_value_heads": 2,
                                           "use_sliding_window": True, "sliding_window": 9, "max_window_layers": 1}),
    "phi3_longrope_window": ("Phi3Config", {
        "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 12, "pad_token_id": 0,
        "eos_token_id": 2, "bos_token_id": 1, "original_max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [2.0, 3.0, 5.0, 9.0]}}),
}
def build_hf(case: str) -> tuple[transformers.PreTrainedModel, dict]:
    cls_name, overrides = CASES[case]
    return utils_parity.build_hf(cls_name, {**SMALL, **overrides})


def build_ours(hf: transformers.PreTrainedModel, config: dict) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config, attn_backend=TorchAttentionBackend()).eval()
    loaded = model.load_weights(hf.state_dict().items())
    assert "model.layers.0.self_attn.q_proj.weight" in loaded
    return model


def make_tokens(lens: list[int], seed: int) -> list[list[int]]:
    return utils_parity.make_tokens(lens, seed, VOCAB)


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_then_decode(case: str) -> None:
    hf, config = build_hf(case)
    model = build_ours(hf, config)
    prompt_lens, num_decode = [7, 1, 23, 12, 40], 4
    seqs = make_tokens([n + num_decode for n in prompt_lens], seed=1)
    refs = hf_logits(hf, seqs)
    schedule = [prompt_lens] + [[1] * len(seqs)] * num_decode
    run_schedule(model, seqs, refs, schedule, block_size=16)


@pytest.mark.parametrize("case", ["llama3_gqa2", "qwen2_tied_gqa2", "qwen3_headdim_gqa4", "mistral_window",
                                  "phi3_longrope_window"])
def test_prefix_hit_and_chunked_prefill(case: str) -> None:
    hf, config = build_hf(case)
    model = build_ours(hf, config)
    seqs = make_tokens([32, 8, 50], seed=2)
    refs = hf_logits(hf, seqs)
    # seq 0: prompt of 30 with its first 13 tokens cached (prefix hit), then the other 17, then decodes;
    # seq 1: whole prompt, then decodes while seq 2 chunks its prompt; all in the same packed steps
    schedule = [[13, 5, 16], [17, 1, 16], [1, 1, 16], [1, 1, 2]]
    run_schedule(model, seqs, refs, schedule, block_size=32)


def test_tied_safetensors_checkpoint_and_registry(tmp_path: Path) -> None:
    """save_pretrained drops the tied lm_head; loading the file must still work (and match)."""
    hf, config = build_hf("qwen2_tied_gqa2")
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in weights
    cls = get_model_class(["Qwen2ForCausalLM"])
    assert cls is LlamaForCausalLM
    config = {k: v for k, v in config.items() if k != "model_type"}
    config["architectures"] = ["Qwen2ForCausalLM"]  # family from architectures alone: qkv bias
    model = cls(config, attn_backend=TorchAttentionBackend()).eval()
    model.load_weights(weights.items())
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    seqs = make_tokens([9, 14], seed=3)
    run_schedule(model, seqs, hf_logits(hf, seqs), [[9, 14]], block_size=16)


def test_bf16_runs_close_to_fp32() -> None:
    hf, config = build_hf("qwen3_headdim_gqa4")
    model = build_ours(hf, config)
    seqs = make_tokens([11, 20], seed=4)
    refs = hf_logits(hf, seqs)
    model = model.to(torch.bfloat16)
    batch = PagedBatch([11, 20], 16)
    caches = make_kv_caches(model.num_layers, batch.num_blocks, 16, model.num_kv_heads, model.head_dim,
                            dtype=torch.bfloat16)
    step = batch.prefill(seqs)
    with torch.no_grad():
        logits = model.compute_logits(model(step.input_ids, step.positions, caches, step.meta))
    assert logits.dtype == torch.bfloat16  # the model's dtype; the sampler upcasts
    assert rel_err(logits, torch.cat(refs)) < 5e-2


def test_load_weights_errors() -> None:
    hf, config = build_hf("llama3_gqa2")
    model = LlamaForCausalLM(config)
    sd = hf.state_dict()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.foo\.weight"):
        model.load_weights([*sd.items(), ("model.layers.0.self_attn.foo.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        model.load_weights([(k, v) for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match=r"missing.*lm_head\.weight"):  # untied: lm_head is required
        model.load_weights([(k, v) for k, v in sd.items() if k != "lm_head.weight"])
    with pytest.raises(ValueError, match="shape"):
        model.load_weights([*sd.items(), ("model.norm.weight", torch.zeros(3))])
    # rotary buffers from old checkpoints are ignored
    model.load_weights([*sd.items(), ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(8))])


def test_config_validation() -> None:
    _, config = build_hf("mistral_gqa4")
    windows = LlamaForCausalLM({**config, "sliding_window": 64}).args.sliding_windows
    assert windows == (64, 64)
    with pytest.raises(ValueError, match="layer_types"):
        LlamaForCausalLM({**config, "sliding_window": 64, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaForCausalLM({**config, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaForCausalLM({**config, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="not a Llama-family"):
        LlamaForCausalLM({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backend_matches_torch_backend(dtype: torch.dtype) -> None:
    """The CUDA default backend (get_attention_backend) against the torch oracle, same model and steps."""
    from slicelm.layers.attention import get_attention_backend

    hf, config = build_hf("qwen3_headdim_gqa4")
    seqs = make_tokens([43, 7, 21, 67], seed=5)
    # mixed prefill / chunked / prefix rows, then decode-only steps (the backend's two code paths)
    schedule = [[20, 3, 17, 30], [20, 1, 1, 34], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    outs = []
    for backend in (TorchAttentionBackend(), get_attention_backend(torch.device("cuda"))):
        model = LlamaForCausalLM(config, attn_backend=backend)
        model.load_weights(hf.state_dict().items())
        model = model.to("cuda", dtype).eval()
        batch = PagedBatch([len(s) for s in seqs], 16, shuffle_seed=0, device="cuda")
        caches = make_kv_caches(model.num_layers, batch.num_blocks, 16, model.num_kv_heads, model.head_dim,
                                dtype=dtype, device="cuda")
        rows = []
        with torch.no_grad():
            for chunks in schedule:
                c0 = list(batch.num_computed)
                step = batch.step([s[c : c + n] for s, c, n in zip(seqs, c0, chunks)])
                rows.append(model.compute_logits(model(step.input_ids, step.positions, caches, step.meta)))
        outs.append(torch.cat(rows))
    assert rel_err(outs[1], outs[0]) < (1e-4 if dtype == torch.float32 else 3e-2)
