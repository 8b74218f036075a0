"""Gated activations on merged gate/up projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.layers.fused import fused_ops_for


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of last dim ``2 * d`` (gate first, then up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops_for(x)
        if ops is not None:
            return ops.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluAndMul(nn.Module):
    """``gelu_tanh(x[..., :d]) * x[..., d:]`` (Gemma's GeGLU, transformers' ``gelu_pytorch_tanh``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]
