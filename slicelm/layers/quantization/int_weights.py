"""What AWQ, GPTQ and compressed-tensors int weights share: one internal layout and its apply path.

Each format's method unpacks its checkpoint tensors into ``UnpackedInt`` (unsigned values ``q [N, K]``, zero
points and scales per ``[N, group]``, an optional act-order ``g_idx``) and the common code repacks them once
into the layout the kernels read (vLLM repacks these formats to Marlin in the same way):

* ``w_q`` int32 ``[N, K / pack]``: ``pack = 32 / bits`` values per word, sequential along K (value ``j`` of a
  word at bits ``bits * j``), input columns sorted by group when the checkpoint has act-order;
* ``w_scales [N, groups]`` in the checkpoint's scale dtype, ``w_zeros [N, groups]`` uint8 (int16 if a zero
  does not fit) or none for symmetric schemes (zero ``2**(bits-1)``), ``w_perm [K]`` (act-order) or none.

W[n, k] = (q[n, k] - zero[n, k // G]) * scale[n, k // G]; ``y = x[:, perm] @ W.T``. On CUDA the Triton
kernels of ``int_kernels.py`` compute it without materialising W (except for large M, where dequantizing
once to a scratch and calling cuBLAS is fastest); elsewhere ``dequantize`` does, in float32.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.layers.quantization.base import LinearMethod
from slicelm.layers.quantization.config import IntWeightScheme, QuantizationError

if TYPE_CHECKING:
    from slicelm.layers.linear import Linear


@dataclass
class UnpackedInt:
    q: torch.Tensor  # uint8 [N, K]: unsigned quantized values
    zeros: torch.Tensor | None  # int [N, groups] unsigned zero points; None = 2**(bits-1)
    scales: torch.Tensor  # [N, groups]
    g_idx: torch.Tensor | None = None  # int [K]: group of input column k (act-order), None = k // G


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[R, C]`` with ``32/bits`` values per word sequential along C -> uint8 ``[R, C * 32/bits]``."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=packed.device, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0], -1).to(torch.uint8)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``unpack_rows``: uint8 ``[R, C]`` (C a multiple of ``32/bits``) -> int32 ``[R, C * bits / 32]``."""
    pack = 32 // bits
    r, c = q.shape
    assert c % pack == 0, (c, pack)
    shifts = torch.arange(pack, device=q.device, dtype=torch.int64) * bits
    words = (q.reshape(r, c // pack, pack).to(torch.int64) << shifts).sum(-1)
    return (((words + (1 << 31)) % (1 << 32)) - (1 << 31)).to(torch.int32)


def dequantize(w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               in_features: int) -> torch.Tensor:
    """W ``[N, K]`` float32 from the internal layout (columns in ``w_perm`` order)."""
    q = unpack_rows(w_q, bits)[:, :in_features].float()
    groups = scales.shape[1]
    g = torch.arange(in_features, device=w_q.device) // (in_features // groups)
    z = zeros.float()[:, g] if zeros is not None else float(1 << (bits - 1))
    return (q - z) * scales.float()[:, g]


class IntWeightMethod(LinearMethod):
    """Base of the AWQ / GPTQ / compressed-tensors int methods: subclasses name the checkpoint tensors
    (``param_specs``) and decode them (``unpack``)."""

    def __init__(self, scheme: IntWeightScheme) -> None:
        self.scheme = scheme
        self.bits = scheme.bits
        self.pack = 32 // scheme.bits

    def group_size(self, layer: Linear) -> int:
        g = layer.in_features if self.scheme.group_size == -1 else self.scheme.group_size
        if layer.in_features % g:
            raise QuantizationError(f"{layer.prefix}: in_features {layer.in_features} is not a multiple of "
                                    f"group_size {g}")
        return g

    def group_dim(self, dim: int) -> int | None:
        """The input dim of a per-group tensor (scales, zeros); None per channel: one group spans every input."""
        return dim if self.scheme.group_size != -1 else None

    def num_groups(self, layer: Linear) -> int:
        return layer.in_features // self.group_size(layer)

    @abstractmethod
    def unpack(self, layer: Linear) -> UnpackedInt:
        """The checkpoint tensors of ``layer`` decoded (call before they are replaced)."""

    def process_weights_after_loading(self, layer: Linear) -> None:
        u = self.unpack(layer)
        for name in list(layer.param_specs):
            delattr(layer, name)
        k = layer.in_features
        perm = None
        if u.g_idx is not None and not torch.equal(
                u.g_idx.long(), torch.arange(k, device=u.g_idx.device) // self.group_size(layer)):
            perm = torch.argsort(u.g_idx.long(), stable=True)
            sorted_groups = u.g_idx.long()[perm]
            if not torch.equal(sorted_groups, torch.arange(k, device=perm.device) // self.group_size(layer)):
                raise QuantizationError(f"{layer.prefix}: g_idx does not give every group exactly "
                                        f"{self.group_size(layer)} input columns")
            u.q = u.q[:, perm]
        if k % self.pack:
            raise QuantizationError(f"{layer.prefix}: in_features {k} is not a multiple of {self.pack}")
        zeros = u.zeros
        if zeros is not None:
            zeros = zeros.to(torch.uint8 if int(zeros.max()) <= 255 else torch.int16)
        self._register(layer, "w_q", pack_rows(u.q, self.bits))
        self._register(layer, "w_scales", u.scales.contiguous())
        self._register(layer, "w_zeros", zeros.contiguous() if zeros is not None else None)
        self._register(layer, "w_perm", perm)
        layer.param_specs = {}

    @staticmethod
    def _register(layer: Linear, name: str, value: torch.Tensor | None) -> None:
        if value is None:
            layer.register_parameter(name, None)
            return
        param = nn.Parameter(value, requires_grad=False)
        param.keep_dtype = True  # type: ignore[attr-defined]
        layer.register_parameter(name, param)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.w_perm is not None:
            x = x.index_select(1, layer.w_perm)
        if x.is_cuda:
            import slicelm.layers.quantization.int_kernels as int_kernels

            if int_kernels.supported(x):
                return int_kernels.int_linear(x, layer.w_q, layer.w_scales, layer.w_zeros, self.bits,
                                              layer.in_features, bias)
        w = dequantize(layer.w_q, layer.w_scales, layer.w_zeros, self.bits, layer.in_features)
        return F.linear(x, w.to(x.dtype), bias)
