"""Quantized linears inside main's decoders: MoE models quantize attention / dense MLPs and refuse quantized
experts; a fused checkpoint tensor (Phi-3's ``qkv_proj``) fills every shard of a quantized layer as its per-shard
tensors would; fp8 KV-cache scales reach the attention layer."""

from __future__ import annotations

import pytest
import torch

from slicelm.layers.quantization import QuantizationError, parse_quant_config
from slicelm.models.llama import LlamaForCausalLM
from slicelm.models.moe import SparseMoeForCausalLM

AWQ_G32 = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
         "hidden_act": "silu"}
QWEN3_MOE = {**SMALL, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "head_dim": 16,
             "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": [0]}
PHI3 = {**SMALL, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}


def test_moe_refuses_quantized_experts_and_quantizes_attention_and_dense_mlps():
    with pytest.raises(QuantizationError, match=r"quantizes the MoE experts.*16 bits"):
        SparseMoeForCausalLM(QWEN3_MOE, quant_config=parse_quant_config({"quantization_config": AWQ_G32}))
    qc = parse_quant_config({"quantization_config": {**AWQ_G32, "modules_to_not_convert": ["experts", "gate"]}})
    model = SparseMoeForCausalLM(QWEN3_MOE, quant_config=qc)
    dense, sparse = model.model.layers
    assert dense.self_attn.qkv_proj.method.quantized and dense.mlp.down_proj.method.quantized
    assert sparse.self_attn.o_proj.method.quantized and not sparse.mlp.gate.method.quantized
    expected = model.expected_weights()
    assert {"model.layers.1.self_attn.q_proj.qweight", "model.layers.0.mlp.up_proj.scales",
            "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.gate.weight"} <= expected
    assert not any(n.endswith("self_attn.q_proj.weight") for n in expected)


def test_fused_checkpoint_tensor_fills_every_shard_like_its_parts():
    qc = parse_quant_config({"quantization_config": AWQ_G32})
    fused, split = LlamaForCausalLM(PHI3, quant_config=qc), LlamaForCausalLM(PHI3, quant_config=qc)
    params = dict(fused.named_parameters())
    qkv = fused.model.layers[0].self_attn.qkv_proj  # outputs q 64, k 32, v 32 -> qweight [64, 128 / 8]
    gen = torch.Generator().manual_seed(0)
    tensors = {"qweight": torch.randint(-2**31, 2**31 - 1, (64, 16), dtype=torch.int32, generator=gen),
               "scales": torch.rand(2, 128, generator=gen).half()}
    for leaf, tensor in tensors.items():
        target = fused.locate_weight(f"model.layers.0.self_attn.qkv_proj.{leaf}", params)
        assert target.covers == {f"model.layers.0.self_attn.{p}_proj.{leaf}" for p in "qkv"}
        target.load(tensor)
        assert torch.equal(getattr(qkv, leaf), tensor)
        split_params = dict(split.named_parameters())
        for part, (start, size) in {"q": (0, 64), "k": (64, 32), "v": (96, 32)}.items():
            cols = slice(start // 8, (start + size) // 8) if leaf == "qweight" else slice(start, start + size)
            split.locate_weight(f"model.layers.0.self_attn.{part}_proj.{leaf}", split_params).load(tensor[:, cols])
        assert torch.equal(getattr(split.model.layers[0].self_attn.qkv_proj, leaf), tensor)


def test_kv_cache_scales_reach_the_attention_layer():
    model = LlamaForCausalLM(PHI3)
    params = dict(model.named_parameters())
    model.locate_weight("model.layers.1.self_attn.k_scale", params).load(torch.tensor(0.5))
    model.locate_weight("model.layers.1.self_attn.v_proj.output_scale", params).load(torch.tensor([2.0]))
    assert model.model.layers[1].self_attn.attn.kv_scales == (0.5, 2.0)
    assert model.model.layers[0].self_attn.attn.unit_kv_scales
    with pytest.raises(ValueError, match="no attention module"):
        model.locate_weight("model.layers.9.self_attn.k_scale", params)
