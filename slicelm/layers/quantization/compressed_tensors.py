"""compressed-tensors ``pack-quantized`` int weights (llm-compressor's W4A16 / W8A16): ``weight_packed`` int32
``[out, in * bits / 32]`` packed sequentially along the input dim with values stored as ``q + 2**(bits-1)``,
``weight_scale [out, groups]`` (``[out, 1]`` per channel), asymmetric ``weight_zero_point`` int32
``[out * bits / 32, groups]`` packed along the output dim (same offset), ``weight_g_idx [in]`` with
``actorder: group``, ``weight_shape``. W = (q - zero_point) * scale.

(The FP8 ``float-quantized`` schemes are ``fp8.Fp8LinearMethod``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slicelm.layers.quantization.base import ParamSpec
from slicelm.layers.quantization.int_weights import IntWeightMethod, UnpackedInt, unpack_rows

if TYPE_CHECKING:
    from slicelm.layers.linear import Linear


class CompressedTensorsIntMethod(IntWeightMethod):
    def param_specs(self, layer: Linear) -> dict[str, ParamSpec]:
        k, n, groups, pack = layer.in_features, layer.out_features, self.num_groups(layer), self.pack
        g, group_dim = self.group_size(layer), self.group_dim(1)
        specs = {
            "weight_packed": ParamSpec((n, -(-k // pack)), torch.int32, in_block=pack),
            "weight_scale": ParamSpec((n, groups), torch.float16, in_dim=group_dim, in_block=g),
            "weight_shape": ParamSpec((2,), torch.int64, per_shard=False, out_dim=None, required=False,
                                      in_dim=None),
        }
        if not self.scheme.symmetric:
            specs["weight_zero_point"] = ParamSpec((-(-n // pack), groups), torch.int32, out_block=pack,
                                                   in_dim=group_dim, in_block=g)
        if self.scheme.act_order:
            specs["weight_g_idx"] = ParamSpec((k,), torch.int32, out_dim=None, required=False, in_dim=0)
        return specs

    def load_weight(self, layer: Linear, name: str, tensor: torch.Tensor, shard: int | None) -> None:
        if name == "weight_shape":  # each shard's own [out, in]: checked, not kept
            rows = layer.out_features if shard is None else layer.output_sizes[shard]
            if int(tensor[1]) != layer.in_features or int(tensor[0]) != rows:
                raise ValueError(f"tensor {layer.prefix}.weight_shape of shard {shard} is {tensor.tolist()}, "
                                 f"expected {[rows, layer.in_features]}")
            return
        super().load_weight(layer, name, tensor, shard)

    def init_dummy(self, layer: Linear, gen: torch.Generator) -> None:
        super().init_dummy(layer, gen)
        if self.scheme.act_order:
            g = torch.arange(layer.in_features, device=layer.weight_g_idx.device) // self.group_size(layer)
            layer.weight_g_idx.copy_(g.to(torch.int32))

    def unpack(self, layer: Linear) -> UnpackedInt:
        n, k = layer.out_features, layer.in_features
        q = unpack_rows(layer.weight_packed, self.bits)[:, :k]
        zeros = None
        if not self.scheme.symmetric:
            zeros = unpack_rows(layer.weight_zero_point.t().contiguous(), self.bits)[:, :n].t().contiguous()
        g_idx = layer.weight_g_idx if self.scheme.act_order else None
        return UnpackedInt(q, zeros, layer.weight_scale, g_idx)
