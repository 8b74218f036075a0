"""Fused element-wise kernels for the decode hot path: one launch instead of a dozen small ones.

At batch 1 a Llama layer's matmuls are memory-bound and fast; what is left is the launch count of
the glue between them (RMSNorm + residual, rotary, SiLU·up). Each op here is one Triton kernel
that rounds where torch rounds (model dtype after each op the reference does in it), so results
stay within bf16 rounding of the torch reference path in ``layers/norm.py`` etc.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, OUT, RES_OUT, stride_x, stride_r, stride_o, stride_ro, N, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    y = (x * rstd).to(OUT.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (y * w).to(OUT.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``; rows are the last dim."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    if residual is None:
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, n, eps,
                                         HAS_RES=False, BLOCK=block, num_warps=warps)
        return out.view(shape)
    r2 = residual.reshape(-1, n)
    res_out = torch.empty_like(out)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0),
                                     res_out.stride(0), n, eps, HAS_RES=True, BLOCK=block, num_warps=warps)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _rope_kernel(Q, K, POS, COS_SIN, stride_q, stride_k, stride_cs,
                 HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    offs = tl.arange(0, HALF)
    cos = tl.load(COS_SIN + pos * stride_cs + offs).to(tl.float32)[None, :]
    sin = tl.load(COS_SIN + pos * stride_cs + HALF + offs).to(tl.float32)[None, :]
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    mq = hq < HQ
    base = Q + t * stride_q + hq * D + offs[None, :]
    x1 = tl.load(base, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mq, other=0.0).to(tl.float32)
    tl.store(base, (x1 * cos - x2 * sin).to(Q.dtype.element_ty), mask=mq)
    tl.store(base + HALF, (x2 * cos + x1 * sin).to(Q.dtype.element_ty), mask=mq)
    hk = tl.arange(0, BLOCK_HK)[:, None]
    mk = hk < HK
    base = K + t * stride_k + hk * D + offs[None, :]
    x1 = tl.load(base, mask=mk, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mk, other=0.0).to(tl.float32)
    tl.store(base, (x1 * cos - x2 * sin).to(K.dtype.element_ty), mask=mk)
    tl.store(base + HALF, (x2 * cos + x1 * sin).to(K.dtype.element_ty), mask=mk)


def rope_supported(head_dim: int, rotary_dim: int) -> bool:
    half = rotary_dim // 2
    return rotary_dim == head_dim and half >= 8 and half & (half - 1) == 0


def apply_rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
                head_dim: int) -> None:
    """Neox rotary in place on q [T, Hq*D] and k [T, Hk*D] (row-strided views are fine)."""
    t = q.shape[0]
    if t == 0:
        return
    q2, k2 = q.reshape(t, -1), k.reshape(t, -1)
    assert q2.stride(-1) == 1 and k2.stride(-1) == 1
    assert q2.data_ptr() == q.data_ptr() and k2.data_ptr() == k.data_ptr(), "rope needs views, not copies"
    hq, hk = q2.shape[1] // head_dim, k2.shape[1] // head_dim
    _rope_kernel[(t,)](q2, k2, positions, cos_sin, q2.stride(0), k2.stride(0), cos_sin.stride(0),
                       HQ=hq, HK=hk, D=head_dim, HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(hq),
                       BLOCK_HK=triton.next_power_of_2(hk), num_warps=4)


@triton.jit
def _silu_mul_kernel(X, OUT, stride_x, stride_o, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + D + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (s * u).to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = 1024
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), out.stride(0), d,
                                                               BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], d)


from slicelm.layers.triton.gemv import gemv, gemv_supported  # noqa: E402, F401
from slicelm.layers.triton.qkv_prep import qkv_norm_rope_store, qkv_prep_supported  # noqa: E402, F401
