"""The environment every tensor-parallel rank runs with.

NVLink multicast (NCCL's NVLS algorithms, PyTorch symmetric memory's multimem, NVSHMEM's NVLS) stays off:
on shared hosts a program using it can take the GPUs out of service for everyone. The machine's other
NCCL settings (``NCCL_*`` it exports) are left as they are; these three are forced, whatever a stack
file or a shell set, in the engine-core process and in every worker it starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def force_multicast_off(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Sets ``MULTICAST_OFF`` in ``env`` (default ``os.environ``), warning about a value it overrides."""
    env = os.environ if env is None else env
    for key, value in MULTICAST_OFF.items():
        old = env.get(key)
        if old is not None and old != value:
            logger.warning("%s=%s overridden to %s: NVLink multicast stays off for tensor parallelism", key, old, value)
        env[key] = value
    return env
