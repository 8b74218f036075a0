"""HAMi-core's container env, read the way HAMi-core reads it (src/multiprocess/multiprocess_memory_limit.c).

- ``CUDA_DEVICE_MEMORY_LIMIT_<i>`` wins over ``CUDA_DEVICE_MEMORY_LIMIT`` when it is set and non-zero.
- A value is an unsigned integer in C's base-0 notation (``1073741824``, ``0x40000000``, ``017`` octal)
  with an optional last character ``g``/``m``/``k`` (either case) scaling it by 2^30 / 2^20 / 2^10; with
  no suffix it is bytes. 0 (or empty) means no limit.
- ``CUDA_DEVICE_SM_LIMIT_<i>`` / ``CUDA_DEVICE_SM_LIMIT`` are read by the same parser; 0 or >= 100 means
  no throttle, and ``GPU_CORE_UTILIZATION_POLICY=disable`` turns throttling off.

Where HAMi-core would silently read garbage as "no limit" (``14000mb``, ``-1``), we refuse with
:class:`HamiEnvError` naming the variable: running unlimited by accident is worse than not starting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MEMORY_LIMIT = "CUDA_DEVICE_MEMORY_LIMIT"
SM_LIMIT = "CUDA_DEVICE_SM_LIMIT"
CORE_POLICY = "GPU_CORE_UTILIZATION_POLICY"

_SCALE = {"g": 1 << 30, "m": 1 << 20, "k": 1 << 10}
_NUMBER = re.compile(r"\s*(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_UINT64_MAX = (1 << 64) - 1


class HamiEnvError(ValueError):
    """A HAMi-core variable holds something HAMi-core would not read as a limit."""


def parse_limit(name: str, raw: str) -> int:
    """One value as HAMi-core's ``get_limit_from_env`` scales it (0 = unset / no limit)."""
    if raw == "":
        return 0
    scale = _SCALE.get(raw[-1].lower(), 1)
    digits = raw[:-1] if scale != 1 else raw
    m = _NUMBER.fullmatch(digits)
    if not m:
        raise HamiEnvError(f"{name}={raw!r}: expected an unsigned integer with an optional g/m/k suffix "
                           "(e.g. 14000m, 2g, 1073741824)")
    text = m.group(1)
    if text[:2].lower() == "0x":
        value = int(text, 16)
    elif len(text) > 1 and text[0] == "0":
        value = int(text, 8)
    else:
        value = int(text)
    if value * scale > _UINT64_MAX:
        raise HamiEnvError(f"{name}={raw!r} overflows (HAMi-core ignores it)")
    return value * scale


def _per_device(env: Mapping[str, str], base: str, device_index: int) -> int:
    own = parse_limit(f"{base}_{device_index}", env.get(f"{base}_{device_index}", ""))
    return own if own > 0 else parse_limit(base, env.get(base, ""))


def memory_limit_bytes(env: Mapping[str, str], device_index: int) -> int | None:
    """The memory limit HAMi-core enforces on CUDA device ``device_index``, or None for no limit."""
    limit = _per_device(env, MEMORY_LIMIT, device_index)
    return limit or None


def core_policy(env: Mapping[str, str]) -> str:
    """``default``, ``force`` or ``disable`` (HAMi-core compares ``force``/``FORCE``, ``disable``/``DISABLE``)."""
    raw = env.get(CORE_POLICY)
    if raw in ("force", "FORCE"):
        return "force"
    if raw in ("disable", "DISABLE"):
        return "disable"
    return "default"


def sm_limit_percent(env: Mapping[str, str], device_index: int) -> int | None:
    """The SM share HAMi-core throttles device ``device_index`` to (1..99), or None where it does not."""
    limit = _per_device(env, SM_LIMIT, device_index)
    if limit <= 0 or limit >= 100 or core_policy(env) == "disable":
        return None
    return limit

