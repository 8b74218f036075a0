"""Where each replica goes: HAMi's policies with HAMi's numbers, on one machine's inventory.

Replicas are placed in order; each placement books its shares, memory and cores on the inventory
copy the next replica sees (HAMi's ``AddResourceUsage``). A request follows HAMi's webhook and
``GenerateResourceRequests``: no memory and no percentage = the whole card; ``memory_mib`` wins over
``memory_percentage``; a percentage of 0 is unset; cores > 100 are clamped; cores left unset become
100 (exclusive) when the request takes the whole card by percentage 100 or by naming no memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slicelm.slicing import hami_policy as hp
from slicelm.slicing.inventory import GPU, Inventory

POLICIES = (hp.BINPACK, hp.SPREAD, hp.TOPOLOGY)


@dataclass
class ReplicaRequest:
    model: str
    replica: int
    num_gpus: int = 1
    memory_mib: int | None = None
    memory_percentage: int | None = None
    cores: int | None = None  # None: HAMi's default (100 for a whole card, else 0)
    use_types: list[str] = field(default_factory=list)
    nouse_types: list[str] = field(default_factory=list)
    use_uuids: list[str] = field(default_factory=list)
    nouse_uuids: list[str] = field(default_factory=list)
    policy: str = hp.SPREAD  # binpack | spread | topology-aware (or a HAMi comma chain of those, numa, mutex)
    numa_bind: bool = False
    scoring_weights: tuple[float, float, float] = (1, 1, 1)

    def __post_init__(self) -> None:
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus: must be >= 0, got {self.num_gpus}")
        if self.memory_mib is not None and self.memory_mib < 0:
            raise ValueError(f"memory_mib: must be a non-negative number of MiB, got {self.memory_mib}")
        if self.memory_percentage is not None and not 0 <= self.memory_percentage <= 100:
            raise ValueError(f"memory_percentage: must be an integer between 0 and 100, got {self.memory_percentage}")
        if self.cores is not None and self.cores < 0:
            raise ValueError(f"cores: must be between 0 and 100, got {self.cores}")
        tokens = hp.policy_tokens(self.policy)
        if not self.policy or any(t not in hp.POLICY_TOKENS for t in tokens):
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)} (or a HAMi chain of "
                             f"{', '.join(hp.POLICY_TOKENS)}), got {self.policy!r}")
        w = self.scoring_weights
        if len(w) != 3 or any(x < 0 for x in w) or not any(w):
            raise ValueError(f"scoring_weights: expected (slot, core, memory) >= 0, not all 0, got {w}")

    def device_request(self) -> hp.DeviceRequest:
        memreq = self.memory_mib or 0
        pct = self.memory_percentage if self.memory_percentage else hp.UNSET_PERCENTAGE
        if memreq > 0:  # gpumem wins over the percentage
            pct = hp.UNSET_PERCENTAGE
        if pct == hp.UNSET_PERCENTAGE and memreq == 0:
            pct = 100
        cores = self.cores
        if cores is None:  # defaultExclusiveCoreIfNeeded: decided by which fields are present
            if self.memory_percentage is not None:
                exclusive = self.memory_percentage == 100
            else:
                exclusive = self.memory_mib is None
            cores = 100 if exclusive else 0
        return hp.DeviceRequest(self.num_gpus, memreq, pct, min(cores, 100))

    def constraints(self, inventory: Inventory) -> hp.Constraints:
        return hp.Constraints(policy=self.policy, numa_bind=self.numa_bind, use_types=list(self.use_types),
                              nouse_types=list(self.nouse_types), use_uuids=list(self.use_uuids),
                              nouse_uuids=list(self.nouse_uuids),
                              pair_scores={g.uuid: dict(g.links) for g in inventory.gpus})


@dataclass
class AssignedGPU:
    uuid: str
    index: int
    memory_mib: int
    cores: int


@dataclass
class Placement:
    model: str
    replica: int
    gpus: list[AssignedGPU]
    score: float  # HAMi's device score of the chosen GPU with this replica counted in (mean over GPUs)


@dataclass
class Unplaced:
    model: str
    replica: int
    reasons: list[str]

    @property
    def reason(self) -> str:
        """HAMi's one-line form: ``"1/2 CardInsufficientMemory, 1/2 CardTypeMismatch"``."""
        return ", ".join(self.reasons)


@dataclass
class Plan:
    placements: list[Placement]
    unplaced: list[Unplaced]
    inventory: Inventory  # what is used after the placements

    @property
    def feasible(self) -> bool:
        return not self.unplaced

    def to_json(self) -> dict[str, Any]:
        return {
            "placements": [{"model": p.model, "replica": p.replica,
                            "gpus": [{"uuid": g.uuid, "index": g.index, "memory_mib": g.memory_mib,
                                      "cores": g.cores} for g in p.gpus],
                            "score": round(p.score, 2)} for p in self.placements],
            "unplaced": [{"model": u.model, "replica": u.replica, "reasons": list(u.reasons)} for u in self.unplaced],
        }


def _usage(g: GPU) -> hp.DeviceUsage:
    return hp.DeviceUsage(id=g.uuid, index=g.index, used=g.used_shares, count=g.shares, usedmem=g.used_memory_mib,
                          totalmem=g.memory_mib, totalcore=g.cores, usedcores=g.used_cores, numa=g.numa,
                          type=g.type, health=g.health)


def place_one(req: ReplicaRequest, inventory: Inventory) -> Placement | Unplaced:
    """Places one replica and books it on ``inventory`` (mutated) when it fits."""
    if req.num_gpus == 0:
        return Placement(req.model, req.replica, [], 0.0)
    k = req.device_request()
    if k.nums > len(inventory.gpus):
        return Unplaced(req.model, req.replica, [hp.NODE_INSUFFICIENT_DEVICE])
    weights = hp.Weights(*req.scoring_weights)
    devices = [_usage(g) for g in inventory.gpus]
    scored = [(d, hp.compute_score(d, [k], weights)) for d in devices]
    ordered = hp.sort_devices(scored, req.policy, req.numa_bind)
    ok, picked, reasons = hp.fit([d for d, _ in ordered], k, req.constraints(inventory))
    if not ok:
        return Unplaced(req.model, req.replica, reasons)
    score_of = {d.id: s for d, s in scored}
    for cd in picked:
        g = inventory.by_uuid(cd.uuid)
        g.used_shares += 1
        g.used_memory_mib += cd.usedmem
        g.used_cores += cd.usedcores
    score = sum(score_of[cd.uuid] for cd in picked) / len(picked)
    return Placement(req.model, req.replica, [AssignedGPU(cd.uuid, cd.idx, cd.usedmem, cd.usedcores) for cd in picked],
                     score)


def place(requests: list[ReplicaRequest], inventory: Inventory) -> Plan:
    """Places ``requests`` in order on a copy of ``inventory``."""
    inv = inventory.copy()
    placements: list[Placement] = []
    unplaced: list[Unplaced] = []
    for req in requests:
        result = place_one(req, inv)
        (placements if isinstance(result, Placement) else unplaced).append(result)
    return Plan(placements, unplaced, inv)
