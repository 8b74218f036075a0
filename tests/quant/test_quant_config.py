"""Quantization config parsing, start-up errors naming what is unsupported, the Linear / linear-method
contract, and the fp8 KV cache on the CPU path."""

from __future__ import annotations

import pytest
import torch
from utils_quant import base_model, write_awq, write_checkpoint, write_gptq

from slicelm import LLM, SamplingParams
from slicelm.layers.linear import Linear
from slicelm.layers.quantization import QuantizationError, parse_quant_config
from slicelm.layers.quantization.base import cast_model

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


@pytest.mark.parametrize("raw,cli,message", [
    ({**AWQ, "bits": 3}, None, "AWQ bits=3"),
    ({**AWQ, "version": "gemv"}, None, "AWQ version 'gemv'"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, None, "3-bit weights"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 100}, None, "group_size 100"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, None, "lm_head=true"),
    ({"quant_method": "bitsandbytes"}, None, "quant_method 'bitsandbytes'"),
    (AWQ, "gptq", "--quantization gptq does not match"),
    (None, "awq", "the checkpoint is not quantized"),
    (None, "bitsandbytes", "--quantization 'bitsandbytes' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, None, "fp8 fmt 'e5m2'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "int", "strategy": "channel"}, "input_activations": {"num_bits": 8, "type": "int"}}}},
     None, "W8A8"),
])
def test_unsupported_quantization_is_an_error_naming_it(raw, cli, message):
    config = {"quantization_config": raw} if raw else {}
    with pytest.raises(QuantizationError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_quant_config(config, cli)


def test_vllm_names_and_files():
    assert parse_quant_config({"quantization_config": AWQ}, "awq_marlin").method == "awq"
    gptq = {"bits": 4, "group_size": 128, "desc_act": True, "sym": True}  # AutoGPTQ's quantize_config.json
    qc = parse_quant_config({"quantization_config": gptq}, "gptq_marlin")
    assert qc.method == "gptq" and qc.scheme.act_order
    assert parse_quant_config({}, "fp8").scheme.online
    assert parse_quant_config({}) is None
    qc = parse_quant_config({"quantization_config": {**AWQ, "modules_to_not_convert": ["down_proj"]}})
    assert qc.skips("model.layers.3.mlp.down_proj") and not qc.skips("model.layers.3.mlp.gate_up_proj")
    ct = parse_quant_config({"quantization_config": {"quant_method": "compressed-tensors", "ignore": ["re:.*k_proj"],
                             "config_groups": {"g": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
                                 "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}}})
    assert ct.skips("model.layers.0.self_attn.qkv_proj") and not ct.skips("model.layers.0.self_attn.o_proj")


def test_linear_without_quantization_is_nn_linear_and_quantized_tensors_keep_their_dtype():
    ref = torch.nn.Linear(64, 40)
    ours = Linear(64, 40)
    assert set(ours.state_dict()) == {"weight", "bias"}
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(ours(x), ref(x))
    qc = parse_quant_config({"quantization_config": AWQ})
    q = Linear(256, 64, bias=False, quant_config=qc, prefix="layer")
    assert {n: p.dtype for n, p in q.named_parameters()} == {
        "qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16}
    model = cast_model(torch.nn.ModuleList([q, Linear(8, 8)]), torch.bfloat16, torch.device("cpu"))
    assert model[0].scales.dtype == torch.float16 and model[1].weight.dtype == torch.bfloat16


def test_mismatched_and_missing_tensors_name_the_tensor(tmp_path):
    hf = base_model(seed=1)
    write_gptq(hf, tmp_path / "gptq", bits=4, group=64)
    with pytest.raises(QuantizationError, match="does not match"):
        LLM(str(tmp_path / "gptq"), skip_tokenizer_init=True, quantization="awq")
    write_awq(hf, tmp_path / "awq", group=64)
    (tmp_path / "awq" / "quant_config.json").write_text('{"w_bit": 4, "q_group_size": 128, "zero_point": true}')
    with pytest.raises(ValueError, match=r"qweight.*shape|scales.*shape|qzeros.*shape"):
        LLM(str(tmp_path / "awq"), skip_tokenizer_init=True)


def test_fp8_kv_cache_holds_more_blocks_and_honours_checkpoint_scales(tmp_path):
    """CPU engine, float32 model: in the same bytes an e4m3 cache holds 4x the float32 blocks (2x bf16's); the
    checkpoint's k/v scales are loaded; the first greedy tokens match the float32 cache on this model."""
    hf = base_model(seed=2)
    tensors = dict(hf.state_dict())
    for i in range(hf.config.num_hidden_layers):  # llm-compressor's names for the KV-cache scales
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.5)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.25)
    write_checkpoint(hf, tmp_path, tensors, None)
    prompts = [{"prompt_token_ids": list(range(3, 40))}, {"prompt_token_ids": list(range(100, 109))}]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_dtype=kv, cpu_kv_cache_bytes=1 << 22,
                  max_model_len=128)
        runs[kv] = ([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)],
                    llm.engine.cache_config.num_blocks, llm.engine.worker.model.model.layers[0].self_attn.attn)
    assert [t[:4] for t in runs["fp8"][0]] == [t[:4] for t in runs["auto"][0]]
    assert runs["fp8"][2].kv_scales == (0.5, 0.25)
    block_bytes = 2 * 2 * 16 * 2 * 64  # K and V x layers x block size x KV heads x head_dim, per byte of dtype
    assert runs["auto"][1] == (1 << 22) // (block_bytes * 4) and runs["fp8"][1] == (1 << 22) // block_bytes


def test_torch_attention_with_fp8_cache_stores_scaled_values():
    from slicelm.layers.attention import TorchAttentionBackend
    from slicelm.layers.attention_metadata import AttentionMetadata

    g = torch.Generator().manual_seed(0)
    t, h, kh, d = 20, 4, 2, 32
    q, k, v = (torch.randn(t, n, d, generator=g) for n in (h, kh, kh))
    meta = AttentionMetadata(1, t, torch.tensor([0, t], dtype=torch.int32), torch.tensor([t], dtype=torch.int32),
                             torch.arange(t), torch.tensor([[0, 1]], dtype=torch.int32), t, t, [0, t], [t])
    outs = {}
    for dtype, scales in ((torch.float32, (1.0, 1.0)), (torch.float8_e4m3fn, (0.5, 2.0))):
        cache = torch.zeros(2, 2, 16, kh, d, dtype=dtype)
        outs[dtype] = TorchAttentionBackend().forward(q, k, v, cache, meta, d**-0.5, kv_scales=scales)
        if dtype != torch.float32:
            flat = cache[0].view(-1, kh, d)[:t].float()
            torch.testing.assert_close(flat, (k / 0.5).to(dtype).float())
    err = (outs[torch.float8_e4m3fn] - outs[torch.float32]).norm() / outs[torch.float32].norm()
    assert err < 0.05, err
