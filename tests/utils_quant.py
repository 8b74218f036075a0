"""Small Llama checkpoints written in each quantized format, and transformers on their dequantized weights.

The packers here follow each format's own rules (AutoAWQ's interleaved GEMM packing, AutoGPTQ's sequential
packing with v1 zero - 1 or v2 zeros, FP8 block / per-tensor scales); compressed-tensors checkpoints come
from the compressed-tensors package itself (its quantizer and ``pack-quantized`` / ``float-quantized``
compressors), and their reference weights from its decompressor. None of this uses slicelm's code.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from utils_parity import hf_greedy

VOCAB = 512
SHAPE = {"vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
         "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "tie_word_embeddings": False}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FP8 = torch.float8_e4m3fn


def base_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**SHAPE)
    hf = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return hf


def linear_names(hf: transformers.PreTrainedModel) -> list[str]:
    return [f"model.layers.{i}.{sub}" for i in range(hf.config.num_hidden_layers) for sub in LINEARS]


def quantize_int(w: torch.Tensor, bits: int, group: int, sym: bool, g_idx: torch.Tensor | None = None):
    """(q uint8 [N, K], zeros int [N, G], scales fp16 [N, G], dequantized float32 [N, K]) with min/max scales."""
    n, k = w.shape
    size = k if group == -1 else group
    groups = g_idx.long() if g_idx is not None else torch.arange(k) // size
    ng = k // size
    gmin = torch.stack([w[:, groups == g].amin(1) for g in range(ng)], 1).clamp(max=0)
    gmax = torch.stack([w[:, groups == g].amax(1) for g in range(ng)], 1).clamp(min=0)
    levels = (1 << bits) - 1
    if sym:
        scales = (torch.maximum(gmax, -gmin) / (levels // 2)).clamp(min=1e-6).half()
        zeros = torch.full((n, ng), 1 << (bits - 1), dtype=torch.int32)
    else:
        scales = ((gmax - gmin) / levels).clamp(min=1e-6).half()
        zeros = torch.round(-gmin / scales.float()).clamp(0, levels).to(torch.int32)
    s_e, z_e = scales.float()[:, groups], zeros.float()[:, groups]
    q = torch.round(w / s_e + z_e).clamp(0, levels)
    return q.to(torch.uint8), zeros, scales, (q - z_e) * s_e


def pack_seq(mat: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack ``32/bits`` values per int32 word sequentially along ``dim`` (value j at bits ``bits * j``)."""
    pack = 32 // bits
    m = mat.to(torch.int64).movedim(dim, -1)
    m = m.reshape(*m.shape[:-1], -1, pack)
    words = (m << (torch.arange(pack) * bits)).sum(-1)
    words = ((words + (1 << 31)) % (1 << 32)) - (1 << 31)
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def pack_awq(mat: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit values -> int32 [R, C/8] in AutoAWQ's order (nibble i holds column 8c + AWQ_ORDER[i])."""
    r, c = mat.shape
    m = mat.to(torch.int64).reshape(r, c // 8, 8)[:, :, list(AWQ_ORDER)]
    return pack_seq(m.reshape(r, c), 4, 1)


def write_checkpoint(hf: transformers.PreTrainedModel, path: Path, tensors: dict[str, torch.Tensor],
                     quantization_config: dict | None, config_file: str | None = None) -> None:
    """config.json (+ ``quantization_config`` inline, or in ``config_file``) and model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    config = hf.config.to_dict()
    config["architectures"] = [type(hf).__name__]
    if quantization_config is not None and config_file is None:
        config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))
    if config_file is not None:
        (path / config_file).write_text(json.dumps(quantization_config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def plain_tensors(hf: transformers.PreTrainedModel, skip: list[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in hf.state_dict().items() if not any(k.startswith(s + ".") for s in skip)}


def write_awq(hf, path: Path, group: int = 64, keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM checkpoint (config in quant_config.json, AutoAWQ's key names); returns dequantized weights."""
    names = [n for n in linear_names(hf) if not any(n.endswith(k) for k in keep)]
    tensors, deq = plain_tensors(hf, names), {}
    for name in names:
        w = hf.get_submodule(name).weight.detach()
        q, z, s, deq[name] = quantize_int(w, 4, group, sym=False)
        tensors[f"{name}.qweight"] = pack_awq(q.t())
        tensors[f"{name}.qzeros"] = pack_awq(z.t())
        tensors[f"{name}.scales"] = s.t()
    cfg = {"zero_point": True, "q_group_size": group, "w_bit": 4, "version": "GEMM",
           "modules_to_not_convert": list(keep) or None}
    write_checkpoint(hf, path, tensors, cfg, config_file="quant_config.json")
    return deq


def write_gptq(hf, path: Path, bits: int = 4, group: int = 64, sym: bool = True, desc_act: bool = False,
               v2: bool = False) -> dict[str, torch.Tensor]:
    names = linear_names(hf)
    tensors, deq = plain_tensors(hf, names), {}
    gen = torch.Generator().manual_seed(7)
    orders: dict[str, torch.Tensor] = {}  # linears that read the same input share their act-order (q/k/v, gate/up)
    for name in names:
        w = hf.get_submodule(name).weight.detach()
        k = w.shape[1]
        g_idx = torch.arange(k, dtype=torch.int32) // (k if group == -1 else group)
        if desc_act:  # act-order: groups assigned along a permutation of the input rows
            key = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            order = orders.setdefault(key, torch.argsort(torch.randperm(k, generator=gen)))
            g_idx = g_idx[order]
        q, z, s, deq[name] = quantize_int(w, bits, group, sym, g_idx)
        tensors[f"{name}.qweight"] = pack_seq(q.t(), bits, 0)
        stored = z if v2 else (z - 1) & ((1 << bits) - 1)
        tensors[f"{name}.qzeros"] = pack_seq(stored.t(), bits, 1)
        tensors[f"{name}.scales"] = s.t()
        tensors[f"{name}.g_idx"] = g_idx
    cfg = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
           "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    write_checkpoint(hf, path, tensors, cfg)
    return deq


def write_fp8(hf, path: Path, block: tuple[int, int] | None = (128, 128)) -> dict[str, torch.Tensor]:
    """``quant_method: fp8`` checkpoint: block scales (``weight_scale_inv``) or one per-tensor ``weight_scale``."""
    names = linear_names(hf)
    tensors, deq = plain_tensors(hf, names), {}
    for name in names:
        w = hf.get_submodule(name).weight.detach()
        if block is None:
            s = w.abs().amax() / 448.0
            wq = (w / s).to(FP8)
            tensors[f"{name}.weight_scale"] = s.reshape(())
            deq[name] = wq.float() * s
        else:
            n, k = w.shape
            bn, bk = block
            tiles = w.reshape(n // bn, bn, k // bk, bk)
            s = tiles.abs().amax(dim=(1, 3)) / 448.0
            wq = (tiles / s[:, None, :, None]).to(FP8)
            tensors[f"{name}.weight_scale_inv"] = s
            deq[name] = (wq.float() * s[:, None, :, None]).reshape(n, k)
            wq = wq.reshape(n, k)
        tensors[f"{name}.weight"] = wq
    cfg = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}
    if block is not None:
        cfg["weight_block_size"] = list(block)
    write_checkpoint(hf, path, tensors, cfg)
    return deq


def write_compressed_tensors(hf, path: Path, scheme: str) -> dict[str, torch.Tensor]:
    """A real llm-compressor-style checkpoint made by the compressed-tensors package: ``w4a16`` (int4 group 64,
    asymmetric, pack-quantized), ``w8a16`` (int8 per channel, symmetric, pack-quantized) or ``fp8`` (e4m3 per
    channel weights, dynamic per-token activations, float-quantized)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = copy.deepcopy(hf)
    acts = None
    if scheme == "w4a16":
        wargs, fmt = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64, symmetric=False), \
            "pack-quantized"
    elif scheme == "w8a16":
        wargs, fmt = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True), "pack-quantized"
    else:
        wargs = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
        acts = QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
        fmt = "float-quantized"
    qcfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=wargs,
                                                                           input_activations=acts)},
                              ignore=["lm_head"])
    apply_quantization_config(model, qcfg)
    for name in linear_names(model):
        m = model.get_submodule(name)
        w = m.weight.data
        view = w.reshape(w.shape[0], -1, wargs.group_size) if wargs.group_size else w.reshape(w.shape[0], 1, -1)
        s, zp = calculate_qparams(view.amin(-1), view.amax(-1), wargs)
        m.weight_scale.data.copy_(s.reshape(m.weight_scale.shape))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zp.reshape(m.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    tensors = {k: v for k, v in model.state_dict().items()}
    write_checkpoint(hf, path, tensors, None)
    compressor.update_config(str(path))
    return _ct_dequantized(tensors, model, fmt, compressor)


def _ct_dequantized(tensors, model, fmt, compressor) -> dict[str, torch.Tensor]:
    """The package's own decompression of every linear (the reference weights)."""
    from compressed_tensors.compressors.base import BaseCompressor

    scheme = compressor.quantization_config.config_groups["group_0"]
    impl = BaseCompressor.get_value_from_registry(fmt)
    deq = {}
    for name in linear_names(model):
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        deq[name] = impl.decompress(local, scheme)["weight"].float()
    return deq


def reference_generate(hf: transformers.PreTrainedModel, deq: dict[str, torch.Tensor], prompts: list[list[int]],
                       new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """transformers with the dequantized linears: greedy tokens and their logprobs, per prompt."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, w in deq.items():
            ref.get_submodule(name).weight.copy_(w)
    tokens, logprobs = hf_greedy(ref, prompts, new_tokens)
    return list(zip(tokens, logprobs, strict=True))
