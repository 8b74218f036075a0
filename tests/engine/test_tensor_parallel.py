"""Tensor parallelism end to end on the CPU: ``LLM(..., tensor_parallel_size=2)`` (this process is rank 0, one
worker process is rank 1, gloo between them) gives the greedy tokens, logprobs and prompt logprobs of
``tensor_parallel_size=1`` in float32, through chunked prefill, async scheduling (the next step's inputs
come from the sampled ids the driver shares) and prefix-cache hits.

Llama: two KV heads (one per rank), qkv and o biases, an odd vocabulary (padded rows on rank 1). Qwen3:
one KV head (replicated on both ranks), tied embeddings, qk-norm. Qwen3-MoE: a dense layer, then a sparse one
(4 experts, top-2, each rank half of every expert's intermediate features). Gemma 2: sliding-window and global
layers, attention and final-logit soft-capping. (Each family's shards vs transformers, and Mixtral / Gemma 3 /
Phi-3: tests/models/test_tp_models.py.) AWQ and GPTQ 4-bit checkpoints: each rank reads its part of the packed
weights, zeros and scales (AWQ packs along the outputs, GPTQ along the inputs).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from utils_quant import base_model, write_awq, write_gptq

from slicelm import LLM, SamplingParams

COMMON = {"vocab_size": 501, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "bos_token_id": None,
          "eos_token_id": None, "pad_token_id": None}
FAMILIES = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2, "attention_bias": True}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 1, "head_dim": 16, "tie_word_embeddings": True}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_key_value_heads": 2, "head_dim": 16, "moe_intermediate_size": 32,
                                     "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
                                     "mlp_only_layers": [0]}),
    "gemma2": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 8,
                                "query_pre_attn_scalar": 16, "attn_logit_softcapping": 20.0,
                                "final_logit_softcapping": 10.0}),
}
# quantized checkpoints (tests/utils_quant.py: hidden 256, FFN 512, 4 heads, 2 KV heads), group 64: column-parallel
# layers split AWQ's output packing, row-parallel ones GPTQ's input packing and every format's scale groups
QUANTIZED = {
    "awq": lambda hf, path: write_awq(hf, path, group=64),
    "gptq": lambda hf, path: write_gptq(hf, path, bits=4, group=64, sym=False),
}
_g = torch.Generator().manual_seed(5)
_SHARED = torch.randint(0, 501, (33,), generator=_g).tolist()
PROMPTS = [torch.randint(0, 501, (n,), generator=_g).tolist() for n in (4, 19, 37)] + [
    _SHARED + torch.randint(0, 501, (n,), generator=_g).tolist() for n in (2, 9)]
NEW_TOKENS = 12
TOL = 1e-4


@pytest.fixture(scope="module", params=[*FAMILIES, *QUANTIZED])
def checkpoint(request, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp(request.param)
    if request.param in QUANTIZED:
        QUANTIZED[request.param](base_model(), path)
        return str(path)
    cls_name, overrides = FAMILIES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(**COMMON, **overrides)
    hf = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))._from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf.save_pretrained(path)
    return str(path)


def generate(path: str, full: bool, **engine: object) -> list:
    """Greedy outputs with logprobs (one request with prompt logprobs); ``full``: every prompt, then the ones
    sharing a prefix again (cache hits); otherwise three prompts (the quantized CPU path dequantizes per step)."""
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", dtype="float32", max_num_seqs=8, **engine)
    try:
        params = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS if full else 6, ignore_eos=True, logprobs=2,
                                 prompt_logprobs=2 if i == 2 else None) for i in range(len(PROMPTS))]
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        n = len(PROMPTS) if full else 3
        outs = llm.generate(prompts[:n], params[:n], use_tqdm=False)
        if full:
            outs += llm.generate(prompts[3:], params[3:], use_tqdm=False)  # the shared prefix from the cache
            assert llm.engine.scheduler.kv_cache.prefix_cache_hits >= 2 * 32
        if engine.get("tensor_parallel_size", 1) > 1:
            executor = llm.engine.core.executor
            assert [w.proc.poll() for w in executor.workers] == [None]  # the worker process serves
    finally:
        llm.engine.shutdown()
    if engine.get("tensor_parallel_size", 1) > 1:
        assert all(w.proc.poll() is not None for w in executor.workers)  # and is gone after shutdown
    return outs


def logprob_table(entries: list) -> list[dict[int, float]]:
    return [{t: lp.logprob for t, lp in e.items()} if e is not None else {} for e in entries]


def test_tp2_gives_the_tokens_and_logprobs_of_tp1(checkpoint, request):
    full = request.node.callspec.params["checkpoint"] in FAMILIES
    ref = generate(checkpoint, full)
    got = generate(checkpoint, full, tensor_parallel_size=2, max_num_batched_tokens=16, async_scheduling=True)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids, f"output {i}"
        pairs = [(logprob_table(r.outputs[0].logprobs), logprob_table(g.outputs[0].logprobs))]
        if r.prompt_logprobs is not None:
            pairs.append((logprob_table(r.prompt_logprobs), logprob_table(g.prompt_logprobs)))
        for want, have in pairs:
            for w, h in zip(want, have, strict=True):
                assert w.keys() == h.keys(), f"output {i}: other top tokens"
                assert max((abs(w[t] - h[t]) for t in w), default=0.0) < TOL, f"output {i}"
    assert sum(o.prompt_logprobs is not None for o in got) == 1
