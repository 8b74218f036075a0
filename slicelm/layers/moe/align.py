"""Token→expert alignment for the fused expert GEMMs (vLLM's ``moe_align_block_size``, in Triton).

The ``T * top_k`` (token, slot) pairs of a step are grouped by expert into blocks of ``block_m`` rows:
``sorted_ids`` lists flat pair indices ``t * top_k + j`` expert after expert, each expert's run padded
to a multiple of ``block_m`` with the sentinel ``T * top_k``; ``expert_ids[b]`` is the expert of block
``b`` (-1 past the end) and ``num_post_padded`` the used length. Sizes depend only on (T, top_k,
num_experts, block_m), never on the routing, so the three launches (count + fill, scan, scatter) are
CUDA-graph capturable. Within an expert the order of pairs is whatever the atomics give: every row is
computed on its own, so results do not depend on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


# Sizes change with the step's token count: unspecialized, so no variant is compiled mid-run.
@triton.jit(do_not_specialize=["num_pairs", "num_padded"])
def _count_kernel(topk_ids_ptr, counts_ptr, sorted_ids_ptr, num_pairs, num_padded, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(sorted_ids_ptr + offs, num_pairs, mask=offs < num_padded)  # sentinel everywhere first
    valid = offs < num_pairs
    ids = tl.load(topk_ids_ptr + offs, mask=valid, other=0)
    tl.atomic_add(counts_ptr + ids, 1, mask=valid)


@triton.jit(do_not_specialize=["num_blocks"])
def _scan_kernel(counts_ptr, cursor_ptr, expert_ids_ptr, num_post_padded_ptr, num_experts, num_blocks,
                 BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    offs_e = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    tl.store(cursor_ptr + offs_e, ends - padded, mask=offs_e < num_experts)
    tl.store(num_post_padded_ptr, total)
    ends = tl.where(offs_e < num_experts, ends, 2147483647)
    for b0 in range(0, num_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        start = blocks * BLOCK_M
        expert = tl.sum((ends[None, :] <= start[:, None]).to(tl.int32), 1)  # experts ending at or before
        expert = tl.where(start < total, expert, -1)
        tl.store(expert_ids_ptr + blocks, expert, mask=blocks < num_blocks)


@triton.jit(do_not_specialize=["num_pairs"])
def _scatter_kernel(topk_ids_ptr, cursor_ptr, sorted_ids_ptr, num_pairs, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < num_pairs
    ids = tl.load(topk_ids_ptr + offs, mask=valid, other=0)
    dest = tl.atomic_add(cursor_ptr + ids, 1, mask=valid)
    tl.store(sorted_ids_ptr + dest, offs, mask=valid)


def padded_sizes(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(length of sorted_ids, number of blocks): the worst case, every expert's run one row short."""
    num_padded = num_pairs + num_experts * (block_m - 1)
    return num_padded, triton.cdiv(num_padded, block_m)


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids int32 [T, top_k] -> (sorted_ids int32 [P], expert_ids int32 [B], num_post_padded int32 [1])."""
    assert topk_ids.dtype == torch.int32 and topk_ids.is_contiguous(), (topk_ids.dtype, topk_ids.stride())
    num_pairs = topk_ids.numel()
    num_padded, num_blocks = padded_sizes(num_pairs, num_experts, block_m)
    dev = topk_ids.device
    sorted_ids = torch.empty(num_padded, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    num_post_padded = torch.empty(1, dtype=torch.int32, device=dev)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    _count_kernel[(triton.cdiv(num_padded, _BLOCK),)](topk_ids, counts, sorted_ids, num_pairs, num_padded,
                                                       BLOCK=_BLOCK, num_warps=4)
    e_pad = triton.next_power_of_2(num_experts)
    _scan_kernel[(1,)](counts, cursor, expert_ids, num_post_padded, num_experts, num_blocks,
                       BLOCK_M=block_m, E_PAD=e_pad, CHUNK=max(16, 4096 // e_pad), num_warps=4)
    if num_pairs:
        _scatter_kernel[(triton.cdiv(num_pairs, _BLOCK),)](topk_ids, cursor, sorted_ids, num_pairs,
                                                           BLOCK=_BLOCK, num_warps=4)
    return sorted_ids, expert_ids, num_post_padded
