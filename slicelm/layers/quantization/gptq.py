"""GPTQ (AutoGPTQ / GPTQModel): ``qweight`` int32 ``[in * bits / 32, out]`` packed sequentially along the input
dim, ``qzeros`` int32 ``[groups, out * bits / 32]`` packed along the output dim holding ``zero - 1``
(``checkpoint_format: gptq_v2``: the zero itself), fp16 ``scales [groups, out]``, ``g_idx [in]`` (the group of
each input row; a permutation with ``desc_act``). Symmetric checkpoints use zero ``2**(bits-1)``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slicelm.layers.quantization.base import ParamSpec
from slicelm.layers.quantization.config import IntWeightScheme
from slicelm.layers.quantization.int_weights import IntWeightMethod, UnpackedInt, unpack_rows

if TYPE_CHECKING:
    from slicelm.layers.linear import Linear


class GPTQLinearMethod(IntWeightMethod):
    def __init__(self, scheme: IntWeightScheme, v2_zeros: bool = False) -> None:
        super().__init__(scheme)
        self.v2_zeros = v2_zeros

    def param_specs(self, layer: Linear) -> dict[str, ParamSpec]:
        k, n, groups, pack = layer.in_features, layer.out_features, self.num_groups(layer), self.pack
        if k % pack:
            raise ValueError(f"{layer.prefix}: GPTQ needs in_features divisible by {pack}, got {k}")
        g, gdim = self.group_size(layer), self.group_dim(0)
        return {
            "qweight": ParamSpec((k // pack, n), torch.int32, out_dim=1, in_dim=0, in_block=pack),
            "qzeros": ParamSpec((groups, -(-n // pack)), torch.int32, out_dim=1, out_block=pack, in_dim=gdim,
                                in_block=g),
            "scales": ParamSpec((groups, n), torch.float16, out_dim=1, in_dim=gdim, in_block=g),
            "g_idx": ParamSpec((k,), torch.int32, out_dim=None, required=False, in_dim=0),
        }

    def init_dummy(self, layer: Linear, gen: torch.Generator) -> None:
        super().init_dummy(layer, gen)
        g = torch.arange(layer.in_features, device=layer.g_idx.device) // self.group_size(layer)
        layer.g_idx.copy_(g.to(torch.int32))

    def unpack(self, layer: Linear) -> UnpackedInt:
        n = layer.out_features
        q = unpack_rows(layer.qweight.t().contiguous(), self.bits)  # [N, K]
        zeros = None
        if not self.scheme.symmetric:
            z = unpack_rows(layer.qzeros, self.bits)[:, :n].to(torch.int16)
            zeros = (z if self.v2_zeros else z + 1).t().contiguous()
        g_idx = layer.g_idx if self.scheme.act_order else None
        return UnpackedInt(q, zeros, layer.scales.t().contiguous(), g_idx)
