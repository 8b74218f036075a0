"""Virtual memory ranges whose physical pages come and go: the base of elastic KV and of sleep mode.

A ``VirtualRange`` reserves address space once (``size`` bytes, never moved, so tensors viewed over it
and CUDA graphs captured with its addresses stay valid) and maps physical memory into it in pieces of
``granularity`` bytes on demand; ``unmap`` gives a piece back. Two backends share the interface:

- ``CudaVirtualRange``: CUDA's virtual memory management through ``cuda.bindings.driver`` (cuda-python):
  ``cuMemAddressReserve`` once, ``cuMemCreate`` + ``cuMemMap`` + ``cuMemSetAccess`` per piece,
  ``cuMemUnmap`` + ``cuMemRelease`` to give it back; tensors are views through ``__cuda_array_interface__``.
  Touching an unmapped address is an illegal memory access: callers only ever hand out what is mapped.
- ``HostVirtualRange``: an anonymous ``mmap`` (committed lazily by the kernel); ``unmap`` is
  ``madvise(MADV_DONTNEED)``, which returns the pages to the OS and makes them read as zeros. It runs
  every test on a CPU.

``mapped_bytes`` is what the range holds physically: it is what a memory broker is told.
"""

from __future__ import annotations

import contextlib
import mmap
from typing import Any

import torch


class VMMError(RuntimeError):
    """A virtual-memory call failed (out of device memory, no driver support...)."""


class VirtualRange:
    """Reserved address space with pieces mapped at ``granularity``-aligned offsets (see module docstring)."""

    granularity: int
    size: int

    def __init__(self) -> None:
        self._mapped: dict[int, int] = {}  # offset -> size of each mapped piece

    @property
    def mapped_bytes(self) -> int:
        return sum(self._mapped.values())

    def is_mapped(self, offset: int) -> bool:
        return offset in self._mapped

    def map(self, offset: int, size: int) -> None:
        self._check(offset, size)
        assert offset not in self._mapped, f"offset {offset} is already mapped"
        self._map(offset, size)
        self._mapped[offset] = size

    def unmap(self, offset: int) -> None:
        size = self._mapped.pop(offset)
        self._unmap(offset, size)

    def unmap_all(self) -> None:
        for offset in sorted(self._mapped):
            self.unmap(offset)

    def _check(self, offset: int, size: int) -> None:
        g = self.granularity
        if offset % g or size % g or size <= 0 or offset + size > self.size:
            raise ValueError(f"piece [{offset}, +{size}) is not {g}-aligned inside a {self.size}-byte range")

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of ``shape`` elements of ``dtype`` at ``offset`` (mapped or not: map before touching)."""
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        assert offset + nbytes <= self.size, "view past the end of the range"
        return self._bytes(offset, nbytes).view(dtype).view(shape)

    def _bytes(self, offset: int, nbytes: int) -> torch.Tensor:
        raise NotImplementedError

    def _map(self, offset: int, size: int) -> None:
        raise NotImplementedError

    def _unmap(self, offset: int, size: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.unmap_all()


class HostVirtualRange(VirtualRange):
    """CPU backend: anonymous mmap, pages dropped with MADV_DONTNEED (they read back as zeros)."""

    def __init__(self, size: int, granularity: int = mmap.PAGESIZE) -> None:
        super().__init__()
        assert granularity % mmap.PAGESIZE == 0
        self.granularity = granularity
        self.size = -(size // -granularity) * granularity
        self._mm = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._buf = torch.frombuffer(self._mm, dtype=torch.uint8)

    def _bytes(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._buf[offset:offset + nbytes]

    def _map(self, offset: int, size: int) -> None:
        pass  # the kernel commits a page on first touch

    def _unmap(self, offset: int, size: int) -> None:
        self._mm.madvise(mmap.MADV_DONTNEED, offset, size)


class _CudaArray:
    """Just enough of ``__cuda_array_interface__`` for ``torch.as_tensor`` to view raw device bytes. It keeps
    its range alive: a tensor viewing the range holds it, so pages are never unmapped under a live view."""

    def __init__(self, ptr: int, nbytes: int, owner: VirtualRange) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - GPU machines carry cuda-python
        raise VMMError("CUDA virtual memory needs cuda-python (pip install cuda-bindings)") from e
    return driver


def _call(result: Any) -> Any:
    """cuda-python returns (CUresult, *values): raise on an error, return the value(s)."""
    drv = _driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(err)
        raise VMMError(f"CUDA driver call failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


class CudaVirtualRange(VirtualRange):
    """GPU backend: cuMemAddressReserve once, cuMemCreate/cuMemMap/cuMemSetAccess per piece."""

    def __init__(self, size: int, device: torch.device) -> None:
        super().__init__()
        drv = _driver()
        self.device = device
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.init()
        torch.cuda.set_device(index)
        torch.zeros(1, device=device)  # makes the primary context current on this thread
        self._prop = drv.CUmemAllocationProp()
        self._prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = index
        self._access = drv.CUmemAccessDesc()
        self._access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = index
        self._access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.granularity = int(_call(drv.cuMemGetAllocationGranularity(
            self._prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)))
        self.size = -(size // -self.granularity) * self.granularity
        self.base = int(_call(drv.cuMemAddressReserve(self.size, self.granularity, drv.CUdeviceptr(0), 0)))
        self._handles: dict[int, Any] = {}

    def _bytes(self, offset: int, nbytes: int) -> torch.Tensor:
        return torch.as_tensor(_CudaArray(self.base + offset, nbytes, self), device=self.device)

    def _map(self, offset: int, size: int) -> None:
        drv = _driver()
        handle = _call(drv.cuMemCreate(size, self._prop, 0))
        ptr = drv.CUdeviceptr(self.base + offset)
        try:
            _call(drv.cuMemMap(ptr, size, 0, handle, 0))
        except VMMError:
            _call(drv.cuMemRelease(handle))
            raise
        try:
            _call(drv.cuMemSetAccess(ptr, size, [self._access], 1))
        except VMMError:
            _call(drv.cuMemUnmap(ptr, size))
            _call(drv.cuMemRelease(handle))
            raise
        self._handles[offset] = handle

    def _unmap(self, offset: int, size: int) -> None:
        drv = _driver()
        _call(drv.cuMemUnmap(drv.CUdeviceptr(self.base + offset), size))
        _call(drv.cuMemRelease(self._handles.pop(offset)))

    def close(self) -> None:
        if getattr(self, "base", None) is None:
            return
        torch.cuda.synchronize(self.device)
        super().close()
        drv = _driver()
        _call(drv.cuMemAddressFree(drv.CUdeviceptr(self.base), self.size))
        self.base = None

    def __del__(self) -> None:  # the last view is gone (an engine was dropped): pages back to the driver
        with contextlib.suppress(Exception):
            self.close()


def reserve(size: int, device: torch.device, host_granularity: int = mmap.PAGESIZE) -> VirtualRange:
    """A virtual range of at least ``size`` bytes on ``device`` (CUDA VMM on a GPU, mmap on the CPU)."""
    if device.type == "cuda":
        return CudaVirtualRange(size, device)
    return HostVirtualRange(size, host_granularity)
