"""Tensor-parallel sharding in one process: the model of every rank is built and loaded (from a real
safetensors file, lazily), and the ranks' parameters put back together must be the checkpoint's tensors;
each rank reads only its part of a sharded tensor. (TP=2 runs end to end in tests/engine/test_tensor_parallel.py.)
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

from slicelm.distributed import parallel_state
from slicelm.distributed.parallel_state import TPGroup
from slicelm.engine.worker import init_dummy_weights
from slicelm.layers.parallel_linear import QKVParallelLinear, RowParallelLinear
from slicelm.layers.quantization.parsers import parse_quant_config
from slicelm.layers.vocab_parallel import VocabParallelEmbedding
from slicelm.loader.lazy_tensor import LazyTensor
from slicelm.loader.model_files import resolve_model
from slicelm.models.llama import LlamaForCausalLM
from slicelm.models.registry import get_model_class

# checkpoint projection -> (fused column-parallel layer, output shard)
COLUMN_SHARDS = {"self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
                 "self_attn.v_proj": ("self_attn.qkv_proj", 2), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
                 "mlp.up_proj": ("mlp.gate_up_proj", 1)}
CONFIG = {"vocab_size": 101, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
          "num_attention_heads": 4, "max_position_embeddings": 64, "attention_bias": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Llama (qkv and o biases, untied, a vocabulary of 101: padded to 102 on two ranks) and Qwen3
    (one KV head: replicated on both ranks, tied embeddings, qk-norm)."""
    out = {}
    for name, cls, extra in (("llama", "LlamaConfig", {"num_key_value_heads": 2}),
                             ("qwen3", "Qwen3Config", {"num_key_value_heads": 1, "head_dim": 8,
                                                       "tie_word_embeddings": True})):
        torch.manual_seed(0)
        hf = getattr(transformers, cls.replace("Config", "ForCausalLM"))(getattr(transformers, cls)(**CONFIG, **extra))
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        out[name] = path
    return out


def build_rank(path, rank: int, world: int, monkeypatch, reads: list[int] | None = None) -> LlamaForCausalLM:
    monkeypatch.setattr(parallel_state, "_GROUP", TPGroup(rank, world))
    source = resolve_model(str(path))
    model = get_model_class(source.config["architectures"])(source.config)
    with monkeypatch.context() as m:
        if reads is not None:
            load = LazyTensor.load
            m.setattr(LazyTensor, "load", lambda self: reads.append(self.shape.numel()) or load(self))
        model.load_weights(source.iter_weights(lazy=True))
    return model


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_the_ranks_shards_put_together_are_the_checkpoint(checkpoint, name, monkeypatch):
    full = load_file(str(checkpoint[name] / "model.safetensors"))
    reads: list[int] = []
    ranks = [build_rank(checkpoint[name], r, 2, monkeypatch, reads if r == 0 else None) for r in range(2)]
    cfg = ranks[0].args
    p = [dict(m.named_parameters()) for m in ranks]
    attn = ranks[0].model.layers[0].self_attn
    assert (ranks[0].num_heads, attn.num_kv_heads) == (cfg.num_heads // 2, max(1, cfg.num_kv_heads // 2))
    for key, (fused, shard) in COLUMN_SHARDS.items():
        for leaf in ("weight", "bias") if "self_attn" in key and name == "llama" else ("weight",):
            parts = []
            for r, m in enumerate(ranks):
                layer = m.get_submodule(f"model.layers.0.{fused}")
                offset = sum(layer.output_sizes[:shard])
                parts.append(p[r][f"model.layers.0.{fused}.{leaf}"][offset: offset + layer.output_sizes[shard]])
            want = full[f"model.layers.0.{key}.{leaf}"]
            if cfg.num_kv_heads == 1 and shard > 0 and "self_attn" in key:
                assert torch.equal(parts[0], want) and torch.equal(parts[1], want)  # replicated KV head
            else:
                assert torch.equal(torch.cat(parts), want), (key, leaf)
    for key in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):  # row-parallel: input columns
        cat = torch.cat([p[r][f"model.layers.0.{key}"] for r in range(2)], dim=1)
        assert torch.equal(cat, full[f"model.layers.0.{key}"])
    if name == "llama":  # the row-parallel bias is whole on every rank (added once, after the all-reduce)
        assert all(torch.equal(p[r]["model.layers.0.self_attn.o_proj.bias"],
                               full["model.layers.0.self_attn.o_proj.bias"]) for r in range(2))
    heads = [("model.embed_tokens.weight", "model.embed_tokens.weight")]
    heads += [] if cfg.tie_word_embeddings else [("lm_head.weight", "lm_head.weight")]
    for param, ckpt in heads:
        cat = torch.cat([p[r][param] for r in range(2)])
        assert cat.shape[0] == 102 and torch.equal(cat[:101], full[ckpt]) and not cat[101:].any()
    # rank 0 read exactly what it holds (its part of each sharded tensor, replicated tensors whole): about
    # half of the checkpoint, never a whole sharded tensor
    assert sum(reads) == sum(t.numel() for t in ranks[0].parameters())
    assert sum(reads) < 0.6 * sum(t.numel() for t in full.values())


def test_each_rank_reads_its_half_of_every_expert(tmp_path, monkeypatch):
    """Mixtral (Hub layout, one tensor per expert): gate / up rows and down columns of each expert split along
    the intermediate features, the router whole on both ranks; rank 0 reads only what it holds."""
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path)
    full = load_file(str(tmp_path / "model.safetensors"))
    reads: list[int] = []
    ranks = [build_rank(tmp_path, r, 2, monkeypatch, reads if r == 0 else None) for r in range(2)]
    moe = [m.model.layers[0].mlp for m in ranks]
    pre = "model.layers.0.block_sparse_moe"
    for e in range(3):
        want = {w: full[f"{pre}.experts.{e}.{w}.weight"] for w in ("w1", "w3", "w2")}
        assert torch.equal(torch.cat([b.experts.w13_weight[e, :24] for b in moe]), want["w1"])
        assert torch.equal(torch.cat([b.experts.w13_weight[e, 24:] for b in moe]), want["w3"])
        assert torch.equal(torch.cat([b.experts.w2_weight[e] for b in moe], dim=1), want["w2"])
    assert all(torch.equal(b.gate.weight, full[f"{pre}.gate.weight"]) for b in moe)
    assert sum(reads) == sum(t.numel() for t in ranks[0].parameters())
    for m in ranks:  # --load-format dummy: the ranks' routers agree (they route every token alike)
        init_dummy_weights(m, seed=3)
    assert torch.equal(moe[0].gate.weight, moe[1].gate.weight) and moe[0].gate.weight.std() > 0.01


def test_shapes_that_do_not_split_are_refused_naming_the_size():
    tp = TPGroup(0, 2)
    with pytest.raises(ValueError, match=r"num_attention_heads \(3\) is not divisible by the tensor-parallel size 2"):
        QKVParallelLinear(24, 8, 3, 3, tp=tp, prefix="model.layers.0.self_attn.qkv_proj")
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) must divide the tensor-parallel size 4"):
        QKVParallelLinear(64, 8, 8, 3, tp=TPGroup(0, 4))
    with pytest.raises(ValueError, match=r"input size \(33\) is not divisible"):
        RowParallelLinear(33, 8, tp=tp)
    emb = VocabParallelEmbedding(101, 4, tp=TPGroup(1, 2))
    with pytest.raises(ValueError, match=r"shape \(100, 4\), expected \(101, 4\)"):
        emb.load_weight("weight", torch.zeros(100, 4))
    layer = RowParallelLinear(32, 8, tp=tp, prefix="down_proj")
    with pytest.raises(ValueError, match=r"down_proj.weight has shape \(8, 16\): 32 entries expected along dim 1"):
        layer.load_weight("weight", torch.zeros(8, 16))


def test_quantized_splits_that_a_method_cannot_make_are_refused_naming_why():
    tp = TPGroup(0, 2)
    act_order = parse_quant_config({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64,
                                                            "desc_act": True}})
    with pytest.raises(ValueError, match=r"act-order .* a row-parallel layer splits: serve them with "
                                         r"--tensor-parallel-size 1"):
        RowParallelLinear(256, 64, bias=False, quant_config=act_order, prefix="down_proj", tp=tp)
    g128 = parse_quant_config({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    with pytest.raises(ValueError, match=r"in_features 64 is not a multiple of group_size 128 \(each of the 2 "
                                         r"tensor-parallel ranks holds 1/2 of the layer"):
        RowParallelLinear(128, 64, bias=False, quant_config=g128, prefix="down_proj", tp=tp)
    RowParallelLinear(128, 64, bias=False, quant_config=g128, prefix="down_proj", tp=TPGroup(0, 1))  # one rank: whole
