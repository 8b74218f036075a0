"""A fake ``pynvml`` module: the calls ``slicelm.slicing.nvml_probe`` makes, answered from a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

MiB = 1 << 20


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGPU:
    uuid: str
    name: str
    total_mib: int
    bus: str  # NVML's 8-digit-domain form, e.g. "00000000:17:00.0"
    procs: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, bytes)
    nvlinks: list[str | None] = field(default_factory=list)  # remote bus id per link; "switch" = NVSwitch
    used_bytes: int = 0


class FakeNVML:
    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_NVLINK_MAX_LINKS = 18
    NVML_FEATURE_ENABLED = 1
    NVML_NVLINK_DEVICE_TYPE_SWITCH = 2

    def __init__(self, gpus: list[FakeGPU], topology: dict[tuple[int, int], int] | None = None,
                 no_driver: bool = False):
        self.gpus, self.topology, self.no_driver = gpus, topology or {}, no_driver
        self.initialized = 0

    def nvmlInit(self):
        if self.no_driver:
            raise NVMLError(self.NVML_ERROR_DRIVER_NOT_LOADED)
        self.initialized += 1

    def nvmlShutdown(self):
        self.initialized -= 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.gpus[h].uuid.encode()

    def nvmlDeviceGetName(self, h):
        return self.gpus[h].name

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self.gpus[h].bus.upper().encode())

    def nvmlDeviceGetMemoryInfo(self, h):
        g = self.gpus[h]
        return SimpleNamespace(total=g.total_mib * MiB, used=g.used_bytes)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.gpus[h].procs]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetTopologyCommonAncestor(self, h1, h2):
        return self.topology[(min(h1, h2), max(h1, h2))]

    def _link(self, h, link):
        links = self.gpus[h].nvlinks
        if link >= len(links):
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        return links[link]

    def nvmlDeviceGetNvLinkState(self, h, link):
        return int(self._link(h, link) is not None)

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        remote = self._link(h, link)
        return SimpleNamespace(busId=b"00000000:FF:00.0" if remote == "switch" else remote.encode())

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h, link):
        return self.NVML_NVLINK_DEVICE_TYPE_SWITCH if self._link(h, link) == "switch" else 0
