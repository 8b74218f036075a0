"""Random-weight Qwen3-MoE and Mixtral vs transformers (CPU fp32) through the paged cache: every MoE
feature on (top-k renormalised or not, dense ``mlp_only_layers`` and a ``decoder_sparse_step`` grid,
sliding windows shorter than the prompts), loaded from the Hub's per-expert layout and from
transformers 5's stacked one; plus the router against transformers' own routers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import utils_parity
from safetensors.torch import load_file
from utils_parity import hf_logits, make_tokens, run_schedule

from slicelm.layers.attention import TorchAttentionBackend
from slicelm.layers.moe.layer import torch_experts
from slicelm.layers.moe.router import select_experts
from slicelm.models.moe import SparseMoeForCausalLM
from slicelm.models.registry import get_model_class

VOCAB = 512
SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
         "num_attention_heads": 4, "num_key_value_heads": 2}
CASES: dict[str, tuple[str, dict]] = {
    # layers 0 (mlp_only) and 2 (off the step-2 grid) dense, 1 and 3 sparse; window 10 everywhere
    "qwen3_moe_all": ("Qwen3MoeConfig", {"num_hidden_layers": 4, "head_dim": 32, "intermediate_size": 96,
                                         "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 3,
                                         "norm_topk_prob": True, "mlp_only_layers": [0], "decoder_sparse_step": 2,
                                         "use_sliding_window": True, "sliding_window": 10}),
    "qwen3_moe_unnormalised": ("Qwen3MoeConfig", {"num_hidden_layers": 2, "head_dim": 16, "intermediate_size": 96,
                                                  "moe_intermediate_size": 48, "num_experts": 6,
                                                  "num_experts_per_tok": 2, "norm_topk_prob": False,
                                                  "tie_word_embeddings": True}),
    "mixtral_window": ("MixtralConfig", {"num_hidden_layers": 2, "intermediate_size": 48, "num_local_experts": 4,
                                         "num_experts_per_tok": 2, "sliding_window": 8}),
}


def build(case: str, tmp_path: Path | None = None):
    cls_name, overrides = CASES[case]
    hf, config = utils_parity.build_hf(cls_name, {**SMALL, **overrides})
    model = SparseMoeForCausalLM(config, attn_backend=TorchAttentionBackend()).eval()
    if tmp_path is None:
        model.load_weights(hf.state_dict().items())  # transformers 5's stacked experts
    else:
        hf.save_pretrained(tmp_path)  # the Hub layout: one tensor per expert and projection
        model.load_weights(load_file(tmp_path / "model.safetensors").items())
    return hf, model


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_decode_prefix_and_chunks(case: str, tmp_path: Path) -> None:
    hf, model = build(case, tmp_path)
    seqs = make_tokens([30, 9, 44, 17], seed=1, vocab=VOCAB)
    # whole prompts, then chunks / prefix continuations mixed with decode rows, then decodes
    schedule = [[20, 5, 14, 13], [7, 1, 27, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    run_schedule(model, seqs, hf_logits(hf, seqs), schedule, block_size=16)


def test_stacked_expert_layout_and_registry() -> None:
    """transformers 5's in-memory stacked tensors load too; the registry maps both architectures here."""
    hf, model = build("qwen3_moe_all")
    assert get_model_class(["Qwen3MoeForCausalLM"]) is SparseMoeForCausalLM
    assert get_model_class(["MixtralForCausalLM"]) is SparseMoeForCausalLM
    assert sorted(model.moe.sparse_layers) == [1, 3]
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    seqs = make_tokens([12, 25], seed=2, vocab=VOCAB)
    run_schedule(model, seqs, hf_logits(hf, seqs), [[12, 25]], block_size=16)


def test_load_errors_name_the_checkpoint_tensor(tmp_path: Path) -> None:
    _, model = build("mixtral_window", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    gone = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    with pytest.raises(ValueError, match=rf"missing.*{gone.replace('.', '[.]')}"):
        model.load_weights([(k, v) for k, v in weights.items() if k != gone])
    with pytest.raises(ValueError, match="4 experts"):
        model.load_weights([*weights.items(), ("model.layers.0.block_sparse_moe.experts.4.w1.weight", weights[gone])])
    with pytest.raises(ValueError, match="shape"):
        model.load_weights([*weights.items(), (gone, torch.zeros(3, 3))])
    _, qwen = build("qwen3_moe_all")  # layer 0 is dense (mlp_only_layers)
    with pytest.raises(ValueError, match="no experts"):
        qwen.load_weights([("model.layers.0.mlp.experts.0.up_proj.weight", torch.zeros(32, 64))])


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_matches_transformers(renormalize: bool) -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = transformers.Qwen3MoeConfig(hidden_size=16, num_experts=10, num_experts_per_tok=4,
                                      norm_topk_prob=renormalize)
    torch.manual_seed(0)
    router = Qwen3MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(7, 16)
    logits, ref_w, ref_ids = router(x)
    w, ids = select_experts(logits, 4, renormalize)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w.float())
    mix = MixtralTopKRouter(transformers.MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2))
    torch.nn.init.normal_(mix.weight)
    logits, ref_w, ref_ids = mix(x)
    w, ids = select_experts(logits, 2, True)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w)
    with pytest.raises(ValueError, match="top_k"):
        select_experts(logits, 9, True)


def test_torch_experts_match_transformers_experts() -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = transformers.Qwen3MoeConfig(hidden_size=24, moe_intermediate_size=12, num_experts=5)
    experts = Qwen3MoeExperts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(9, 24)
    w, ids = select_experts(torch.randn(9, 5), 2, True)
    ref = experts(x, ids.long(), w)
    ours = torch_experts(x, experts.gate_up_proj.data, experts.down_proj.data, w, ids)
    torch.testing.assert_close(ours, ref)


def test_benchmark_floor_counts_active_parameters() -> None:
    """benchmarks/moe.py's floor at the Qwen3-30B-A3B shape: one token reads ~3.0B parameters (the "A3B"),
    a large step every expert (~30.2B); the KV bytes of a 10-token prompt generating 3 tokens."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("moe_bench", Path(__file__).parents[2] / "benchmarks" / "moe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = bench.QWEN3_30B_A3B
    assert bench.step_bytes(shape, 1) / 2 == pytest.approx(3.04e9, rel=5e-3)
    assert bench.step_bytes(shape, 100_000) / 2 == pytest.approx(30.22e9, rel=5e-3)
    per_token = 48 * 2 * 4 * 128 * 2
    assert bench.kv_bytes(shape, [([0] * 10, 3)]) == per_token * (10 * 3 + 3)
    fl = bench.floor(shape, [([0] * 10, 3)], [10, 1, 1], 1e12)
    assert fl["floor_s"] == pytest.approx((fl["weight_bytes"] + fl["kv_bytes"]) / 1e12)
