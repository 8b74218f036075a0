"""``Linear``: ``y = x @ W.T + b`` whose weight format is chosen by a linear method (``layers/quantization``).

``Linear(in_features, out_features, bias=True)`` is a drop-in ``nn.Linear`` (same ``weight`` / ``bias``
parameters and state-dict keys; on CUDA its small-batch forward runs the Triton GEMV). With a
``quant_config`` the layer at ``prefix`` (its model-side name, e.g. ``model.layers.0.mlp.down_proj``) holds
that method's checkpoint tensors instead (``qweight``/``qzeros``/``scales``, ``weight_packed``/
``weight_scale``, fp8 ``weight``/``weight_scale_inv`` …), unless the config leaves it unquantized.
``output_sizes`` splits a fused layer's outputs into the checkpoint's shards (q/k/v, gate/up);
``load_weight(name, tensor, shard)`` fills one shard's part of a parameter (``shard=None``: all of it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slicelm.layers.quantization import QuantConfig, get_linear_method
from slicelm.layers.quantization.base import ParamSpec


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 quant_config: QuantConfig | None = None, prefix: str = "",
                 output_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.prefix = in_features, out_features, prefix
        self.output_sizes = list(output_sizes) if output_sizes else [out_features]
        if sum(self.output_sizes) != out_features:
            raise ValueError(f"{prefix}: output_sizes {self.output_sizes} do not add up to {out_features}")
        self.param_specs: dict[str, ParamSpec] = {}
        self.method = get_linear_method(quant_config, prefix)
        self.method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.method.apply(self, x, self.bias)
        out = self.method.apply(self, x.reshape(-1, x.shape[-1]), self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int | None = 0) -> None:
        """Copy checkpoint tensor ``name`` (``weight``, ``qweight``, ``bias`` …) of output shard ``shard``
        (None: a tensor of the whole fused layer, as Phi-3 checkpoints hold ``qkv_proj``)."""
        if name == "bias":
            if self.bias is None:
                raise ValueError(f"unexpected tensor {self.prefix}.bias (the layer has no bias)")
            spec = ParamSpec((self.out_features,), None)
            from slicelm.layers.quantization.base import shard_view

            target = shard_view(self, name, self.bias.data, spec, shard)
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {self.prefix}.bias has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
            return
        self.method.load_weight(self, name, tensor, shard)

    def checkpoint_names(self) -> list[str]:
        """Tensor names this layer needs from the checkpoint (relative to its prefix)."""
        names = [n for n, s in self.param_specs.items() if s.required]
        return [*names, "bias"] if self.bias is not None else names

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={type(self.method).__name__}")


@torch.no_grad()
def process_weights_after_loading(model: nn.Module) -> None:
    """Every quantized linear turns its loaded tensors into its kernels' layout (call once, after loading)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.method.process_weights_after_loading(module)


@torch.no_grad()
def init_dummy_quantized(model: nn.Module, gen: torch.Generator) -> set[str]:
    """Dummy values for the quantized linears' parameters; returns their qualified names (done)."""
    done: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Linear) and module.method.quantized:
            module.method.init_dummy(module, gen)
            done |= {f"{prefix}.{n}" for n in module.param_specs}
    return done
