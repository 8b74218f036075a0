"""The stack's plan: HAMi placement for GPU replicas (slicing.place) and the CPU for the rest.

``StackPlan.to_json()`` is the ``slicelm plan --format json`` contract:
``{"placements": [{"model", "replica", "gpus": [{"uuid", "index", "memory_mib", "cores"}], "score"}],
"unplaced": [{"model", "replica", "reasons": [...]}]}``; a CPU replica is a placement with ``"gpus": []``
and ``"score": null``. ``StackPlan.devices`` lists the inventory's GPUs (what ``state.json`` and the dashboard show
as each GPU's total).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slicelm.slicing.inventory import Inventory
from slicelm.slicing.placement import AssignedGPU, place
from slicelm.stack.requests import replica_requests
from slicelm.stack.spec import StackSpec
from slicelm.stack.weights import WeightSummary, flag_value, weight_summary


@dataclass
class ReplicaPlacement:
    model: str
    replica: int
    gpus: list[AssignedGPU]  # empty: the CPU
    score: float | None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "replica": self.replica,
                "gpus": [{"uuid": g.uuid, "index": g.index, "memory_mib": g.memory_mib, "cores": g.cores}
                         for g in self.gpus],
                "score": self.score}


@dataclass
class StackPlan:
    placements: list[ReplicaPlacement]
    unplaced: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)  # e.g. why replicas run on the CPU
    devices: list[dict[str, Any]] = field(default_factory=list)  # the inventory's GPUs: uuid, index, type, memory_mib
    weights: dict[str, WeightSummary] = field(default_factory=dict)  # per model, where its files are local
    gpu_free_mib: dict[str, int] = field(default_factory=dict)  # uuid -> memory no other process uses

    @property
    def feasible(self) -> bool:
        return not self.unplaced

    def placement(self, model: str, replica: int) -> ReplicaPlacement:
        return next(p for p in self.placements if p.model == model and p.replica == replica)

    def to_json(self) -> dict[str, Any]:
        return {"placements": [p.to_json() for p in self.placements], "unplaced": self.unplaced,
                "weights": {model: w.to_json() for model, w in self.weights.items()}}


def make_plan(spec: StackSpec, inventory: Inventory) -> StackPlan:
    gpu_requests, cpu_replicas = replica_requests(spec)
    notes = []
    if spec.slicelm.device == "cpu":
        notes.append("slicelm.device is cpu: every replica runs on the CPU")
    elif gpu_requests and not inventory.gpus:
        notes.append("no GPU on this machine: replicas that ask for a GPU run on the CPU")
        cpu_replicas += [(r.model, r.replica) for r in gpu_requests]
        gpu_requests = []
    placements: dict[tuple[str, int], ReplicaPlacement] = {
        key: ReplicaPlacement(key[0], key[1], [], None) for key in cpu_replicas}
    unplaced: list[dict[str, Any]] = []
    if gpu_requests:
        plan = place(gpu_requests, inventory)
        for p in plan.placements:
            placements[(p.model, p.replica)] = ReplicaPlacement(p.model, p.replica, list(p.gpus), p.score)
        unplaced = [{"model": u.model, "replica": u.replica, "reasons": list(u.reasons)} for u in plan.unplaced]
    order = [(m.name, r) for m in spec.models() for r in range(m.replicaCount)]
    devices = [{"uuid": g.uuid, "index": g.index, "type": g.type, "memory_mib": g.memory_mib} for g in inventory.gpus]
    free = {g.uuid: g.memory_mib - g.used_memory_mib for g in inventory.gpus}
    return StackPlan([placements[k] for k in order if k in placements], unplaced, notes, devices,
                     model_weights(spec), free)


def model_weights(spec: StackSpec) -> dict[str, WeightSummary]:
    """Each model's weight bytes (quantized ones counted as stored), where its directory is local."""
    out = {}
    for m in spec.models():
        extra = list(m.vllmConfig.extraArgs) if m.vllmConfig else []
        summary = weight_summary(m.modelURL, flag_value(extra, "--quantization") or flag_value(extra, "-q"))
        if summary is not None:
            out[m.name] = summary
    return out
