"""The linear-method interface every quantization method implements (vLLM's ``LinearMethodBase`` shape).

A ``Linear`` owns its parameters; its method creates them (``create_weights``, with the checkpoint's names
and shapes), copies checkpoint tensors into them (``load_weight``: one output shard at a time, so the
fused ``qkv_proj`` / ``gate_up_proj`` load their ``q/k/v`` and ``gate/up`` tensors in place), turns them into
the layout its kernels read (``process_weights_after_loading``) and computes ``x @ W.T + b`` (``apply``).

``ParamSpec`` says how a parameter is split across output shards: ``out_dim`` is the dimension that indexes
output features, ``out_block`` how many outputs one index along it covers (8 for int4 packed along the
output, 128 for 128-row block scales), ``per_shard`` for one scalar per shard (per-tensor scales).
``in_dim`` / ``in_block`` say the same of the input features (None: the tensor does not depend on which input
features a rank holds): a row-parallel layer (tensor parallelism) cuts each tensor there.
Parameters a method creates keep their dtype when the model is cast (``keep_dtype``; see ``cast_model``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from slicelm.layers.linear import Linear


_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: the model's dtype (follows casts)
    out_dim: int | None = 0  # None: not split by output (every shard carries the same tensor)
    out_block: int = 1
    per_shard: bool = False
    required: bool = True
    in_dim: int | None = 1  # None: not split by input (replicated over a row-parallel layer's ranks)
    in_block: int = 1


class LinearMethod(ABC):
    """How one ``Linear`` stores, loads and applies its weight."""

    quantized: bool = True

    @abstractmethod
    def param_specs(self, layer: Linear) -> dict[str, ParamSpec]:
        """Checkpoint-named parameters of ``layer`` (besides ``bias``)."""

    def create_weights(self, layer: Linear) -> None:
        layer.param_specs = self.param_specs(layer)
        for name, spec in layer.param_specs.items():
            dtype = spec.dtype or torch.get_default_dtype()
            param = nn.Parameter(torch.empty(spec.shape, dtype=dtype), requires_grad=False)
            param.keep_dtype = spec.dtype is not None  # type: ignore[attr-defined]
            layer.register_parameter(name, param)

    def load_weight(self, layer: Linear, name: str, tensor: torch.Tensor, shard: int | None) -> None:
        """Copy checkpoint tensor ``name`` of output shard ``shard`` (None: every shard) into its parameter."""
        spec = layer.param_specs.get(name)
        if spec is None:
            raise ValueError(f"unexpected tensor {layer.prefix}.{name}: {type(self).__name__} loads "
                             f"{sorted(layer.param_specs)}")
        param = getattr(layer, name)
        if (getattr(param, "keep_dtype", False) and param.dtype != tensor.dtype
                and param.dtype in _SCALE_DTYPES and tensor.dtype in _SCALE_DTYPES):
            param.data = param.data.to(tensor.dtype)  # scales keep the checkpoint's float dtype
        target = shard_view(layer, name, param, spec, shard)
        if spec.per_shard:
            tensor = tensor.reshape(()) if shard is not None else tensor.reshape(()).expand(target.shape)
        if spec.out_dim is None and not spec.per_shard:  # every shard carries the same tensor
            seen = layer.__dict__.setdefault("_shared_loaded", set())
            if name in seen:
                if tuple(target.shape) == tuple(tensor.shape) and not torch.equal(target, tensor.to(target)):
                    raise ValueError(f"tensor {layer.prefix}.{name} of shard {shard} differs from another shard's; "
                                     "the fused layer's shards must share it")
                return
            seen.add(name)
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"tensor {layer.prefix}.{name} (shard {shard}) has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(tensor.to(device=target.device, dtype=target.dtype))

    def process_weights_after_loading(self, layer: Linear) -> None:  # noqa: B027 (optional hook)
        """Repack / convert the loaded tensors for the kernels (default: nothing)."""

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [M, in] @ W.T + bias`` -> ``[M, out]`` in x's dtype."""

    def init_dummy(self, layer: Linear, gen: torch.Generator) -> None:
        """``--load-format dummy``: plausible random values (called before ``process_weights_after_loading``)."""
        for name in layer.param_specs:
            p = getattr(layer, name)
            if p.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
                p.random_(generator=gen)
            elif "scale" in name:
                p.uniform_(0.5e-3, 2e-3, generator=gen)
            else:
                tmp = torch.empty(p.shape, device=p.device).normal_(0.0, 0.02, generator=gen)
                p.copy_(tmp.to(p.dtype))


def shard_view(layer: Linear, name: str, param: torch.Tensor, spec: ParamSpec, shard: int | None) -> torch.Tensor:
    """The part of ``param`` that output shard ``shard`` of ``layer`` fills (None: all of it)."""
    if shard is None:
        return param
    if not 0 <= shard < len(layer.output_sizes):
        raise ValueError(f"{layer.prefix}: shard {shard} out of range ({len(layer.output_sizes)} shards)")
    if spec.per_shard:
        return param[shard]
    if spec.out_dim is None:
        return param
    start, size = sum(layer.output_sizes[:shard]), layer.output_sizes[shard]
    if start % spec.out_block or (size % spec.out_block and shard != len(layer.output_sizes) - 1):
        raise ValueError(f"{layer.prefix}.{name}: output shard {shard} ({start}:{start + size}) is not aligned to "
                         f"the checkpoint's {spec.out_block}-row packing/blocks")
    first = start // spec.out_block
    count = -(-(start + size) // spec.out_block) - first
    return param.narrow(spec.out_dim, first, count)


def cast_model(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """``model.to(dtype, device)`` except quantized tensors (packed ints, fp8, checkpoint scales): those move
    but keep their dtype."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        keep = getattr(t, "keep_dtype", False) or not t.is_floating_point()
        return t.to(device=device, dtype=None if keep else dtype)

    return model._apply(convert)
