"""Activation quantization for FP8 W8A8: one Triton kernel per call, one program per token row.

Dynamic: ``scale[m] = max(|x[m, :]|) / 448`` (at least 1e-12), ``q = x / scale`` in e4m3. Static: the
checkpoint's ``input_scale`` for every row. Returns ``(q [M, K] float8_e4m3fn, scale [M, 1] float32)`` as
``torch._scaled_mm`` takes them. No host sync, CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
