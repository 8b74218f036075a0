"""Dequantize + cuBLAS for the int4 / int8 linears at large M (prefill chunks, and the M buckets where the
per-device sweep found it faster than the fused GEMM): ``_dequant_kernel`` writes W, ``DEQUANT_SCRATCH_BYTES`` of
rows at a time (or a tuned slab), to one shared scratch in x's dtype and cuBLAS multiplies each slab into its
columns of the output (what vLLM does past 256 tokens, without a full-weight temporary)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slicelm.layers.quantization.int_tiles import ONE_BITS, dequant_tile


@triton.jit(do_not_specialize=["ONE"])
def _dequant_kernel(WQ, S, Z, OUT, N, K, stride_w, stride_s, stride_o, ONE, BITS: tl.constexpr, GROUP: tl.constexpr,
                    HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w = dequant_tile(WQ, S, Z, rows, k0, K, stride_w, stride_s, ONE, BITS, GROUP, HAS_ZP, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(OUT + rows[:, None] * stride_o + offs_k[None, :], w.to(OUT.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


@torch.no_grad()  # out= products refuse arguments that require grad (a layer's bias Parameter outside inference mode)
def dequant_matmul(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   k: int, bias: torch.Tensor | None, out: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """``out = x @ W.T + bias`` for large M, ``rows`` weight rows at a time (default: ``DEQUANT_SCRATCH_BYTES`` of
    them) dequantized into one scratch per device and dtype (allocated once, on the first large step: the memory
    profile's) — no full-size weight temporary, so no transient allocation in the step beyond ``out`` itself.
    Slabs small enough to stay in L2 are read by cuBLAS from there; ``quant_sweep.py`` picks the size per bucket."""
    n = w_q.shape[0]
    if rows is None:
        rows = DEQUANT_SCRATCH_BYTES // (k * x.element_size())
    rows = min(n, max(32, rows // 32 * 32))
    scratch = _scratch(x.device, x.dtype, rows * k)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = scratch[: (n1 - n0) * k].view(n1 - n0, k)
        _dequantize_into(w, w_q[n0:n1], scales[n0:n1], zeros[n0:n1] if zeros is not None else None, bits, k)
        if bias is None:
            torch.mm(x, w.t(), out=out[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], x, w.t(), out=out[:, n0:n1])
    return out


# the dequantized weight rows of one large-M matmul step live here (bf16: 8192 rows of K = 4096 per step)
DEQUANT_SCRATCH_BYTES = 64 << 20
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """One flat buffer per (device, dtype), grown (never shrunk) to ``numel``."""
    t = _SCRATCH.get((device, dtype))
    if t is None or t.numel() < numel:
        _SCRATCH.pop((device, dtype), None)
        t = torch.empty(max(numel, DEQUANT_SCRATCH_BYTES // dtype.itemsize), dtype=dtype, device=device)
        _SCRATCH[(device, dtype)] = t
    return t


def _dequantize_into(out: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, k: int) -> None:
    n = w_q.shape[0]
    group = k // scales.shape[1]
    block_k = max(min(group, 256), 32 // bits * 8)
    zp = zeros if zeros is not None else scales
    _dequant_kernel[(triton.cdiv(n, 32), triton.cdiv(k, block_k))](
        w_q, scales, zp, out, n, k, w_q.stride(0), scales.stride(0), out.stride(0), ONE_BITS, BITS=bits, GROUP=group,
        HAS_ZP=zeros is not None, BLOCK_N=32, BLOCK_K=block_k, num_warps=4)


def dequantize_weight(w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, k: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` (one kernel)."""
    out = torch.empty((w_q.shape[0], k), dtype=dtype, device=w_q.device)
    _dequantize_into(out, w_q, scales, zeros, bits, k)
    return out
