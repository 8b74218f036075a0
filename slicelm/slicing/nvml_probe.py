"""What NVML says about this machine's GPUs, in HAMi's terms (the device plugin's register and pair scores).

Every call goes through an ``nvml`` module object (``pynvml`` from nvidia-ml-py by default), so tests
feed a fake one. Facts HAMi takes from NVML and how:
- type: the model name, prefixed ``NVIDIA-`` unless it starts with ``NVIDIA`` (plugin/register.go);
- memory: total MiB; NUMA: ``/sys/bus/pci/devices/<bus id>/numa_node`` (negative or missing → 0);
- pair scores (calculate_score.go, links.go): the PCIe common ancestor scores CrossCPU 10, SameCPU 20,
  HostBridge 30, MultiSwitch 40, SingleSwitch 50, SameBoard 60; NVLinks add 100 each (direct links to
  the peer's bus id, else through NVSwitches: the smaller switch-link count of the two); a pair whose
  two directions disagree on the number of links scores 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# nvmlGpuTopologyLevel_t → HAMi's P2P link score
TOPOLOGY_SCORES = {0: 60, 10: 50, 20: 40, 30: 30, 40: 20, 50: 10}
NVLINK_SCORE = 100
MAX_NVLINKS_SCORED = 18  # HAMi's link types stop at EighteenNVLINKLinks


@dataclass
class ProbedGPU:
    uuid: str
    index: int
    type: str
    memory_mib: int
    numa: int
    bus_id: str
    foreign_memory_mib: int = 0
    foreign_pids: list[int] = field(default_factory=list)
    links: dict[str, int] = field(default_factory=dict)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def bus_id(pci_info: Any) -> str:
    """HAMi's ``PciInfo.BusID``: lower case, a 8-digit domain cut to 4 (``00000000:17:00.0`` → ``0000:17:00.0``)."""
    bid = _text(pci_info.busId).split("\x00")[0].lower()
    return bid[4:] if bid != "0000" and bid.startswith("0000") else bid


def sysfs_numa_node(bid: str) -> int:
    try:
        node = int(Path(f"/sys/bus/pci/devices/{bid}/numa_node").read_text().strip())
    except (OSError, ValueError):
        return 0
    return max(node, 0)


def gpu_type(name: str) -> str:
    return name if name.startswith("NVIDIA") else f"NVIDIA-{name}"


def _ignorable(nvml: Any, err: Exception) -> bool:
    return getattr(err, "value", None) in (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_INVALID_ARGUMENT)


def _active_links(nvml: Any, handle: Any) -> Iterable[int]:
    for link in range(nvml.NVML_NVLINK_MAX_LINKS):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) == nvml.NVML_FEATURE_ENABLED:
                yield link
        except nvml.NVMLError as e:
            if not _ignorable(nvml, e):
                raise


def _remote_bus_ids(nvml: Any, handle: Any) -> list[str]:
    out = []
    for link in _active_links(nvml, handle):
        try:
            out.append(bus_id(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)))
        except nvml.NVMLError as e:
            if not _ignorable(nvml, e):
                raise
    return out


def _switch_links(nvml: Any, handle: Any) -> int:
    count = 0
    for link in _active_links(nvml, handle):
        try:
            if nvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link) == nvml.NVML_NVLINK_DEVICE_TYPE_SWITCH:
                count += 1
        except nvml.NVMLError as e:
            if not _ignorable(nvml, e):
                raise
    return count


def _link_entries(nvml: Any, h1: Any, h2: Any, bid2: str, remotes1: list[str], switch1: int, switch2: int
                  ) -> list[int]:
    """Scores of the links HAMi records from GPU 1 toward GPU 2 (one PCIe entry, one NVLink entry)."""
    entries = []
    try:
        level = nvml.nvmlDeviceGetTopologyCommonAncestor(h1, h2)
        if level in TOPOLOGY_SCORES:
            entries.append(TOPOLOGY_SCORES[level])
    except nvml.NVMLError as e:
        logger.warning("NVML topology query failed: %s", e)
    direct = sum(1 for r in remotes1 if r == bid2)
    n = direct if direct else (min(switch1, switch2) if remotes1 and switch1 and switch2 else 0)
    if 1 <= n <= MAX_NVLINKS_SCORED:
        entries.append(NVLINK_SCORE * n)
    return entries


def pair_scores(nvml: Any, handles: list[Any], uuids: list[str], bids: list[str]) -> list[dict[str, int]]:
    remotes = [_remote_bus_ids(nvml, h) for h in handles]
    switches = [_switch_links(nvml, h) if r else 0 for h, r in zip(handles, remotes)]
    n = len(handles)
    entries = {(i, j): _link_entries(nvml, handles[i], handles[j], bids[j], remotes[i], switches[i], switches[j])
               for i in range(n) for j in range(n) if i != j}
    scores: list[dict[str, int]] = [{} for _ in range(n)]
    for (i, j), links in entries.items():
        if len(links) != len(entries[(j, i)]):
            logger.warning("asymmetric link data between GPU %d and GPU %d; their pair scores 0", i, j)
            scores[i][uuids[j]] = 0
        else:
            scores[i][uuids[j]] = sum(links)
    return scores


def _processes(nvml: Any, handle: Any) -> dict[int, int | None]:
    """pid → used bytes (None where the driver does not say), compute and graphics processes together."""
    procs: dict[int, int | None] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            found = getattr(nvml, getter)(handle)
        except nvml.NVMLError as e:
            if not _ignorable(nvml, e):
                raise
            continue
        for p in found:
            procs[p.pid] = p.usedGpuMemory if procs.get(p.pid) is None else procs[p.pid]
    return procs


def _foreign_usage(nvml: Any, handle: Any, own_pids: set[int]) -> tuple[int, list[int]]:
    """MiB used on the GPU by processes that are not ours, and their pids."""
    procs = _processes(nvml, handle)
    foreign = {pid: used for pid, used in procs.items() if pid not in own_pids}
    if any(used is None for used in foreign.values()):
        # the driver hides per-process memory (containers, MPS): the device total minus ours
        device_used = nvml.nvmlDeviceGetMemoryInfo(handle).used
        ours = sum(used or 0 for pid, used in procs.items() if pid in own_pids)
        return max(0, device_used - ours) >> 20, sorted(foreign)
    return sum(foreign.values()) >> 20, sorted(foreign)


def probe(nvml: Any, own_pids: Iterable[int] = (), numa_of: Callable[[str], int] = sysfs_numa_node
          ) -> list[ProbedGPU]:
    """The GPUs NVML sees. Raises ``nvml.NVMLError`` when NVML cannot start (no driver)."""
    nvml.nvmlInit()
    try:
        own = set(own_pids) | {os.getpid()}
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        bids = [bus_id(nvml.nvmlDeviceGetPciInfo(h)) for h in handles]
        gpus = []
        for i, h in enumerate(handles):
            used_mib, pids = _foreign_usage(nvml, h, own)
            gpus.append(ProbedGPU(uuid=uuids[i], index=i, type=gpu_type(_text(nvml.nvmlDeviceGetName(h))),
                                  memory_mib=nvml.nvmlDeviceGetMemoryInfo(h).total >> 20, numa=numa_of(bids[i]),
                                  bus_id=bids[i], foreign_memory_mib=used_mib, foreign_pids=pids))
        for gpu, links in zip(gpus, pair_scores(nvml, handles, uuids, bids)):
            gpu.links = links
        return gpus
    finally:
        nvml.nvmlShutdown()
