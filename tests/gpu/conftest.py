"""GPU tests share one CUDA context: an engine's allocator cap (``memory.cap_allocator``) and any memory a
test left behind must not shrink the next test's GPU."""

from __future__ import annotations

import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def _uncapped_gpu():
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        for index in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(1.0, index)
