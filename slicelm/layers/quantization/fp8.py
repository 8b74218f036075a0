"""FP8 e4m3 weights: ``quant_method: fp8`` checkpoints (per-tensor ``weight_scale`` or 128x128 block
``weight_scale_inv``), compressed-tensors ``float-quantized`` (per-tensor / per-channel / block
``weight_scale``), and ``--quantization fp8`` of a 16-bit checkpoint (per-channel scales computed at load).

W8A8 on CUDA devices with fp8 tensor cores (sm >= 8.9): activations quantized per token (dynamic) or with the
checkpoint's ``input_scale`` (static), then ``torch._scaled_mm`` with row-wise scales. Block-scaled weights are
weight-only on CUDA (``fp8_kernels.fp8_block_linear`` dequantizes inside the K loop of a tensor-core GEMM); the
CPU and older GPUs dequantize the weight (weight-only, as vLLM's fallback does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.layers.quantization.base import LinearMethod, ParamSpec
from slicelm.layers.quantization.config import Fp8Scheme, QuantizationError

if TYPE_CHECKING:
    from slicelm.layers.linear import Linear

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-output-channel, or per-token for activations) e4m3 quantization: (q, scale [R] float32)."""
    scale = w.abs().amax(dim=-1).float().clamp(min=1e-12) / FP8_MAX
    q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_blocks(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 W from e4m3 ``w [N, K]`` and one scale per ``block`` tile ``[ceil(N/bn), ceil(K/bk)]``."""
    n, k = w.shape
    s = scale.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return w.float() * s


def fp8_matmul_supported(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


class Fp8LinearMethod(LinearMethod):
    def __init__(self, scheme: Fp8Scheme, names: Literal["fp8", "ct"]) -> None:
        self.scheme = scheme
        self.names = names

    def param_specs(self, layer: Linear) -> dict[str, ParamSpec]:
        s, n, k, shards = self.scheme, layer.out_features, layer.in_features, len(layer.output_sizes)
        if s.online:
            return {"weight": ParamSpec((n, k), None)}
        specs = {"weight": ParamSpec((n, k), FP8)}
        if s.weight_strategy == "block":
            assert s.block_size is not None
            bn, bk = s.block_size
            name = "weight_scale_inv" if self.names == "fp8" else "weight_scale"
            specs[name] = ParamSpec((-(-n // bn), -(-k // bk)), torch.float32, out_block=bn, in_block=bk)
        elif s.weight_strategy == "channel":
            specs["weight_scale"] = ParamSpec((n, 1), torch.float32, in_dim=None)
        else:
            specs["weight_scale"] = ParamSpec((shards,), torch.float32, per_shard=True, in_dim=None)
        if s.activation == "static":
            specs["input_scale"] = ParamSpec((shards,), torch.float32, per_shard=True, in_dim=None)
        return specs

    def load_weight(self, layer: Linear, name: str, tensor: torch.Tensor, shard: int | None) -> None:
        if name == "weight" and not self.scheme.online and tensor.dtype != FP8:
            raise QuantizationError(f"tensor {layer.prefix}.weight is {tensor.dtype}, expected float8_e4m3fn")
        super().load_weight(layer, name, tensor.float() if name != "weight" else tensor, shard)

    def init_dummy(self, layer: Linear, gen: torch.Generator) -> None:
        super().init_dummy(layer, gen)
        for name in ("weight_scale", "weight_scale_inv"):
            if name in layer.param_specs:
                getattr(layer, name).fill_(0.02 / 16)  # N(0, 0.02) weights ~ 16 * scale in e4m3
        if "input_scale" in layer.param_specs:
            layer.input_scale.fill_(1.0 / 16)

    def process_weights_after_loading(self, layer: Linear) -> None:
        s = self.scheme
        w_scale = None
        if s.online:
            q, w_scale = quantize_rows(layer.weight.data)
            layer.weight = _frozen(q)
        elif s.weight_strategy == "tensor":
            sizes = torch.tensor(layer.output_sizes, device=layer.weight.device)
            w_scale = layer.weight_scale.data.repeat_interleave(sizes)
        elif s.weight_strategy == "channel":
            w_scale = layer.weight_scale.data.reshape(-1)
        layer.w_scale = _frozen(w_scale.float().contiguous()) if w_scale is not None else None
        layer.in_scale = _frozen(layer.input_scale.data.max().reshape(1)) if s.activation == "static" else None
        if s.activation == "static":
            del layer.input_scale

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = self.scheme
        n, k = layer.out_features, layer.in_features
        if (layer.w_scale is not None and s.activation != "none" and fp8_matmul_supported(x)
                and k % 16 == 0 and n % 16 == 0 and x.shape[0] > 0):
            from slicelm.layers.quantization.fp8_kernels import quantize_activations

            x_q, x_s = quantize_activations(x, layer.in_scale)
            out = torch._scaled_mm(x_q, layer.weight.t(), scale_a=x_s, scale_b=layer.w_scale.view(1, -1),
                                   out_dtype=torch.bfloat16)
            out = out.to(x.dtype)
            return out + bias if bias is not None else out
        if (x.is_cuda and s.weight_strategy == "block" and not s.online and x.dtype in (torch.float16, torch.bfloat16)
                and s.block_size is not None):
            from slicelm.layers.quantization.fp8_kernels import fp8_block_linear

            scale = layer.weight_scale_inv if self.names == "fp8" else layer.weight_scale
            return fp8_block_linear(x, layer.weight, scale, s.block_size, bias)
        return F.linear(x, self.dequantized(layer).to(x.dtype), bias)

    def dequantized(self, layer: Linear) -> torch.Tensor:
        """The float32 weight (the weight-only path and the tests' reference)."""
        if self.scheme.weight_strategy == "block" and not self.scheme.online:
            assert self.scheme.block_size is not None
            scale = layer.weight_scale_inv if self.names == "fp8" else layer.weight_scale
            return dequantize_blocks(layer.weight, scale, self.scheme.block_size)
        return layer.weight.float() * layer.w_scale[:, None]


def _frozen(t: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(t, requires_grad=False)
    p.keep_dtype = True  # type: ignore[attr-defined]
    return p
