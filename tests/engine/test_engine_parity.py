"""End to end: greedy continuations from the engine equal transformers' on random-weight models,
whatever the engine does on the way (chunked prefill, prefix-cache hits, preemption)."""

from __future__ import annotations

import pytest
import torch
import transformers
from utils_parity import ENGINE_MODES as MODES
from utils_parity import ENGINE_PROMPTS as PROMPTS

from slicelm import LLM, SamplingParams

VOCAB = 512
NEW_TOKENS = 32
SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "bos_token_id": None, "eos_token_id": None,
         "pad_token_id": None}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
FAMILIES = {
    "llama3": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE}),
    "mistral": ("MistralConfig", {"num_attention_heads": 4, "num_key_value_heads": 1, "sliding_window": None}),
    "qwen2_tied": ("Qwen2Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                              "tie_word_embeddings": False}),
    "qwen3_tied": ("Qwen3Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                                   "tie_word_embeddings": True}),
}
@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    cls_name, overrides = FAMILIES[request.param]
    config = getattr(transformers, cls_name)(**{**SMALL, **overrides})
    torch.manual_seed(0)
    model_cls = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))
    hf = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())
    return str(path), expected


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_transformers(family, mode):
    path, expected = family
    llm = LLM(path, skip_tokenizer_init=True, max_num_seqs=8, **MODES[mode])
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    outs = llm.generate(prompts, params, use_tqdm=False)
    if mode == "prefix_hits":
        hits_before = llm.engine.scheduler.kv_cache.prefix_cache_hits
        outs = llm.generate(prompts, params, use_tqdm=False)
        new_hits = llm.engine.scheduler.kv_cache.prefix_cache_hits - hits_before
        assert new_hits >= sum(len(p) // 16 * 16 for p in PROMPTS) - 16
    got = [o.outputs[0].token_ids for o in outs]
    for i, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            first = next(j for j in range(len(e)) if g[j] != e[j])
            pytest.fail(f"prompt {i} (len {len(PROMPTS[i])}) diverges from transformers at token {first}")
    stats = llm.engine.get_stats()
    if "preemption" in mode:
        assert stats.num_preemptions > 0
    if mode == "chunked_prefill":
        assert llm.engine.scheduler_config.max_num_batched_tokens == 16
    assert stats.kv_cache_usage == 0.0 and not llm.engine.has_unfinished_requests()
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
