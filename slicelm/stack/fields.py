"""Parsers for HAMi / production-stack field values, which the chart types loosely (strings or numbers)."""

from __future__ import annotations

import re
from typing import Any

K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?")


def _whole(v: Any, what: str) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{what}, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    raise ValueError(f"{what}, got {v!r}")


def gpu_count(v: Any) -> int:
    """``requestGPU``: whole physical GPUs (production-stack allows a string or a number)."""
    n = _whole(v, "must be a whole number of GPUs (use requestGPUMemPercentage for a fraction of one)")
    if n < 0:
        raise ValueError(f"must be >= 0, got {n}")
    return n


def mib(v: Any) -> int:
    """``requestGPUMem``: HAMi's ``nvidia.com/gpumem``, a plain integer count of MiB."""
    n = _whole(v, "must be a whole number of MiB (HAMi's nvidia.com/gpumem, e.g. \"14000\")")
    if n <= 0:
        raise ValueError(f"must be > 0 MiB, got {n}")
    return n


def percentage(v: Any) -> int:
    """``requestGPUMemPercentage``: 0–100 (HAMi rejects anything else)."""
    n = _whole(v, "must be a whole percentage 0-100")
    if not 0 <= n <= 100:
        raise ValueError(f"must be within 0-100, got {n}")
    return n


def cores(v: Any) -> int:
    """``requestGPUCores``: percent of the GPU's SMs; HAMi clamps values above 100 to 100 (exclusive)."""
    n = _whole(v, "must be a whole percentage of GPU cores (0-100)")
    if n < 0:
        raise ValueError(f"must be >= 0, got {n}")
    return min(n, 100)


def utilization(v: Any) -> float:
    """``gpuMemoryUtilization``: a fraction in (0, 1]."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number in (0, 1], got {v!r}") from None
    if isinstance(v, bool) or not 0 < f <= 1:
        raise ValueError(f"must be a number in (0, 1], got {v!r}")
    return f


def split_list(value: str) -> list[str]:
    """HAMi's comma-separated annotation lists (``nvidia.com/use-gputype: "A100,H100"``)."""
    items = [s.strip() for s in str(value).split(",")]
    if any(not s for s in items):
        raise ValueError(f"must be a comma-separated list without empty items, got {value!r}")
    return items


def bool_annotation(key: str, value: str) -> bool:
    if str(value).lower() not in ("true", "false"):
        raise ValueError(f"must be \"true\" or \"false\", got {value!r}")
    return str(value).lower() == "true"


def scoring_weights(value: str) -> tuple[float, float, float]:
    """``hami.io/device-scoring-weights: slot=a,core=b,memory=c`` (missing weights stay 1)."""
    weights = {"slot": 1.0, "core": 1.0, "memory": 1.0}
    for item in split_list(value):
        key, _, num = item.partition("=")
        if key.strip() not in weights:
            raise ValueError(f"unknown weight {key.strip()!r} (slot, core or memory)")
        try:
            weights[key.strip()] = float(num)
        except ValueError:
            raise ValueError(f"{item!r} is not name=number") from None
        if weights[key.strip()] < 0:
            raise ValueError(f"{item!r} must be >= 0")
    return weights["slot"], weights["core"], weights["memory"]


def k8s_name(v: str) -> str:
    """A modelSpec name: the chart names Kubernetes objects after it, so a lowercase DNS label."""
    if not K8S_NAME.fullmatch(v):
        raise ValueError(f"must be a lowercase DNS label (a-z, 0-9, '-', '.'; at most 63 characters), got {v!r}")
    return v
