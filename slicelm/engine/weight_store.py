"""Sleep mode's weights: the model's parameters and buffers packed into one virtual range.

``WeightStore(model, device)`` moves every parameter and buffer into a ``VirtualRange`` (in pieces of
``piece_bytes``, freeing the originals as it goes, so the peak stays one piece above the weights) and
points the modules at views of it. The addresses never change afterwards, so CUDA graphs captured later
stay valid across sleep and wake:

- ``offload(keep_params=True)`` (sleep level 1) copies everything into pinned host memory (allocated at the
  first sleep and kept), then unmaps the pieces; ``keep_params=False`` (level 2) keeps only the buffers
  (rotary tables...) and forgets the parameters.
- ``restore()`` maps the pieces and copies back what was kept; after a level-2 sleep the caller reloads
  the parameters from the checkpoint (in place, at the same addresses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from slicelm.engine.vmm import VirtualRange, reserve

logger = logging.getLogger(__name__)
ALIGN = 256
PIECE_BYTES = 256 << 20


@dataclass
class _Slot:
    owner: torch.nn.Module
    name: str
    is_param: bool
    offset: int
    nbytes: int


class WeightStore:
    def __init__(self, model: torch.nn.Module, device: torch.device, piece_bytes: int = PIECE_BYTES) -> None:
        self.device = device
        slots, total = _layout(model)
        self.slots = slots
        self.range: VirtualRange = reserve(max(total, 1), device)
        g = self.range.granularity
        self.piece_bytes = max(g, piece_bytes // g * g)
        self.num_pieces = -(self.range.size // -self.piece_bytes)
        self.nbytes = total
        self._host: torch.Tensor | None = None
        self._pack()
        self.kept_params = True

    @property
    def mapped_bytes(self) -> int:
        return self.range.mapped_bytes

    def _piece(self, i: int) -> tuple[int, int]:
        start = i * self.piece_bytes
        return start, min(self.piece_bytes, self.range.size - start)

    def _map_through(self, end: int, mapped: int) -> int:
        """Maps pieces until byte ``end`` is covered; returns the new count of mapped pieces."""
        while mapped < self.num_pieces and mapped * self.piece_bytes < end:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the originals freed so far go back to the driver first
            self.range.map(*self._piece(mapped))
            mapped += 1
        return mapped

    def _pack(self) -> None:
        mapped = 0
        for slot in self.slots:
            mapped = self._map_through(slot.offset + slot.nbytes, mapped)
            old = _get(slot)
            view = self.range.tensor(slot.offset, tuple(old.shape), old.dtype)
            view.copy_(old)
            _set(slot, view)
            del old
        self._map_through(self.range.size, mapped)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _bytes(self) -> torch.Tensor:
        return self.range.tensor(0, (self.range.size,), torch.uint8)

    def offload(self, keep_params: bool = True) -> None:
        """Copies what is kept to host memory and gives every piece back."""
        if self._host is None:
            self._host = torch.empty(self.range.size, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        if keep_params:
            self._host.copy_(self._bytes())
        else:
            for s in self.slots:
                if not s.is_param:
                    self._host[s.offset:s.offset + s.nbytes].copy_(self._bytes()[s.offset:s.offset + s.nbytes])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.range.unmap_all()
        self.kept_params = keep_params

    def restore(self) -> None:
        """Maps every piece and copies back what ``offload`` kept."""
        assert self._host is not None, "restore without offload"
        for i in range(self.num_pieces):
            self.range.map(*self._piece(i))
        if self.kept_params:
            self._bytes().copy_(self._host, non_blocking=True)
        else:
            for s in self.slots:
                if not s.is_param:
                    self._bytes()[s.offset:s.offset + s.nbytes].copy_(self._host[s.offset:s.offset + s.nbytes])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _layout(model: torch.nn.Module) -> tuple[list[_Slot], int]:
    """Every distinct parameter and buffer, each at an ALIGN-aligned offset."""
    slots: list[_Slot] = []
    seen: set[int] = set()
    offset = 0
    for module in model.modules():
        for name, t, is_param in [*((n, p, True) for n, p in module._parameters.items()),
                                  *((n, b, False) for n, b in module._buffers.items())]:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            slots.append(_Slot(module, name, is_param, offset, nbytes))
            offset += -(nbytes // -ALIGN) * ALIGN
    return slots, offset


def _get(slot: _Slot) -> torch.Tensor:
    t = (slot.owner._parameters if slot.is_param else slot.owner._buffers)[slot.name]
    assert t is not None
    return t.data if slot.is_param else t


def _set(slot: _Slot, view: torch.Tensor) -> None:
    if slot.is_param:
        param = slot.owner._parameters[slot.name]
        assert param is not None
        param.data = view
    else:
        slot.owner._buffers[slot.name] = view
