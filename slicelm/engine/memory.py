"""GPU memory budget: one absolute byte count per engine, planned before the KV cache exists.

Budget = the smallest of ``--gpu-memory-budget``, ``--gpu-memory-utilization`` × device memory and
the memory of this process's GPU slice (``slicelm.slicing``: a stack's ``SLICELM_SLICE_*`` env or
HAMi-core's ``CUDA_DEVICE_MEMORY_LIMIT_<i>``) when it has one. Inside it the
plan is: weights (measured) + peak activation of the largest step (measured by a profiling run) +
CUDA-graph pool (reserved) + KV blocks (the rest). The caching allocator is then capped at the
budget, so the engine cannot grow past it afterwards.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from slicelm.slicing.spec import Slice, slice_from_env

logger = logging.getLogger(__name__)

GiB = 1 << 30


class MemoryBudgetError(ValueError):
    """The model does not fit in the memory budget."""


def process_gpu_memory(device_index: int) -> int | None:
    """This process's memory on the GPU as the driver counts it (NVML), or None where NVML can't tell."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(device_index))
        pid = os.getpid()
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
    except pynvml.NVMLError:
        return None
    return None


def _physical_index(device_index: int) -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if device_index < len(ids) and ids[device_index].isdigit():
            return int(ids[device_index])
    return device_index


# What the CUDA context, cuBLAS workspaces and kernels' modules take beside torch's allocator when the
# driver cannot tell us per process (measured ~0.5 GiB on an H100/H200 with torch 2.11).
DEFAULT_NON_TORCH_BYTES = 768 << 20
# Memory outside torch's allocator keeps growing a little after planning (Triton modules loaded on first
# use, cuBLAS workspaces for new shapes: ~100 MiB seen on an H200); the plan keeps this much free for it.
NON_TORCH_GROWTH_BYTES = 256 << 20


# vLLM's defaults for --max-num-batched-tokens (API server): 8192 on a GPU of >= 70 GiB, 2048 below. Here the
# rule reads the engine's budget (a 10.8 GB slice of any GPU gets the small-GPU default); CPU engines take 2048.
LARGE_BUDGET_BYTES = 70 * GiB
# vLLM's largest CUDA-graph batch (max_cudagraph_capture_size = min(2 * max_num_seqs, 512)): mixed steps are
# captured up to this many tokens only on budgets under LARGE_BUDGET_BYTES, whose graph pool must stay small.
SMALL_BUDGET_MAX_GRAPH_TOKENS = 512
# what the caching allocator rounds up and splits around the profiled tensors of a graph pool
GRAPH_POOL_SLACK_BYTES = 64 << 20


def default_batched_tokens(budget_bytes: int | None, max_num_seqs: int) -> int:
    """``--max-num-batched-tokens`` when not given: vLLM's rule on the budget (None: CPU), >= max_num_seqs."""
    large = budget_bytes is not None and budget_bytes >= LARGE_BUDGET_BYTES
    return max(8192 if large else 2048, max_num_seqs)


def mixed_graph_tokens(budget_bytes: int, max_num_batched_tokens: int, mixed_max_tokens: int) -> int:
    """The largest mixed step to capture in a CUDA graph: bounded by what the budget affords."""
    top = min(max_num_batched_tokens, mixed_max_tokens)
    return top if budget_bytes >= LARGE_BUDGET_BYTES else min(top, SMALL_BUDGET_MAX_GRAPH_TOKENS)


def fragmentation_allowance(num_tokens: int, widest_output: int, itemsize: int) -> int:
    """One block of a step's largest tensor (``[num_tokens, widest linear output]``). The profiling step starts
    from an empty cache; later steps of other sizes split the cached blocks, and under the budget's cap the
    allocator cannot add a segment when the free bytes are scattered (an 8B AWQ engine at 16384 tokens failed
    to place its 896 MiB gate/up output with 840 MiB free in pieces): the plan keeps one such block free."""
    return num_tokens * widest_output * itemsize


def graph_pool_reserve(graph_step_peak_bytes: int, mixed: bool) -> int:
    """The graphs share one pool, captured largest first, so it holds at least the largest captured step's
    tensors (each capture's warm-up runs beside it on the activation reserve, idle while graphs are captured).
    With mixed graphs the pool holds a ladder of step shapes (13 token counts up to 8192, then the decode
    batches) whose tensors do not nest exactly: it is reserved at twice the largest step — a margin, not a
    measurement (on an H200 an 8B model's pool reached 2.02 GiB for 8192-token mixed graphs). It is small where
    it matters: budgets under LARGE_BUDGET_BYTES capture mixed steps of at most 512 tokens."""
    return graph_step_peak_bytes * (2 if mixed else 1) + GRAPH_POOL_SLACK_BYTES


@dataclass
class MemoryPlan:
    budget_bytes: int
    weights_bytes: int
    activation_bytes: int
    graph_pool_bytes: int
    kv_bytes: int
    num_blocks: int
    source: str
    non_torch_bytes: int = 0

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"
        return (
            f"memory plan ({self.source}): budget {g(self.budget_bytes)} = weights {g(self.weights_bytes)}"
            f" + activations {g(self.activation_bytes)} + cuda graphs {g(self.graph_pool_bytes)}"
            f" + CUDA context etc. {g(self.non_torch_bytes)}"
            f" + KV cache {g(self.kv_bytes)} ({self.num_blocks} blocks)"
        )


def resolve_budget(device: torch.device, budget: int | None, utilization: float,
                   gpu_slice: Slice | None = None) -> tuple[int, str]:
    """``gpu_slice`` defaults to the one this process's env describes (``slice_from_env``)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    candidates = [(int(total * utilization), f"gpu_memory_utilization={utilization}")]
    if budget is not None:
        candidates.append((budget, "gpu_memory_budget"))
    if gpu_slice is None:
        gpu_slice = slice_from_env(os.environ, index)
    if gpu_slice is not None and gpu_slice.memory_bytes is not None:
        candidates.append((gpu_slice.memory_bytes, f"GPU slice ({gpu_slice.source})"))
    return min(candidates)


def plan_memory(
    device: torch.device,
    budget: int | None,
    utilization: float,
    bytes_per_block: int,
    activation_bytes: int,
    graph_pool_bytes: int,
    gpu_slice: Slice | None = None,
) -> MemoryPlan:
    """Call after the weights are loaded and the profiling step ran (its peak is in ``activation_bytes``)."""
    budget_bytes, source = resolve_budget(device, budget, utilization, gpu_slice)
    weights = torch.cuda.memory_allocated(device)
    # What torch's allocator does not see (CUDA context, cuBLAS workspaces) counts as well. Other
    # processes on the same GPU (another engine beside us) must not: we ask NVML for this process only.
    index = device.index if device.index is not None else torch.cuda.current_device()
    used = process_gpu_memory(index)
    reserved = torch.cuda.memory_reserved(device)
    non_torch = max(0, used - reserved) if used is not None else DEFAULT_NON_TORCH_BYTES
    non_torch += NON_TORCH_GROWTH_BYTES
    # the cap (cap_allocator) bounds what the allocator reserves: memory it holds in segments that a live
    # tensor pins (a previous engine's leftovers in this process) is as unavailable as the weights
    stranded = max(0, reserved - weights)
    kv_bytes = budget_bytes - weights - stranded - activation_bytes - graph_pool_bytes - non_torch
    num_blocks = kv_bytes // bytes_per_block
    plan = MemoryPlan(budget_bytes, weights, activation_bytes, graph_pool_bytes, max(kv_bytes, 0),
                      max(num_blocks, 0), source, non_torch)
    if num_blocks < 1:
        raise MemoryBudgetError(
            f"the model does not fit: {plan.describe()} leaves no room for KV cache; raise the budget or "
            "lower max_num_batched_tokens / max_num_seqs"
        )
    return plan


def cap_allocator(device: torch.device, budget_bytes: int, non_torch_bytes: int) -> None:
    """Makes the caching allocator refuse to grow this process past the budget."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max(0, budget_bytes - non_torch_bytes) / total), device)
