"""AWQ (AutoAWQ's GEMM layout): ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32 ``[in/G, out/8]`` packed
along the output dim in AWQ's interleaved order (nibble ``i`` of word ``c`` holds column
``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``), fp16 ``scales [in/G, out]``; W[k, n] = (q - z) * s, ``y = x @ W``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slicelm.layers.quantization.base import ParamSpec
from slicelm.layers.quantization.int_weights import IntWeightMethod, UnpackedInt, unpack_rows

if TYPE_CHECKING:
    from slicelm.layers.linear import Linear

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i -> column offset within its word
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column offset j -> the nibble holding it


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C/8]`` in AWQ's interleaved order -> uint8 ``[R, C]`` in column order."""
    nibbles = unpack_rows(packed, 4).reshape(packed.shape[0], -1, 8)
    return nibbles[:, :, list(AWQ_UNPACK_ORDER)].reshape(packed.shape[0], -1)


class AWQLinearMethod(IntWeightMethod):
    def param_specs(self, layer: Linear) -> dict[str, ParamSpec]:
        k, n, groups = layer.in_features, layer.out_features, self.num_groups(layer)
        for size in layer.output_sizes:
            if size % 8:
                raise ValueError(f"{layer.prefix}: AWQ needs output sizes that are multiples of 8, got {size}")
        g, gdim = self.group_size(layer), self.group_dim(0)
        return {
            "qweight": ParamSpec((k, n // 8), torch.int32, out_dim=1, out_block=8, in_dim=0),
            "qzeros": ParamSpec((groups, n // 8), torch.int32, out_dim=1, out_block=8, in_dim=gdim, in_block=g),
            "scales": ParamSpec((groups, n), torch.float16, out_dim=1, in_dim=gdim, in_block=g),
        }

    def unpack(self, layer: Linear) -> UnpackedInt:
        q = awq_unpack(layer.qweight).t().contiguous()
        zeros = awq_unpack(layer.qzeros).t().contiguous()
        return UnpackedInt(q, zeros, layer.scales.t().contiguous())
