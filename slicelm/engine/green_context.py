"""An engine's SM partition as a CUDA green context (``--green-context-sms``), beside MPS thread caps.

``"N"`` / ``"N%"`` takes N SMs (or N percent of them) from the first SM; ``"N@FIRST"`` takes N SMs starting
at SM ``FIRST``, so engines in different processes get *disjoint* SM ranges (torch's
``GreenContext.create(num_sms)`` always takes the first N SMs, so two engines would share SMs). The split
is done with the driver API (``cuda.bindings``): the device's SMs in groups of ``GROUP`` (Hopper's
granularity), the groups covering the range combined into one green context, which is pushed as the
current context of the engine's thread, so every stream and kernel the engine creates afterwards runs
on those SMs. Across processes this needs MPS without a thread cap (NVIDIA: green contexts and
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` do not combine), or time slicing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)
GROUP = 8  # SMs per split group (the minimum on sm_90)


@dataclass(frozen=True)
class SMRange:
    count: int
    first: int = 0


def parse_sms(spec: str, total_sms: int) -> SMRange:
    """``"40"``, ``"30%"``, ``"88@40"`` -> an SM range rounded to whole groups, inside the device."""
    count_s, _, first_s = spec.strip().partition("@")
    try:
        if count_s.endswith("%"):
            count = round(float(count_s[:-1]) / 100 * total_sms / GROUP) * GROUP
        else:
            count = int(count_s) // GROUP * GROUP
        first = int(first_s) // GROUP * GROUP if first_s else 0
    except ValueError:
        raise ValueError(f"--green-context-sms: {spec!r} is not N, N% or N@FIRST") from None
    count = max(GROUP, count)
    if first + count > total_sms // GROUP * GROUP:
        raise ValueError(f"--green-context-sms: SMs {first}..{first + count - 1} are not all on this device "
                         f"({total_sms} SMs, in groups of {GROUP})")
    return SMRange(count, first)


def enter_green_context(spec: str, device: torch.device) -> Any:
    """Makes a green context on ``device``'s SM range ``spec`` current on this thread; returns its handle."""
    if device.type != "cuda":
        raise ValueError("--green-context-sms needs a CUDA device")
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).multi_processor_count
    sms = parse_sms(spec, total)
    torch.zeros(1, device=device)  # the primary context exists first (green contexts retain it)
    try:
        handle = _driver_green_context(index, sms)
    except Exception as e:
        if sms.first:
            raise RuntimeError(f"--green-context-sms {spec}: a green context on SMs {sms.first}.. failed: {e}") from e
        logger.warning("driver green context failed (%s): using torch's GreenContext for the first %d SMs",
                       e, sms.count)
        from torch.cuda.green_contexts import GreenContext

        handle = GreenContext.create(num_sms=sms.count, device_id=index)
        handle.set_context()
    torch.cuda.set_stream(torch.cuda.default_stream(device))
    logger.info("engine runs in a green context of %d SMs (SMs %d..%d of %d)", sms.count, sms.first,
                sms.first + sms.count - 1, total)
    return handle


def _driver_green_context(index: int, sms: SMRange) -> Any:
    from slicelm.engine.vmm import _call, _driver

    drv = _driver()
    dev = _call(drv.cuDeviceGet(index))
    resource = _call(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    part = _sm_partition(drv, resource, sms)
    desc = _call(drv.cuDevResourceGenerateDesc([part], 1))
    green = _call(drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
    ctx = _call(drv.cuCtxFromGreenCtx(green))
    _call(drv.cuCtxPushCurrent(ctx))
    return green


def _sm_partition(drv: Any, resource: Any, sms: SMRange) -> Any:
    """The SM resource of ``sms``: SMs before ``first`` are split off and left, then ``count`` SMs are split from
    the rest, one group each time: one resource per descriptor (a descriptor combining several split groups
    failed on the H200 with CUDA_ERROR_INVALID_RESOURCE_TYPE). The driver splits deterministically, so
    processes asking for disjoint ranges get disjoint SMs."""
    from slicelm.engine.vmm import _call

    rest = resource
    if sms.first:
        _skipped, _n, rest = _call(drv.cuDevSmResourceSplitByCount(1, rest, 0, sms.first))
    groups, n, _left = _call(drv.cuDevSmResourceSplitByCount(1, rest, 0, sms.count))
    if n < 1 or groups[0].sm.smCount < sms.count:
        raise RuntimeError(f"the driver split {groups[0].sm.smCount if n else 0} SMs, not {sms.count}")
    return groups[0]
