"""``nn.Linear`` whose small-batch CUDA forward runs the Triton GEMV (``layers/triton/gemv.py``).

At decode batch 1 a projection is a matrix-vector product bound by reading the weight; cuBLAS
leaves bandwidth unused there (and adds a split-K reduce launch on some shapes). Everything else
(CPU, prefill, unsupported dtypes/layouts, ``SLICELM_DISABLE_FUSED_OPS=1``, autograd) uses
``F.linear``. Same parameters and state-dict keys as ``nn.Linear``, so it is a drop-in swap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.layers.fused import fused_ops_for


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops_for(x)
        if ops is not None and ops.gemv_supported(x, self.weight):
            return ops.gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
