"""HAMi's scheduling decision on a pod, as the dashboard reads it from the pod's annotations.

``hami.io/vgpu-devices-allocated`` (after the device plugin allocated; ``hami.io/vgpu-devices-to-allocate``
before) holds, per container, ``{uuid},{type},{memory MiB},{cores}:`` for each device, containers ended by
``;``; ``hami.io/vgpu-node`` names the node.
"""

from __future__ import annotations

from dataclasses import dataclass

ALLOCATED = ("hami.io/vgpu-devices-allocated", "hami.io/vgpu-devices-to-allocate")
NODE = "hami.io/vgpu-node"


@dataclass(frozen=True)
class HamiDevice:
    uuid: str
    type: str
    memory_mib: int
    cores: int


def allocated_devices(annotations: dict[str, str]) -> list[HamiDevice]:
    """Every device of every container of the pod, in order; [] without HAMi's annotation or when it is garbled."""
    raw = next((annotations[k] for k in ALLOCATED if annotations.get(k)), "")
    out = []
    for container in raw.split(";"):
        for device in container.split(":"):
            fields = device.split(",")
            if len(fields) != 4 or not fields[0]:
                continue
            try:
                out.append(HamiDevice(fields[0], fields[1], int(fields[2]), int(fields[3])))
            except ValueError:
                continue
    return out
