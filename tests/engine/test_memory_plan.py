"""The GPU memory plan's arithmetic (``engine/memory.py``) on the CPU: the CUDA queries it makes are replaced by
fixed numbers, so what is checked is how the budget is split — vLLM's budget-dependent defaults, the CUDA-graph
reserve, and the seed-002 slice (a 7B AWQ model in 10800 MiB) leaving KV cache room."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from slicelm.engine import memory
from slicelm.engine.cuda_graphs import MIXED_MAX_TOKENS

GiB, MiB = 1 << 30, 1 << 20
DEV = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """An H200-sized device whose process holds ``state['allocated']`` bytes (the weights) and 0.65 GiB outside
    torch's allocator (the CUDA context: seed-002's 0.91 GiB line minus the 0.25 GiB growth allowance)."""
    state = {"allocated": 0}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=140 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["allocated"])
    monkeypatch.setattr(memory, "process_gpu_memory", lambda index: state["allocated"] + 666 * MiB)
    return state


def test_batched_tokens_default_follows_vllm_by_budget():
    assert memory.default_batched_tokens(10800 * MiB, 64) == 2048  # a 45% A10G slice: vLLM's < 70 GiB default
    assert memory.default_batched_tokens(int(0.9 * 140 * GiB), 256) == 8192
    assert memory.default_batched_tokens(None, 64) == 2048  # CPU
    assert memory.default_batched_tokens(10 * GiB, 4096) == 4096  # never below max_num_seqs


def test_mixed_graphs_are_bounded_on_small_budgets():
    assert memory.mixed_graph_tokens(10800 * MiB, 2048, MIXED_MAX_TOKENS) == 512
    assert memory.mixed_graph_tokens(10800 * MiB, 256, MIXED_MAX_TOKENS) == 256
    assert memory.mixed_graph_tokens(120 * GiB, 16384, MIXED_MAX_TOKENS) == MIXED_MAX_TOKENS
    assert memory.mixed_graph_tokens(120 * GiB, 2048, MIXED_MAX_TOKENS) == 2048


def test_fragmentation_allowance_is_the_largest_step_tensor():
    # Llama-3.1-8B at --max-num-batched-tokens 16384: the gate/up output the AWQ engine could not place
    assert memory.fragmentation_allowance(16384, 2 * 14336, 2) == 896 * MiB


def test_graph_pool_reserve():
    assert memory.graph_pool_reserve(GiB, mixed=False) == GiB + memory.GRAPH_POOL_SLACK_BYTES
    assert memory.graph_pool_reserve(GiB, mixed=True) == 2 * GiB + memory.GRAPH_POOL_SLACK_BYTES


def test_plan_splits_the_budget(fake_gpu):
    fake_gpu["allocated"] = 5 * GiB
    block = 2 * MiB
    plan = memory.plan_memory(DEV, 12 * GiB, 0.9, block, activation_bytes=GiB, graph_pool_bytes=GiB // 2)
    non_torch = 666 * MiB + memory.NON_TORCH_GROWTH_BYTES
    assert plan.non_torch_bytes == non_torch and plan.source == "gpu_memory_budget"
    free = 12 * GiB - 5 * GiB - GiB - GiB // 2 - non_torch
    assert plan.num_blocks == free // block and plan.kv_bytes == free
    with pytest.raises(memory.MemoryBudgetError, match="leaves no room for KV cache"):
        memory.plan_memory(DEV, 7 * GiB, 0.9, block, activation_bytes=GiB, graph_pool_bytes=GiB)


def test_seed_002_slice_keeps_kv_room(fake_gpu):
    """Qwen2.5-7B AWQ (5.28 GiB resident) in ``--gpu-memory-budget 10800MiB --max-num-seqs 64``: on the H200 the
    old plan profiled 8192 tokens (1.66 GiB) and reserved graphs for 8192-token mixed steps twice (3.39 GiB),
    leaving 0 KV blocks. Now: 2048 tokens, graphs up to 512. The activation of a step scales with its tokens
    (its largest tensors are [tokens, 2 x 18944] and [tokens, 18944] in the MLP; the full-weight dequantization
    temporary, ~0.26 GiB, is gone): at most a quarter of the old figure, the graph pool a sixteenth."""
    fake_gpu["allocated"] = int(5.28 * GiB) + memory.GRAPH_POOL_SLACK_BYTES  # + the dequantization scratch
    batched = memory.default_batched_tokens(10800 * MiB, 64)
    graph_tokens = memory.mixed_graph_tokens(10800 * MiB, batched, MIXED_MAX_TOKENS)
    old_activation = 1.66 * GiB
    activation = int(old_activation * batched / 8192) + memory.fragmentation_allowance(batched, 2 * 18944, 2)
    graphs = memory.graph_pool_reserve(int(old_activation * graph_tokens / 8192), mixed=True)
    plan = memory.plan_memory(DEV, 10800 * MiB, 0.9, 28 * 2 * 16 * 4 * 128 * 2, activation, graphs)
    kv_tokens = plan.num_blocks * 16
    assert plan.kv_bytes > 3 * GiB and kv_tokens >= 64 * 512, plan.describe()  # 64 sequences of 512 tokens fit
