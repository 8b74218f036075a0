"""The tensor-parallel group of this process: its rank, its size and the collectives the layers use.

One engine per process, so one group per process (vLLM's ``get_tp_group()``): the engine's ranks call
``init_tp_group`` before the model is built, the parallel layers read ``get_tp_group()`` when they are
constructed and keep it. Without an initialised group every layer sees ``TPGroup()`` (one rank, every
collective a no-op), so a model built for one device is the plain model.

NCCL carries the collectives on GPUs (captured in CUDA graphs with the model), gloo on the CPU. The
group is created from a file rendezvous in a directory the engine owns (no port to pick or to race for).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# torch 2.13 renamed all_gather_into_tensor (the GPU machine runs 2.11)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class TPGroup:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    group: dist.ProcessGroup | None = None

    @property
    def is_driver(self) -> bool:
        """Rank 0: it schedules, samples and answers; the others follow its steps."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the ranks, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' ``x`` concatenated along ``dim`` (rank order), on every rank."""
        if self.world_size == 1:
            return x
        dim = dim % x.dim()
        flat = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_flat(flat, x.contiguous(), group=self.group)
        if dim == 0:
            return flat
        parts = flat.view(self.world_size, *x.shape).movedim(0, dim)
        return parts.reshape(*x.shape[:dim], self.world_size * x.shape[dim], *x.shape[dim + 1:])

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` into every rank's ``x`` (same shape and dtype everywhere)."""
        if self.world_size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (the KV block count every rank can hold)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


_GROUP = TPGroup()


def get_tp_group() -> TPGroup:
    return _GROUP


def init_tp_group(world_size: int, rank: int, device: torch.device, init_file: str,
                  timeout_s: float = 600.0) -> TPGroup:
    """Joins the engine's ``world_size`` ranks (NCCL on CUDA, gloo on the CPU) and makes it this process's group."""
    global _GROUP
    assert 0 <= rank < world_size, (rank, world_size)
    if world_size == 1:
        _GROUP = TPGroup(0, 1, device)
        return _GROUP
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel group already exists in this process (one engine per process)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"file://{init_file}", world_size=world_size, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    _GROUP = TPGroup(rank, world_size, device, dist.group.WORLD)
    logger.info("tensor-parallel rank %d of %d on %s (%s)", rank, world_size, device, backend)
    return _GROUP


def abort_tp_group() -> None:
    """Unblocks collectives stuck on a dead peer (called from a watchdog thread); best effort."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    with contextlib.suppress(Exception):
        if abort is not None:
            abort()


def destroy_tp_group() -> None:
    """Leaves the group (a later engine in this process may make a new one)."""
    global _GROUP
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _GROUP = TPGroup()
