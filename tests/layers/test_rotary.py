"""Rotary embedding vs transformers' LlamaRotaryEmbedding / apply_rotary_pos_emb (all rope types)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from slicelm.layers.rotary import get_rope, rope_parameters

HEAD_DIM, HEADS, KV_HEADS, MAX_POS = 32, 4, 2, 4096

ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
}


def hf_config(params: dict) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HEAD_DIM * HEADS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(params),
    )


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_matches_transformers(case: str) -> None:
    config = hf_config(ROPE_CASES[case])
    hf_rope = LlamaRotaryEmbedding(config)
    rope = get_rope(HEAD_DIM, MAX_POS, config.to_dict())
    positions = torch.tensor([0, 1, 5, 100, 1023, 1024, 2000, 4095])
    q = torch.randn(len(positions), HEADS * HEAD_DIM)
    k = torch.randn(len(positions), KV_HEADS * HEAD_DIM)
    cos, sin = hf_rope(q, positions[None])
    # our cache holds [cos | sin] of the half dims; HF duplicates each half
    cache = rope.cos_sin_cache[positions]
    half = HEAD_DIM // 2
    cos_half, sin_half = cache[:, :half], cache[:, half:]
    torch.testing.assert_close(torch.cat([cos_half, cos_half], -1), cos[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([sin_half, sin_half], -1), sin[0], rtol=1e-6, atol=1e-6)
    ref_q, ref_k = apply_rotary_pos_emb(
        q.view(1, -1, HEADS, HEAD_DIM).transpose(1, 2),
        k.view(1, -1, KV_HEADS, HEAD_DIM).transpose(1, 2),
        cos,
        sin,
    )
    out_q, out_k = rope(positions, q, k)
    assert out_q.shape == q.shape and out_k.shape == k.shape
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out_q.view(-1, HEADS, HEAD_DIM), ref_q[0].transpose(0, 1), **tol)
    torch.testing.assert_close(out_k.view(-1, KV_HEADS, HEAD_DIM), ref_k[0].transpose(0, 1), **tol)
    # 3-D inputs give the same result
    out_q3, _ = rope(positions, q.view(-1, HEADS, HEAD_DIM), k.view(-1, KV_HEADS, HEAD_DIM))
    torch.testing.assert_close(out_q3, out_q.view(-1, HEADS, HEAD_DIM))


def test_scaling_changes_frequencies() -> None:
    """Guards against a scaling type silently falling back to the default frequencies."""
    caches = {n: get_rope(HEAD_DIM, MAX_POS, {"rope_parameters": p}) for n, p in ROPE_CASES.items()}
    caches = {n: rope.cos_sin_cache for n, rope in caches.items()}
    base = get_rope(HEAD_DIM, MAX_POS, {"rope_theta": 500000.0}).cos_sin_cache
    assert not torch.allclose(caches["llama3"], base)
    assert not torch.allclose(caches["linear"], caches["default"])


def test_old_style_config_matches_new_style() -> None:
    old = {
        "rope_theta": 500000.0,
        "rope_scaling": {k: v for k, v in ROPE_CASES["llama3"].items() if k != "rope_theta"},
        "max_position_embeddings": MAX_POS,
    }
    old["rope_scaling"]["type"] = old["rope_scaling"].pop("rope_type")
    new = hf_config(ROPE_CASES["llama3"]).to_dict()
    assert rope_parameters(old)["rope_type"] == "llama3"
    assert torch.equal(
        get_rope(HEAD_DIM, MAX_POS, old).cos_sin_cache, get_rope(HEAD_DIM, MAX_POS, new).cos_sin_cache
    )
    # no rope keys at all: default rope with theta 10000
    assert torch.equal(
        get_rope(HEAD_DIM, 64, {}).cos_sin_cache,
        get_rope(HEAD_DIM, 64, {"rope_parameters": ROPE_CASES["default"]}).cos_sin_cache,
    )


def test_unsupported_rope_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="rope_type"):
        get_rope(HEAD_DIM, 64, {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        get_rope(HEAD_DIM, 64, {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})


def test_longrope_short_then_long_factors_and_partial_rotary() -> None:
    """Phi-3 LongRoPE: positions below original_max_position_embeddings use the short factors, the rest
    the long ones (vLLM's per-position cache); each half matches transformers' Phi3RotaryEmbedding
    where it picks that factor set (a forward shorter / longer than the original context)."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    head_dim, rot = 32, 24  # partial_rotary_factor 0.75
    g = torch.Generator().manual_seed(0)
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
              "short_factor": (1 + torch.rand(rot // 2, generator=g)).tolist(),
              "long_factor": (1 + 4 * torch.rand(rot // 2, generator=g)).tolist()}
    config = Phi3Config(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, original_max_position_embeddings=128,
                        rope_parameters=params, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    for key in ("su", "longrope"):  # "su" is the name older Phi-3 configs use
        cfg = config.to_dict()
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_type": key}
        rope = get_rope(head_dim, 512, cfg)
        assert rope.rotary_dim == rot
        hf = Phi3RotaryEmbedding(config)
        for positions in (torch.arange(0, 128), torch.arange(128, 512)):
            all_pos = torch.arange(0, int(positions[-1]) + 1)  # HF picks the factors by the forward's length
            cos, sin = hf(torch.zeros(1), all_pos[None])
            half = rot // 2
            cache = rope.cos_sin_cache[positions]
            ref_cos, ref_sin = cos[0, positions, :half], sin[0, positions, :half]
            torch.testing.assert_close(cache[:, :half], ref_cos, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache[:, half:], ref_sin, rtol=1e-5, atol=1e-5)
