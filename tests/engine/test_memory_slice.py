"""The engine's budget takes the GPU slice from ``slicelm.slicing`` (no env parsing of its own)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from slicelm.engine import memory
from slicelm.slicing.spec import Slice

GiB = 1 << 30


def _fake_gpu(monkeypatch, total=80 * GiB):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=total))


def test_budget_takes_the_smallest_including_the_slice(monkeypatch):
    _fake_gpu(monkeypatch)
    dev = torch.device("cuda", 0)
    assert memory.resolve_budget(dev, None, 0.5, Slice(0, None, 10 * GiB, None, "stack")) == \
        (10 * GiB, "GPU slice (stack)")
    assert memory.resolve_budget(dev, 8 * GiB, 0.5, Slice(0, None, 10 * GiB, None, "stack")) == \
        (8 * GiB, "gpu_memory_budget")
    assert memory.resolve_budget(dev, None, 0.1, Slice(0, None, None, 30, "mps"))[1] == \
        "gpu_memory_utilization=0.1"


def test_budget_reads_hami_env_through_slicing(monkeypatch):
    _fake_gpu(monkeypatch)
    for k in ("SLICELM_SLICE_MEMORY_BYTES", "SLICELM_SLICE_SM_PERCENT", "SLICELM_SLICE_SOURCE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CUDA_DEVICE_MEMORY_LIMIT", "20g")
    monkeypatch.setenv("CUDA_DEVICE_MEMORY_LIMIT_1", "6000m")
    assert memory.resolve_budget(torch.device("cuda", 1), None, 0.9) == (6000 << 20, "GPU slice (hami-env)")
    assert memory.resolve_budget(torch.device("cuda", 0), None, 0.9) == (20 * GiB, "GPU slice (hami-env)")
