"""Triton kernel that writes one step's new key/value rows into the paged KV cache.

``kv_cache`` is ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (0 = K, 1 = V); token ``t``
goes to flat slot ``slot_mapping[t] = block_id * block_size + offset``. Negative slots are padding
and are skipped. One program per token copies all KV heads of K and V (2 * Hkv * D elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_c_blk,
    stride_c_tok,
    stride_c_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    tok64 = tok.to(tl.int64)
    src_k = key_ptr + tok64 * stride_k_t + offs_h[:, None] * stride_k_h + offs_d[None, :]
    src_v = value_ptr + tok64 * stride_v_t + offs_h[:, None] * stride_v_h + offs_d[None, :]
    dst = blk * stride_c_blk + off * stride_c_tok + offs_h[:, None] * stride_c_h + offs_d[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # int64 [T]; negative = skip
) -> None:
    """Write ``key``/``value`` row ``t`` to cache slot ``slot_mapping[t]`` (no host sync)."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache: expected [2, blocks, block_size, Hkv, D], got {tuple(kv_cache.shape)}")
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"value: shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    if tuple(kv_cache.shape[3:]) != (num_kv_heads, head_dim):
        got = tuple(kv_cache.shape[3:])
        raise ValueError(f"kv_cache: heads/head_dim {got} != key's {num_kv_heads, head_dim}")
    if slot_mapping.shape[0] < num_tokens:
        raise ValueError(f"slot_mapping: {slot_mapping.shape[0]} entries for {num_tokens} tokens")
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    block_size = kv_cache.shape[2]
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
