"""End to end on the new architectures: greedy tokens *and their logprobs* from the engine equal
transformers' (CPU fp32) for Qwen3-MoE, Mixtral, Gemma 2, Gemma 3 and Phi-3 with every feature on
(windows shorter than the prompts, soft-capping, top-k renormalisation, a dense ``mlp_only_layers``
layer next to a sparse one, sliding next to global layers, LongRoPE), through chunked prefill,
prefix-cache hits and preemption."""

from __future__ import annotations

import pytest
import torch
import utils_parity
from utils_parity import ENGINE_MODES, ENGINE_PROMPTS, hf_greedy

from slicelm import LLM, SamplingParams

NEW_TOKENS = 16
COMMON = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 256,
          "rms_norm_eps": 1e-6, "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": None,
          "eos_token_id": None, "pad_token_id": None}
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "intermediate_size": 96, "moe_intermediate_size": 32,
                                     "num_experts": 8, "num_experts_per_tok": 3, "norm_topk_prob": True,
                                     "mlp_only_layers": [0], "decoder_sparse_step": 2, "use_sliding_window": True,
                                     "sliding_window": 20}),
    "mixtral": ("MixtralConfig", {"intermediate_size": 48, "num_local_experts": 4,
                                  "num_experts_per_tok": 2, "sliding_window": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "intermediate_size": 96, "sliding_window": 12,
                                "query_pre_attn_scalar": 24, "attn_logit_softcapping": 3.0,
                                "final_logit_softcapping": 5.0, "pad_token_id": 0}),
    "gemma3": ("Gemma3TextConfig", {
        "head_dim": 16, "intermediate_size": 96, "sliding_window": 12, "sliding_window_pattern": 2, "pad_token_id": 0,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}}),
    "phi3": ("Phi3Config", {
        "intermediate_size": 96, "sliding_window": 20, "pad_token_id": 0, "original_max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                            "short_factor": [1.0, 1.2, 1.9, 2.5], "long_factor": [2.0, 3.0, 5, 9]}}),
}
# chunked prefill alone, and chunks + preemption + async scheduling together; prefix hits on the MoE model
MODES = ["chunked_prefill", "async_preemption_chunked"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    cls_name, overrides = FAMILIES[request.param]
    hf, _ = utils_parity.build_hf(cls_name, {**COMMON, **overrides}, std=0.1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return str(path), hf_greedy(hf, ENGINE_PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_and_logprobs_match_transformers(family, mode):
    check(family, mode)


def test_prefix_hits_on_moe(family, request):
    if request.node.callspec.params["family"] != "qwen3_moe":
        pytest.skip("prefix hits run on the MoE model only (the attention path is shared)")
    check(family, "prefix_hits")


def check(family, mode):
    path, (expected, expected_lps) = family
    llm = LLM(path, skip_tokenizer_init=True, max_num_seqs=8, **ENGINE_MODES[mode])
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": p} for p in ENGINE_PROMPTS]
    outs = llm.generate(prompts, params, use_tqdm=False)
    if mode == "prefix_hits":
        hits = llm.engine.scheduler.kv_cache.prefix_cache_hits
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.scheduler.kv_cache.prefix_cache_hits - hits >= 4 * 32
    for i, (o, e, e_lps) in enumerate(zip(outs, expected, expected_lps)):
        got = o.outputs[0]
        if got.token_ids != e:
            first = next(j for j in range(len(e)) if got.token_ids[j] != e[j])
            pytest.fail(f"prompt {i} (len {len(ENGINE_PROMPTS[i])}) diverges from transformers at token {first}")
        lps = [entry[t].logprob for entry, t in zip(got.logprobs, got.token_ids)]
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(e_lps), rtol=0, atol=2e-4)
    if "preemption" in mode:
        assert llm.engine.get_stats().num_preemptions > 0
