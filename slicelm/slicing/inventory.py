"""The GPUs a plan can use: from NVML on this machine, or from a HAMi node-register JSON file.

The file is the list HAMi's device plugin writes to a node's ``hami.io/node-nvidia-register``
annotation, ``[{"id", "index", "count", "devmem", "devcore", "type", "numa", "mode", "health"}]``,
plus optional ``used`` (shares), ``usedmem`` (MiB), ``usedcores`` and ``links`` (peer id → HAMi pair
score) to plan for a partly busy machine. A JSON object holding the node's annotations
(``hami.io/node-nvidia-register`` and optionally ``hami.io/node-nvidia-score``) is read as well.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slicelm.slicing import nvml_probe

logger = logging.getLogger(__name__)

REGISTER_ANNOTATION = "hami.io/node-nvidia-register"
SCORE_ANNOTATION = "hami.io/node-nvidia-score"
DEFAULT_SHARES = 10  # HAMi's deviceSplitCount


class InventoryError(ValueError):
    """An inventory file that is not a HAMi node register; the message names the entry and field."""


@dataclass
class GPU:
    uuid: str
    index: int
    type: str
    memory_mib: int
    cores: int = 100
    shares: int = DEFAULT_SHARES
    numa: int = 0
    health: bool = True
    used_shares: int = 0
    used_memory_mib: int = 0
    used_cores: int = 0
    links: dict[str, int] = field(default_factory=dict)  # peer uuid -> HAMi pair score

    def to_json(self) -> dict[str, Any]:
        return {"id": self.uuid, "index": self.index, "count": self.shares, "devmem": self.memory_mib,
                "devcore": self.cores, "type": self.type, "numa": self.numa, "health": self.health,
                "used": self.used_shares, "usedmem": self.used_memory_mib, "usedcores": self.used_cores,
                "links": dict(self.links)}


@dataclass
class Inventory:
    gpus: list[GPU]

    @classmethod
    def from_nvml(cls, nvml: Any = None, own_pids: Iterable[int] = ()) -> Inventory:
        """This machine's GPUs; processes other than ``own_pids`` (and this one) count as used memory
        and one share each. Empty where NVML is missing or finds no driver (a CPU-only machine)."""
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                return cls([])
        try:
            probed = nvml_probe.probe(nvml, own_pids)
        except nvml.NVMLError as e:
            logger.info("NVML unavailable (%s): no GPUs", e)
            return cls([])
        return cls([GPU(uuid=p.uuid, index=p.index, type=p.type, memory_mib=p.memory_mib, numa=p.numa,
                        used_shares=len(p.foreign_pids), used_memory_mib=min(p.foreign_memory_mib, p.memory_mib),
                        links=p.links) for p in probed])

    @classmethod
    def from_file(cls, path: str | Path) -> Inventory:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise InventoryError(f"{path}: cannot read: {e}") from None
        except json.JSONDecodeError as e:
            raise InventoryError(f"{path}: not JSON: {e}") from None
        try:
            return cls.from_json(data)
        except InventoryError as e:
            raise InventoryError(f"{path}: {e}") from None

    @classmethod
    def from_json(cls, data: Any) -> Inventory:
        scores: Any = None
        if isinstance(data, dict):
            if REGISTER_ANNOTATION not in data:
                raise InventoryError(f"expected a JSON list of GPUs or an object with {REGISTER_ANNOTATION!r}")
            data, scores = _unwrap(data.get(REGISTER_ANNOTATION)), _unwrap(data.get(SCORE_ANNOTATION))
        if not isinstance(data, list):
            raise InventoryError("expected a JSON list of GPUs")
        gpus = [_gpu_from_entry(entry, i) for i, entry in enumerate(data)]
        inv = cls(gpus)
        if scores is not None:
            _apply_pair_scores(inv, scores)
        inv.validate()
        return inv

    @classmethod
    def detect(cls) -> Inventory:
        """NVML when it works here, else empty (plan everything for the CPU)."""
        return cls.from_nvml()

    def validate(self) -> None:
        seen: set[str] = set()
        for i, g in enumerate(self.gpus):
            if g.uuid in seen:
                raise InventoryError(f"[{i}].id: duplicate GPU id {g.uuid!r}")
            seen.add(g.uuid)
        for i, g in enumerate(self.gpus):
            for peer in g.links:
                if peer not in seen or peer == g.uuid:
                    raise InventoryError(f"[{i}].links: {peer!r} is not another GPU of this inventory")

    def by_uuid(self, uuid: str) -> GPU:
        for g in self.gpus:
            if g.uuid == uuid:
                return g
        raise KeyError(uuid)

    def copy(self) -> Inventory:
        return copy.deepcopy(self)

    def to_json(self) -> list[dict[str, Any]]:
        return [g.to_json() for g in self.gpus]


def _unwrap(value: Any) -> Any:
    """Annotation values are JSON strings; accept them decoded too."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise InventoryError(f"annotation value is not JSON: {e}") from None
    return value


_INT_FIELDS = {"index": None, "count": DEFAULT_SHARES, "devmem": None, "devcore": 100, "numa": 0,
               "used": 0, "usedmem": 0, "usedcores": 0}


def _int_field(entry: dict[str, Any], key: str, where: str, default: int | None) -> int:
    value = entry.get(key, default)
    if value is None:
        raise InventoryError(f"{where}.{key}: required")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InventoryError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    return value


def _gpu_from_entry(entry: Any, i: int) -> GPU:
    where = f"[{i}]"
    if not isinstance(entry, dict):
        raise InventoryError(f"{where}: expected an object, got {entry!r}")
    if not isinstance(entry.get("id"), str) or not entry["id"]:
        raise InventoryError(f"{where}.id: required (the GPU's uuid)")
    if not isinstance(entry.get("type", ""), str):
        raise InventoryError(f"{where}.type: expected a string")
    health = entry.get("health", True)
    if not isinstance(health, bool):
        raise InventoryError(f"{where}.health: expected true or false")
    ints = {k: _int_field(entry, k, where, i if k == "index" else d) for k, d in _INT_FIELDS.items()}
    if ints["devmem"] == 0:
        raise InventoryError(f"{where}.devmem: must be > 0 (MiB)")
    links = entry.get("links", {})
    if not isinstance(links, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              for k, v in links.items()):
        raise InventoryError(f"{where}.links: expected an object of peer id -> integer pair score")
    for key, total in (("used", "count"), ("usedmem", "devmem"), ("usedcores", "devcore")):
        if ints[key] > ints[total]:
            raise InventoryError(f"{where}.{key}: {ints[key]} exceeds {total} {ints[total]}")
    return GPU(uuid=entry["id"], index=ints["index"], type=entry.get("type", ""), memory_mib=ints["devmem"],
               cores=ints["devcore"], shares=ints["count"], numa=ints["numa"], health=health,
               used_shares=ints["used"], used_memory_mib=ints["usedmem"], used_cores=ints["usedcores"],
               links=dict(links))


def _apply_pair_scores(inv: Inventory, scores: Any) -> None:
    """``hami.io/node-nvidia-score``: ``[{"uuid": id, "score": {peer: n}}]``."""
    if not isinstance(scores, list):
        raise InventoryError(f"{SCORE_ANNOTATION}: expected a list of {{uuid, score}}")
    for i, item in enumerate(scores):
        if not isinstance(item, dict) or not isinstance(item.get("score", {}), dict):
            raise InventoryError(f"{SCORE_ANNOTATION}[{i}]: expected {{uuid, score}}")
        try:
            gpu = inv.by_uuid(item.get("uuid"))
        except KeyError:
            raise InventoryError(f"{SCORE_ANNOTATION}[{i}].uuid: {item.get('uuid')!r} is not a GPU of the register"
                                 ) from None
        gpu.links.update(item.get("score", {}))
