"""Where the fused Triton ops come from: loaded once, only on CUDA tensors, and only when Triton imports.

The torch code in ``norm.py``, ``rotary.py`` and ``activation.py`` stays the reference (and the CPU
path); set ``SLICELM_DISABLE_FUSED_OPS=1`` to run it on the GPU too.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch


@functools.cache
def _load() -> ModuleType | None:
    if os.environ.get("SLICELM_DISABLE_FUSED_OPS") == "1":
        return None
    try:
        from slicelm.layers.triton import fused_ops
    except ImportError:
        return None
    return fused_ops


def fused_ops_for(x: torch.Tensor) -> ModuleType | None:
    return _load() if x.is_cuda else None
