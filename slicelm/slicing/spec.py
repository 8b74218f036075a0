"""The slice of a GPU one replica may use, and how it travels to the replica's process.

A supervisor (``slicelm up``) decides slices and passes them down as ``SLICELM_SLICE_*`` env; inside a
HAMi container the same facts come from HAMi-core's env. The engine reads one :class:`Slice` through
:func:`slice_from_env` and never parses either env itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from slicelm.slicing import hami_env

ENV_MEMORY_BYTES = "SLICELM_SLICE_MEMORY_BYTES"
ENV_SM_PERCENT = "SLICELM_SLICE_SM_PERCENT"
ENV_SOURCE = "SLICELM_SLICE_SOURCE"
SOURCES = ("stack", "hami-env", "mps", "flag")


class SliceEnvError(ValueError):
    """A ``SLICELM_SLICE_*`` variable holds a value that is not a slice."""


@dataclass(frozen=True)
class Slice:
    device_index: int | None
    device_uuid: str | None
    memory_bytes: int | None  # None: no memory cap from the slice
    sm_percent: int | None  # None: whole GPU's SMs
    source: str  # "stack" | "hami-env" | "mps" | "flag"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"Slice.source must be one of {SOURCES}, got {self.source!r}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"Slice.memory_bytes must be positive or None, got {self.memory_bytes}")
        if self.sm_percent is not None and not 1 <= self.sm_percent <= 100:
            raise ValueError(f"Slice.sm_percent must be in 1..100 or None, got {self.sm_percent}")

    @property
    def memory_mib(self) -> int | None:
        return None if self.memory_bytes is None else self.memory_bytes >> 20

    def to_env(self) -> dict[str, str]:
        """The env a child replica needs to see this slice (device selection is CUDA_VISIBLE_DEVICES' job)."""
        env = {ENV_SOURCE: self.source}
        if self.memory_bytes is not None:
            env[ENV_MEMORY_BYTES] = str(self.memory_bytes)
        if self.sm_percent is not None:
            env[ENV_SM_PERCENT] = str(self.sm_percent)
        return env


def _int_var(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise SliceEnvError(f"{name}={raw!r}: expected an integer") from None


def _own_slice(env: Mapping[str, str], device_index: int) -> Slice | None:
    if not any(k in env for k in (ENV_MEMORY_BYTES, ENV_SM_PERCENT, ENV_SOURCE)):
        return None
    source = env.get(ENV_SOURCE, "stack").strip() or "stack"
    try:
        return Slice(device_index, None, _int_var(env, ENV_MEMORY_BYTES), _int_var(env, ENV_SM_PERCENT), source)
    except ValueError as e:
        raise SliceEnvError(f"bad SLICELM_SLICE_* env: {e}") from None


def _hami_slice(env: Mapping[str, str], device_index: int) -> Slice | None:
    memory = hami_env.memory_limit_bytes(env, device_index)
    sm = hami_env.sm_limit_percent(env, device_index)
    if memory is None and sm is None:
        return None
    return Slice(device_index, None, memory, sm, "hami-env")


def slice_from_env(env: Mapping[str, str] | None = None, device_index: int = 0) -> Slice | None:
    """The slice this process runs in: ours (``SLICELM_SLICE_*``) first, then HAMi-core's, else None.

    When both are present (slicelm inside a HAMi container), HAMi-core enforces its limit whatever we
    say, so the memory is the smaller of the two.
    """
    env = os.environ if env is None else env
    own = _own_slice(env, device_index)
    hami = _hami_slice(env, device_index)
    if own is None or hami is None:
        return own or hami
    memories = [m for m in (own.memory_bytes, hami.memory_bytes) if m is not None]
    return Slice(device_index, None, min(memories) if memories else None,
                 own.sm_percent if own.sm_percent is not None else hami.sm_percent, own.source)
