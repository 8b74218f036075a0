"""Activation quantization for FP8 W8A8: one Triton kernel per call, one program per token row.

Dynamic: ``scale[m] = max(|x[m, :]|) / 448`` (at least 1e-12), ``q = x / scale`` in e4m3. Static: the
checkpoint's ``input_scale`` for every row. Returns ``(q [M, K] float8_e4m3fn, scale [M, 1] float32)`` as
``torch._scaled_mm`` takes them. No host sync, CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slicelm.layers.quantization.int_tiles import gemm_tile_offsets, store_gemm_tile, x_tile

FP8_MAX = 448.0


@triton.jit
def _quant_rows_kernel(X, Q, S, STATIC, K, stride_x, stride_q, IS_STATIC: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    if IS_STATIC:
        scale = tl.load(STATIC).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK_K,), tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(X + row * stride_x + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0), 1e-12) / 448.0
    tl.store(S + row, scale)
    inv = 1.0 / scale
    for k in range(0, K, BLOCK_K):
        mask = k + offs < K
        x = tl.load(X + row * stride_x + k + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        tl.store(Q + row * stride_q + k + offs, q.to(Q.dtype.element_ty), mask=mask)


def quantize_activations(x: torch.Tensor, static_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (or static) e4m3 quantization of ``x [M, K]``."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    block_k = min(triton.next_power_of_2(k), 2048)
    _quant_rows_kernel[(m,)](x, q, s, static_scale if static_scale is not None else s, k, x.stride(0), q.stride(0),
                             IS_STATIC=static_scale is not None, BLOCK_K=block_k, num_warps=4 if k >= 1024 else 1)
    return q, s


def quantize_activations_ref(x: torch.Tensor, static_scale: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch definition of ``quantize_activations`` (tests)."""
    xf = x.float()
    if static_scale is None:
        s = (xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)) / FP8_MAX
    else:
        s = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    return (xf * (1.0 / s)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


# ------------------------------------------------------------------ block-scaled FP8 weights (weight-only)
@triton.jit
def _fp8_block_tile(W, S, rows, k0, K, stride_w, stride_s, BSN: tl.constexpr, BSK: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """W[rows, k0:k0+BLOCK_K] * its block scale, float32 (BLOCK_K divides the scale block BSK)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = tl.load(W + rows[:, None] * stride_w + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
    s = tl.load(S + (rows // BSN) * stride_s + k0 // BSK)
    return w.to(tl.float32) * s[:, None]


@triton.jit(do_not_specialize=["M", "N", "K"])
def _fp8_block_gemm_kernel(X, W, S, B, OUT, M, N, K, stride_xm, stride_om, stride_w, stride_s,
                           BSN: tl.constexpr, BSK: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m, offs_n, rows, offs_k, m_mask = gemm_tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_tile(X, offs_m, m_mask, k0 + offs_k, K, stride_xm)
        w = _fp8_block_tile(W, S, rows, k0, K, stride_w, stride_s, BSN, BSK, BLOCK_K)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    store_gemm_tile(OUT, acc, B, rows, offs_m, offs_n, m_mask, N, stride_om, HAS_BIAS)


@triton.jit
def _fp8_block_dequant_kernel(W, S, OUT, N, K, stride_w, stride_s, stride_o, BSN: tl.constexpr,
                              BSK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w = _fp8_block_tile(W, S, rows, k0, K, stride_w, stride_s, BSN, BSK, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(OUT + rows[:, None] * stride_o + offs_k[None, :], w.to(OUT.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


FP8_GEMM_MAX_M = 256


def fp8_block_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ (w * block scales).T + bias`` for e4m3 ``w [N, K]`` and ``scale [ceil(N/bn), ceil(K/bk)]``:
    dequantized inside the K loop of a tensor-core GEMM (M <= 256), else once to a scratch + cuBLAS."""
    m, k = x.shape
    n = w.shape[0]
    bsn, bsk = block
    block_k = min(128, bsk)
    assert bsk % block_k == 0, block
    if x.stride(1) != 1:
        x = x.contiguous()
    scale = scale.float().contiguous()
    if m > FP8_GEMM_MAX_M:
        deq = torch.empty((n, k), dtype=x.dtype, device=x.device)
        _fp8_block_dequant_kernel[(triton.cdiv(n, 64), triton.cdiv(k, block_k))](
            w, scale, deq, n, k, w.stride(0), scale.stride(0), deq.stride(0), BSN=bsn, BSK=bsk, BLOCK_N=64,
            BLOCK_K=block_k, num_warps=4)
        return torch.nn.functional.linear(x, deq, bias)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 64 if block_m <= 64 else 128
    _fp8_block_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, w, scale, bias if bias is not None else scale, out, m, n, k, x.stride(0), out.stride(0), w.stride(0),
        scale.stride(0), BSN=bsn, BSK=bsk, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=4, num_stages=3)
    return out
