"""Bandwidth-bound GEMV for small-batch decode: ``y = x @ W.T (+ b)`` with ``W`` an ``nn.Linear`` weight.

At batch 1 a projection reads every byte of ``W`` [N, K] once and does 2 FLOPs per element, so its
time is ``N * K * itemsize / HBM bandwidth``. cuBLAS picks tiles for matmuls at M=1 that leave
part of the bandwidth unused (and adds a split-K reduce launch on some shapes). Here each program
owns ``BLOCK_N`` rows of ``W`` (output columns), streams them over K in ``BLOCK_K`` chunks into an
fp32 ``[BLOCK_N, BLOCK_K]`` accumulator by elementwise FMAs (no tensor cores, no per-chunk
reductions) and reduces across K once at the end. No split-K, no atomics, no host syncs and no
allocation besides the output, so it is deterministic and CUDA-graph capturable. Rows past N are
clamped onto row N-1 for the loads (no load masks); only the store is masked.

Small M (2..4) reads each W tile once and keeps one accumulator per row of x (a 3-D tile);
``gemv_supported`` admits M <= ``GEMV_MAX_M`` only.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 1  # rows of x routed to the GEMV by gemv_supported; the kernel itself handles up to 4
_KERNEL_MAX_M = 4
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _gemv_kernel(X, W, B, OUT, M, N, K, stride_xm, stride_wn, stride_om,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamp instead of masking the W loads
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows[:, None] * stride_wn + offs_k[None, :]
    if BLOCK_M == 1:
        x_ptrs = X + offs_k
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                kmask = offs_k < K - k
                w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=kmask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(B + rows).to(tl.float32)
        tl.store(OUT + offs_n, y.to(OUT.dtype.element_ty), mask=offs_n < N)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        m_rows = tl.minimum(offs_m, M - 1)
        x_ptrs = X + m_rows[:, None] * stride_xm + offs_k[None, :]
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                kmask = offs_k < K - k
                w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            acc3 += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y2 = tl.sum(acc3, axis=2)  # [BLOCK_M, BLOCK_N]
        if HAS_BIAS:
            y2 += tl.load(B + rows).to(tl.float32)[None, :]
        o_ptrs = OUT + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, y2.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16  # CPU tensors only reach here under TRITON_INTERPRET=1


def default_config(n: int, k: int, num_sms: int) -> tuple[int, int, int, int]:
    """``(block_n, block_k, num_warps, num_stages)`` for an [N, K] weight at M=1.

    The largest ``block_n`` (of 32/16/8/4) that still gives >= 4 programs per SM, so every SM has
    several W streams in flight and the last partial wave is small; ``block_k`` keeps the fp32
    accumulator at <= 4096 elements (32 registers a thread at 4 warps).
    """
    block_n = 4
    for bn in (32, 16, 8):
        if triton.cdiv(n, bn) >= 4 * num_sms:
            block_n = bn
            break
    block_k = min(4096 // block_n, 512, max(triton.next_power_of_2(k), 16))
    return block_n, block_k, 4, 2


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when ``gemv(x, weight)`` applies: CUDA, 2-D ``x`` of 1..``GEMV_MAX_M`` rows, a row-major
    ``weight`` [N, K] of x's dtype (fp16/bf16/fp32), K a multiple of 8, and no autograd needed."""
    return (
        x.is_cuda
        and x.dim() == 2
        and weight.dim() == 2
        and 1 <= x.shape[0] <= GEMV_MAX_M
        and x.shape[1] == weight.shape[1]
        and x.shape[1] % 8 == 0
        and x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and weight.device == x.device
        and x.stride(1) == 1
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block_n: int | None = None,
         block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for x [M, K] (M <= 4), weight [N, K] row-major; fp32 accumulation,
    output [M, N] in x's dtype. Unset launch parameters come from ``default_config``."""
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= _KERNEL_MAX_M or weight.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"gemv: bad shapes x {tuple(x.shape)} weight {tuple(weight.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"gemv: bias must be contiguous of shape ({n},), got {tuple(bias.shape)}")
    bn, bk, nw, ns = default_config(n, k, _num_sms(x.device))
    block_n = block_n or bn
    block_k = block_k or bk
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps or nw, num_stages=num_stages or ns)
    return out
