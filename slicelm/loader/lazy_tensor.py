"""A checkpoint tensor read only where it is narrowed: tensor-parallel ranks load their slices of each
tensor from the safetensors file (memory-mapped) without materialising the whole tensor, let alone the
whole model.

``LazyTensor`` has the two things a parallel layer asks of a checkpoint tensor (``shape``, ``narrow``) and
``load()`` to read what is left. It is valid while its file is open: ``ModelSource.iter_weights(lazy=True)``
keeps the file open until the consumer asks for the next tensor.
"""

from __future__ import annotations

from typing import Any

import torch


class LazyTensor:
    def __init__(self, source: Any, ranges: tuple[tuple[int, int], ...] | None = None) -> None:
        self._source = source  # a safetensors PySafeSlice (framework="pt")
        self._ranges = ranges if ranges is not None else tuple((0, n) for n in source.get_shape())

    @property
    def shape(self) -> torch.Size:
        return torch.Size(n for _, n in self._ranges)

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        dim = dim % len(self._ranges)
        base, size = self._ranges[dim]
        if start < 0 or length < 0 or start + length > size:
            raise ValueError(f"narrow({dim}, {start}, {length}) is outside a tensor of shape {tuple(self.shape)}")
        ranges = list(self._ranges)
        ranges[dim] = (base + start, length)
        return LazyTensor(self._source, tuple(ranges))

    def load(self) -> torch.Tensor:
        """Reads the narrowed part from the file."""
        if not self._ranges:
            return self._source[()]
        return self._source[tuple(slice(a, a + n) for a, n in self._ranges)]
