"""GPU path of the new architectures: the fused-MoE Triton kernels at Qwen3-30B-A3B's layer shape against
the per-expert torch loop, the alignment at prefill size, a MoE block inside a CUDA graph, and random
Qwen3-MoE / Mixtral / Gemma 2 / Gemma 3 models served by the CUDA engine (Triton attention with sliding
windows and soft-capping, CUDA graphs, chunked prefill, prefix hits, preemption) equal to the CPU engine."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from utils_parity import (  # noqa: E402
    assert_engine_matches,
    build_hf,
    free_cuda,
    greedy_ids,
    prompts_with_shared_prefix,
)

from slicelm import LLM  # noqa: E402
from slicelm.layers.moe.layer import FusedMoE, torch_experts  # noqa: E402
from slicelm.layers.moe.router import select_experts  # noqa: E402

DEV = torch.device("cuda")
PROMPT_LENS = (5, 17, 40, 3, 130, 64, 1, 300)
COMMON = {"vocab_size": 2048, "hidden_size": 256, "num_hidden_layers": 4, "max_position_embeddings": 2048,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "pad_token_id": 0,
          "bos_token_id": 1, "eos_token_id": 2}
MODELS = {
    "qwen3_moe": ("Qwen3MoeConfig", {"intermediate_size": 512, "moe_intermediate_size": 128, "num_experts": 16,
                                     "num_experts_per_tok": 4, "norm_topk_prob": True, "mlp_only_layers": [0],
                                     "use_sliding_window": True, "sliding_window": 96}),
    "mixtral": ("MixtralConfig", {"intermediate_size": 256, "num_local_experts": 8, "num_experts_per_tok": 2,
                                  "sliding_window": 80}),
    "gemma2": ("Gemma2Config", {"intermediate_size": 512, "sliding_window": 64, "query_pre_attn_scalar": 64,
                                "attn_logit_softcapping": 20.0, "final_logit_softcapping": 15.0}),
    "gemma3": ("Gemma3TextConfig", {"intermediate_size": 512, "sliding_window": 64, "sliding_window_pattern": 2}),
}


def _routed(tokens: int, experts: int, top_k: int, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return select_experts(torch.randn(tokens, experts, device=DEV, generator=g), top_k, True)


@pytest.mark.parametrize("tokens", [1, 7, 256, 2048])
def test_fused_experts_bf16_at_qwen3_30b_layer_shape(tokens):
    from slicelm.layers.moe.fused_moe import fused_experts

    experts, top_k, hidden, inter = 128, 8, 2048, 768
    torch.manual_seed(tokens)
    x = torch.randn(tokens, hidden, device=DEV, dtype=torch.bfloat16)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=DEV) * 0.02).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device=DEV) * 0.02).bfloat16()
    weights, ids = _routed(tokens, experts, top_k, tokens)
    ref = torch_experts(x.float(), w13.float(), w2.float(), weights, ids)
    out = fused_experts(x, w13, w2, weights, ids)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err


def test_alignment_at_prefill_size():
    from slicelm.layers.moe.align import moe_align_block_size

    _, ids = _routed(8192, 128, 8, 1)
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, 128, 128)
    pairs = ids.numel()
    used = int(num_post)
    real = sorted_ids[:used]
    assert torch.equal(real[real < pairs].sort().values, torch.arange(pairs, device=DEV, dtype=torch.int32))
    block_of = torch.arange(used, device=DEV) // 128
    valid = real < pairs
    assert torch.equal(ids.flatten()[real[valid].long()], expert_ids[block_of[valid]])


def test_moe_block_replays_in_a_cuda_graph():
    """Routing differs between capture and replay: the graph must follow the new routing."""
    moe = FusedMoE(32, 4, 512, 256, renormalize=True).to(DEV, torch.bfloat16)
    torch.nn.init.normal_(moe.w13_weight, std=0.03)
    torch.nn.init.normal_(moe.w2_weight, std=0.03)
    x = torch.randn(64, 512, device=DEV, dtype=torch.bfloat16)
    logits = torch.randn(64, 32, device=DEV, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        moe(x, logits)  # warm-up compiles the kernels
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = moe(x, logits)
    torch.cuda.synchronize()
    for seed in range(3):
        g = torch.Generator(device=DEV).manual_seed(seed)
        x.copy_(torch.randn(x.shape, device=DEV, generator=g))
        logits.copy_(torch.randn(logits.shape, device=DEV, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, moe(x, logits), rtol=1e-2, atol=1e-3)


@pytest.fixture(scope="module", params=list(MODELS))
def model_dir(request, tmp_path_factory):
    cls_name, overrides = MODELS[request.param]
    hf, _ = build_hf(cls_name, {**COMMON, **overrides}, std=0.06)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return str(path)


def test_cuda_engine_matches_cpu_engine(model_dir):
    prompts = prompts_with_shared_prefix(PROMPT_LENS, 2048)
    reference = greedy_ids(LLM(model_dir, device="cpu", skip_tokenizer_init=True, max_model_len=1024), prompts, 24)
    for kwargs in ({}, {"max_num_batched_tokens": 64}, {"num_gpu_blocks_override": 24, "max_model_len": 384}):
        opts = {"max_model_len": 1024, "gpu_memory_budget": "6GiB", "max_num_seqs": 16, **kwargs}
        llm = LLM(model_dir, device="cuda", dtype="float32", skip_tokenizer_init=True, **opts)
        assert_engine_matches(llm, prompts, reference, 24, f"{kwargs}: ")
        if "num_gpu_blocks_override" not in kwargs:
            mixed = llm.engine.worker.runner.mixed_graphs
            assert mixed is not None and mixed.num_replays > 0  # windowed / soft-capped steps ran in graphs
            del mixed
        del llm
        free_cuda()


@pytest.mark.parametrize(("head_dim", "group", "window", "cap"), [(256, 4, 512, None), (128, 2, 96, 50.0),
                                                                  (64, 8, None, 30.0)])
def test_triton_window_softcap_bf16_matches_torch_backend(head_dim, group, window, cap):
    """Both Triton kernels (mixed prefill/chunk/prefix rows, then decode rows with and without splits) against
    the torch backend on the same bf16 cache, at Gemma 3 270M's head size and others."""
    from utils_paged import PagedBatch, make_kv_caches

    from slicelm.layers.attention import TorchAttentionBackend
    from slicelm.layers.triton.backend import TritonAttentionBackend

    kv_heads, lens = 2, [700, 33, 1200, 5]
    batch = PagedBatch(lens, 16, shuffle_seed=1, device=DEV)
    caches = make_kv_caches(2, batch.num_blocks, 16, kv_heads, head_dim, dtype=torch.bfloat16, device=DEV)
    g = torch.Generator(device=DEV).manual_seed(head_dim)
    for chunks in ([600, 20, 1000, 4], [99, 12, 199, 1]):  # prefill, then chunks / prefix continuations
        step = batch.step([[0] * n for n in chunks])
        t = step.meta.num_tokens
        q = torch.randn(t, kv_heads * group, head_dim, device=DEV, generator=g).bfloat16()
        k = torch.randn(t, kv_heads, head_dim, device=DEV, generator=g).bfloat16()
        v = torch.randn(t, kv_heads, head_dim, device=DEV, generator=g).bfloat16()
        outs = [backend.forward(q, k, v, cache, step.meta, head_dim**-0.5, sliding_window=window, soft_cap=cap)
                for backend, cache in ((TorchAttentionBackend(), caches[0]), (TritonAttentionBackend(), caches[1]))]
        err = ((outs[1].float() - outs[0].float()).norm() / outs[0].float().norm()).item()
        assert err < 1e-2, (chunks, err)
    for splits in (1, 8):  # the last position of every sequence, as decode rows
        decode = PagedBatch(lens, 16, shuffle_seed=1, device=DEV)  # same block tables
        decode.num_computed = [n - 1 for n in lens]
        s = decode.decode([0] * len(lens))
        q = torch.randn(len(lens), kv_heads * group, head_dim, device=DEV, generator=g).bfloat16()
        k = torch.randn(len(lens), kv_heads, head_dim, device=DEV, generator=g).bfloat16()
        v = torch.randn_like(k)
        ref = TorchAttentionBackend().forward(q, k, v, caches[0], s.meta, 0.1, sliding_window=window, soft_cap=cap)
        out = TritonAttentionBackend(decode_num_splits=splits).forward(q, k, v, caches[1], s.meta, 0.1,
                                                                       sliding_window=window, soft_cap=cap)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 1e-2, (splits, err)
