"""Megatron-style tensor-parallel linear layers (vLLM's names and shapes), for every linear method.

* ``ColumnParallelLinear``: W's output rows are split across the ranks; each rank computes its slice of
  the outputs, no communication. A fused layer (``output_sizes``: gate/up) splits every shard evenly, so
  rank r holds rows ``[r n / tp, (r + 1) n / tp)`` of each.
* ``QKVParallelLinear``: the fused q/k/v projection split by heads: ``num_heads / tp`` query heads per
  rank; ``num_kv_heads / tp`` KV heads, or one replicated KV head when there are fewer KV heads than
  ranks (rank r takes head ``r // (tp / num_kv_heads)``).
* ``RowParallelLinear``: W's input columns are split; each rank multiplies its slice of the inputs (the
  column-parallel layer's outputs), one all-reduce sums the partial products, the bias is added once.

Each rank's ``Linear`` is built at its local size, so its linear method (``layers/quantization``) creates
the local parameters. Checkpoint tensors arrive whole or as lazy safetensors slices (``TensorSource``):
``load_weight`` cuts this rank's part along the dimension the method's ``ParamSpec`` names (``out_dim`` /
``in_dim``, in units of its packing or scale blocks), reads only that part and hands it to the method. A
split that falls inside a packed word or a scale group is refused, naming the method and the layer. A
checkpoint tensor holding every output shard (Phi-3's fused ``qkv_proj`` / ``gate_up_proj``, ``shard=None``) is
cut per shard first. With one rank every layer is the plain ``Linear``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from slicelm.distributed.parallel_state import TPGroup, get_tp_group
from slicelm.layers.linear import Linear
from slicelm.layers.quantization import QuantConfig
from slicelm.layers.quantization.base import ParamSpec


class TensorSource(Protocol):
    """A checkpoint tensor, whole (``torch.Tensor``) or lazy (read only where it is narrowed)."""

    @property
    def shape(self) -> torch.Size | tuple[int, ...]: ...

    def narrow(self, dim: int, start: int, length: int) -> TensorSource: ...


def materialize(t: TensorSource | torch.Tensor) -> torch.Tensor:
    """The tensor itself, or a lazy slice read from its file."""
    return t if isinstance(t, torch.Tensor) else t.load()  # type: ignore[attr-defined]


def divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {tp}")
    return n // tp


def copy_checked(target: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"weight {what} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
    target.copy_(tensor.to(dtype=target.dtype, device=target.device))


@contextlib.contextmanager
def per_rank(tp: TPGroup) -> Iterator[None]:
    """A linear method refusing a rank's part (a group or packing it cannot split) says the split made it."""
    try:
        yield
    except ValueError as e:
        if tp.world_size == 1:
            raise
        raise type(e)(f"{e} (each of the {tp.world_size} tensor-parallel ranks holds 1/{tp.world_size} of the "
                      "layer: use another --tensor-parallel-size)") from e


@dataclass(frozen=True)
class Part:
    """This rank's rows of one output shard (or its columns of the input): ``[start, start + length)``."""

    start: int
    length: int


def cut(layer: Linear, name: str, tensor: TensorSource, dim: int, block: int, part: Part, full: int) -> TensorSource:
    """``tensor``'s slice holding ``part`` of the ``full`` features that ``dim`` indexes ``block`` at a time."""
    if tensor.shape[dim] != -(-full // block):
        raise ValueError(f"tensor {layer.prefix}.{name} has shape {tuple(tensor.shape)}: {-(-full // block)} "
                         f"entries expected along dim {dim} (the whole checkpoint tensor)")
    if part.start % block or part.length % block:
        method = type(layer.method).__name__
        raise ValueError(f"{layer.prefix}.{name}: {method} stores {block} features per entry along dim {dim}; "
                         f"this rank's features [{part.start}, {part.start + part.length}) do not fall on its "
                         "boundaries: use another --tensor-parallel-size")
    return tensor.narrow(dim, part.start // block, part.length // block)


class ColumnParallelLinear(Linear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = True, *,
                 quant_config: QuantConfig | None = None, prefix: str = "", tp: TPGroup | None = None) -> None:
        self.tp = tp or get_tp_group()
        self.full_output_sizes = list(output_sizes)
        self.parts = self.output_parts(output_sizes, prefix)
        local = [p.length for p in self.parts]
        with per_rank(self.tp):
            super().__init__(in_features, sum(local), bias=bias, quant_config=quant_config, prefix=prefix,
                             output_sizes=local)

    def output_parts(self, output_sizes: list[int], prefix: str) -> list[Part]:
        tp = self.tp
        return [Part(tp.rank * divide(s, tp.world_size, f"{prefix} output size"), s // tp.world_size)
                for s in output_sizes]

    def load_weight(self, name: str, tensor: TensorSource, shard: int | None = 0) -> None:
        """This rank's part of output shard ``shard`` of checkpoint tensor ``name`` (None: of every shard)."""
        if self.tp.world_size == 1:
            super().load_weight(name, materialize(tensor), shard)
        elif shard is None:
            self._load_fused(name, tensor)
        else:
            super().load_weight(name, materialize(self._local_part(name, tensor, shard)), shard)

    def _load_fused(self, name: str, tensor: TensorSource) -> None:
        """A tensor of the whole fused layer: each output shard's rows of it, then this rank's part of those."""
        spec = ParamSpec((self.out_features,), None) if name == "bias" else self.param_specs.get(name)
        if spec is None or spec.per_shard or spec.out_dim is None or name == "weight_shape":
            super().load_weight(name, materialize(tensor), None)  # the method names or checks it
            return
        full = self.full_output_sizes
        start = 0
        for shard, size in enumerate(full):
            part = cut(self, name, tensor, spec.out_dim, spec.out_block, Part(start, size), sum(full))
            self.load_weight(name, part, shard)
            start += size

    def _local_part(self, name: str, tensor: TensorSource, shard: int) -> TensorSource | torch.Tensor:
        part = self.parts[shard]
        if name == "weight_shape":  # compressed-tensors' [out, in] of the shard: the local one
            local = materialize(tensor).clone()
            local[0] = part.length
            return local
        spec = ParamSpec((self.out_features,), None) if name == "bias" else self.param_specs.get(name)
        if spec is None or spec.per_shard or spec.out_dim is None:
            return tensor  # unknown (the method names it), or the same for every output
        return cut(self, name, tensor, spec.out_dim, spec.out_block, part, self.full_output_sizes[shard])


class QKVParallelLinear(ColumnParallelLinear):
    """Output shards 0, 1, 2 = q, k, v of the checkpoint; heads split as the module docstring says."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = True, *,
                 quant_config: QuantConfig | None = None, prefix: str = "", tp: TPGroup | None = None) -> None:
        tp = tp or get_tp_group()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.world_size, f"{prefix} num_attention_heads")
        if num_kv_heads >= tp.world_size:
            self.num_kv_heads = divide(num_kv_heads, tp.world_size, f"{prefix} num_key_value_heads")
            kv_head = tp.rank * self.num_kv_heads
        else:
            if tp.world_size % num_kv_heads:
                raise ValueError(f"{prefix} num_key_value_heads ({num_kv_heads}) must divide the tensor-parallel "
                                 f"size {tp.world_size} when it is smaller")
            self.num_kv_heads = 1
            kv_head = tp.rank // (tp.world_size // num_kv_heads)
        self._q_part = Part(tp.rank * self.num_heads * head_dim, self.num_heads * head_dim)
        self._kv_part = Part(kv_head * head_dim, self.num_kv_heads * head_dim)
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias, quant_config=quant_config, prefix=prefix, tp=tp)

    def output_parts(self, output_sizes: list[int], prefix: str) -> list[Part]:
        return [self._q_part, self._kv_part, self._kv_part]


class RowParallelLinear(Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, reduce_results: bool = True,
                 quant_config: QuantConfig | None = None, prefix: str = "", tp: TPGroup | None = None) -> None:
        self.tp = tp or get_tp_group()
        local = divide(in_features, self.tp.world_size, f"{prefix} input size")
        self.part = Part(self.tp.rank * local, local)
        self.reduce_results = reduce_results
        with per_rank(self.tp):
            super().__init__(local, out_features, bias=bias, quant_config=quant_config, prefix=prefix)
        if self.tp.world_size > 1 and getattr(getattr(self.method, "scheme", None), "act_order", False):
            raise ValueError(f"{prefix}: act-order (desc_act / actorder) checkpoints permute the input features, "
                             "which a row-parallel layer splits: serve them with --tensor-parallel-size 1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return super().forward(x)
        out = self.method.apply(self, x, None)
        if self.reduce_results:
            self.tp.all_reduce(out)
        return out + self.bias if self.bias is not None else out

    def load_weight(self, name: str, tensor: TensorSource, shard: int = 0) -> None:
        """Each tensor's part for this rank's input features; the bias whole (added once, after the all-reduce)."""
        if self.tp.world_size > 1 and name != "bias":
            tensor = self._local_part(name, tensor)
        super().load_weight(name, materialize(tensor), shard)

    def _local_part(self, name: str, tensor: TensorSource) -> TensorSource | torch.Tensor:
        if name == "weight_shape":  # compressed-tensors' [out, in]: the local one
            local = materialize(tensor).clone()
            local[1] = self.part.length
            return local
        spec = self.param_specs.get(name)
        if spec is None or spec.in_dim is None:
            return tensor
        return cut(self, name, tensor, spec.in_dim, spec.in_block, self.part, self.part.length * self.tp.world_size)
