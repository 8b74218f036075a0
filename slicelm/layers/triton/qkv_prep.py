"""One kernel between the qkv_ptr projection and attention: qk-norm, rotary, and the KV-cache store.

Per token it reads the fused ``qkv`` row, applies the per-head RMSNorm of q and k (Qwen3; skipped
when the model has none), rotates q and k (neox style, full head), writes q to a fresh ``[T, Hq, D]``
tensor and k, v straight into their paged-cache slot (``slot_mapping``; negative slots are padding
and skipped). It replaces four launches per layer (two norms with their reshape copies, rotary, KV
store) and rounds where those kernels round: the norm's output is rounded to the model dtype before
its weight multiplies it and again after, rotary computes in float32 from those values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _head_norm(x1, x2, w_ptr, offs, eps, D: tl.constexpr, HALF: tl.constexpr, DT: tl.constexpr):
    """RMSNorm over each row's two halves ``x1``/``x2`` [heads, HALF] (float32 in and out)."""
    var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D
    rstd = tl.rsqrt(var + eps)[:, None]
    w1 = tl.load(w_ptr + offs).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + offs).to(tl.float32)[None, :]
    y1 = (x1 * rstd).to(DT).to(tl.float32)
    y2 = (x2 * rstd).to(DT).to(tl.float32)
    return (y1 * w1).to(DT).to(tl.float32), (y2 * w2).to(DT).to(tl.float32)


@triton.jit
def _qkv_prep_kernel(
    qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, slots_ptr, cos_sin_ptr, qw_ptr, kw_ptr,
    stride_qkv, stride_qo, stride_cs, stride_c_blk, stride_c_tok, stride_c_h, eps,
    HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_SIZE: tl.constexpr, QK_NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dt = q_out_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs).to(tl.float32)[None, :]
    row = qkv_ptr + t * stride_qkv

    hq = tl.arange(0, BLOCK_HQ)[:, None]
    mq = hq < HQ
    x1 = tl.load(row + hq * D + offs[None, :], mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(row + hq * D + HALF + offs[None, :], mask=mq, other=0.0).to(tl.float32)
    if QK_NORM:
        x1, x2 = _head_norm(x1, x2, qw_ptr, offs, eps, D, HALF, dt)
    q_out = q_out_ptr + t * stride_qo + hq * D + offs[None, :]
    tl.store(q_out, (x1 * cos - x2 * sin).to(dt), mask=mq)
    tl.store(q_out + HALF, (x2 * cos + x1 * sin).to(dt), mask=mq)

    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        hk = tl.arange(0, BLOCK_HK)[:, None]
        mk = hk < HK
        k_row = row + HQ * D + hk * D + offs[None, :]
        k1 = tl.load(k_row, mask=mk, other=0.0).to(tl.float32)
        k2 = tl.load(k_row + HALF, mask=mk, other=0.0).to(tl.float32)
        if QK_NORM:
            k1, k2 = _head_norm(k1, k2, kw_ptr, offs, eps, D, HALF, dt)
        dst = (slot // BLOCK_SIZE) * stride_c_blk + (slot % BLOCK_SIZE) * stride_c_tok + hk * stride_c_h
        dst = dst + offs[None, :]
        cdt = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + dst, (k1 * cos - k2 * sin).to(dt).to(cdt), mask=mk)
        tl.store(k_cache_ptr + dst + HALF, (k2 * cos + k1 * sin).to(dt).to(cdt), mask=mk)
        v_row = row + (HQ + HK) * D + hk * D + offs[None, :]
        tl.store(v_cache_ptr + dst, tl.load(v_row, mask=mk).to(cdt), mask=mk)
        tl.store(v_cache_ptr + dst + HALF, tl.load(v_row + HALF, mask=mk).to(cdt), mask=mk)


def qkv_prep_supported(head_dim: int, rotary_dim: int) -> bool:
    half = rotary_dim // 2
    return rotary_dim == head_dim and half >= 8 and half & (half - 1) == 0


def qkv_norm_rope_store(
    qkv: torch.Tensor,  # [T, (Hq + 2 * Hk) * D]
    positions: torch.Tensor,  # [T]
    cos_sin: torch.Tensor,  # [max_position, D]: cos in the first half, sin in the second
    q_norm_weight: torch.Tensor | None,  # [D] or None (no qk-norm)
    k_norm_weight: torch.Tensor | None,
    eps: float,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hk, D]
    slot_mapping: torch.Tensor,  # int64 [>= T]
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """q [T, Hq, D] normed and rotated; k (normed, rotated) and v written into ``kv_cache``."""
    t = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qkv: expected a row-contiguous [T, {(num_heads + 2 * num_kv_heads) * head_dim}] "
                         f"tensor, got {tuple(qkv.shape)}")
    if kv_cache.dim() != 5 or tuple(kv_cache.shape[3:]) != (num_kv_heads, head_dim):
        raise ValueError(f"kv_cache: expected [2, blocks, block_size, {num_kv_heads}, {head_dim}], "
                         f"got {tuple(kv_cache.shape)}")
    if slot_mapping.shape[0] < t:
        raise ValueError(f"slot_mapping: {slot_mapping.shape[0]} entries for {t} tokens")
    q = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    qk_norm = q_norm_weight is not None
    assert qk_norm == (k_norm_weight is not None)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    _qkv_prep_kernel[(t,)](
        qkv, q, k_cache, v_cache, positions, slot_mapping, cos_sin,
        q_norm_weight if qk_norm else qkv, k_norm_weight if qk_norm else qkv,
        qkv.stride(0), q.stride(0), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), eps,
        HQ=num_heads, HK=num_kv_heads, D=head_dim, HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=kv_cache.shape[2], QK_NORM=qk_norm, num_warps=4,
    )
    return q
