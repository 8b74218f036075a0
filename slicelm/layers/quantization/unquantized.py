"""The unquantized linear method: a 16/32-bit ``weight [out, in]``; small-batch CUDA calls run the Triton
GEMV (``layers/triton/gemv.py``), everything else ``F.linear``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.layers.fused import fused_ops_for
from slicelm.layers.quantization.base import LinearMethod, ParamSpec

if TYPE_CHECKING:
    from slicelm.layers.linear import Linear


class UnquantizedLinearMethod(LinearMethod):
    quantized = False

    def param_specs(self, layer: Linear) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec((layer.out_features, layer.in_features), None)}

    def create_weights(self, layer: Linear) -> None:
        super().create_weights(layer)
        layer.weight.requires_grad_(True)  # a plain nn.Linear parameter (nn.Linear's init below)
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ops = fused_ops_for(x)
        if ops is not None and ops.gemv_supported(x, layer.weight):
            return ops.gemv(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)
