"""HAMi's GPU scheduling for NVIDIA devices on one node, as Project-HAMi/HAMi 4707fb0 does it.

- :func:`compute_score`: ``DeviceListsScore.ComputeScore`` (pkg/scheduler/policy/gpu_policy.go), in
  float32 arithmetic like the Go code, so scores and ties come out the same.
- :func:`sort_devices`: ``DeviceUsageList.Less`` (binpack / spread / numa / mutex and comma chains, NUMA
  as tie-break or, with numa-bind, as the primary key).
- :func:`fit`: ``NvidiaGPUDevices.Fit`` (pkg/device/nvidia/device.go): walks the sorted list from the end,
  counts a reason per rejected card, topology-aware sets from pair scores. Not ported: MIG, resource
  quotas, cordons and the vgpu-mode annotation (no such things on one machine).
- :func:`parse_scoring_weights`: the ``hami.io/device-scoring-weights`` annotation.
"""

from __future__ import annotations

import itertools
import struct
from collections import Counter
from dataclasses import dataclass, field
from functools import cmp_to_key

# Reason names (pkg/device/common/common.go)
CARD_TYPE_MISMATCH = "CardTypeMismatch"
CARD_UUID_MISMATCH = "CardUuidMismatch"
CARD_TIME_SLICING_EXHAUSTED = "CardTimeSlicingExhausted"
CARD_COMPUTE_UNITS_EXHAUSTED = "CardComputeUnitsExhausted"
CARD_INSUFFICIENT_MEMORY = "CardInsufficientMemory"
CARD_INSUFFICIENT_CORE = "CardInsufficientCore"
CARD_NOT_HEALTH = "CardNotHealth"
NUMA_NOT_FIT = "NumaNotFit"
EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT = "ExclusiveDeviceAllocateConflict"
NODE_INSUFFICIENT_DEVICE = "NodeInsufficientDevice"
ALLOCATED_CARDS_INSUFFICIENT_REQUEST = "AllocatedCardsInsufficientRequest"

BINPACK, SPREAD, NUMA, MUTEX, TOPOLOGY = "binpack", "spread", "numa", "mutex", "topology-aware"
POLICY_TOKENS = (BINPACK, SPREAD, NUMA, MUTEX, TOPOLOGY)
SORT_KEYS = (BINPACK, SPREAD, NUMA)
WEIGHT = 10  # util.Weight
UNSET_PERCENTAGE = 101  # HAMi's "no gpumem-percentage" sentinel


def f32(x: float) -> float:
    """Round to the nearest float32, as Go's float32 arithmetic does after every operation."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass
class DeviceUsage:
    """``device.DeviceUsage``: one GPU as the scheduler sees it (memory in MiB)."""

    id: str
    index: int = 0
    used: int = 0
    count: int = 0
    usedmem: int = 0
    totalmem: int = 0
    totalcore: int = 0
    usedcores: int = 0
    numa: int = 0
    type: str = ""
    health: bool = True


@dataclass
class DeviceRequest:
    """``device.ContainerDeviceRequest`` after HAMi's webhook and GenerateResourceRequests."""

    nums: int
    memreq: int = 0
    mem_percentagereq: int = UNSET_PERCENTAGE
    coresreq: int = 0
    type: str | None = None  # ComputeScore counts only requests of the device's type; None = any


@dataclass(frozen=True)
class Weights:
    slot: float = 1
    core: float = 1
    memory: float = 1


@dataclass
class Constraints:
    """What Fit reads from the pod's annotations and the node's pair scores."""

    policy: str = SPREAD
    numa_bind: bool = False
    use_types: list[str] = field(default_factory=list)
    nouse_types: list[str] = field(default_factory=list)
    use_uuids: list[str] = field(default_factory=list)
    nouse_uuids: list[str] = field(default_factory=list)
    pair_scores: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class ContainerDevice:
    idx: int
    uuid: str
    usedmem: int
    usedcores: int


def compute_score(dev: DeviceUsage, requests: list[DeviceRequest], weights: Weights = Weights()) -> float:
    if dev.count == 0 or dev.totalcore == 0 or dev.totalmem == 0:
        return 0.0
    request = core = mem = 0
    for r in requests:
        if r.type is not None and r.type != dev.type:
            continue
        request += 1
        core += r.coresreq
        if r.mem_percentagereq not in (0, UNSET_PERCENTAGE):
            mem += dev.totalmem * r.mem_percentagereq // 100
        else:
            mem += r.memreq
    used = f32(f32(request + dev.used) / f32(dev.count))
    cores = f32(f32(core + dev.usedcores) / f32(dev.totalcore))
    memory = f32(f32(mem + dev.usedmem) / f32(dev.totalmem))
    total = f32(f32(f32(weights.slot) * used) + f32(f32(weights.core) * cores))
    total = f32(total + f32(f32(weights.memory) * memory))
    return f32(WEIGHT * total)


def policy_tokens(policy: str) -> list[str]:
    return [t.strip() for t in policy.split(",")]


def _sort_key_chain(policy: str, numa_bind: bool) -> list[str]:
    chain = list(dict.fromkeys(t for t in policy_tokens(policy) if t in SORT_KEYS)) or [SPREAD]
    if numa_bind and chain[0] != NUMA:
        chain = [NUMA] + [k for k in chain if k != NUMA]
    return chain


def _less_by_chain(a: tuple[DeviceUsage, float], b: tuple[DeviceUsage, float], chain: list[str]) -> bool:
    (da, sa), (db, sb) = a, b
    for key in chain:
        if key == BINPACK and sa != sb:
            return sa < sb
        if key == SPREAD and sa != sb:
            return sa > sb
        if key == NUMA and da.numa != db.numa:
            return da.numa < db.numa
    return da.index < db.index


def less(a: tuple[DeviceUsage, float], b: tuple[DeviceUsage, float], policy: str, numa_bind: bool) -> bool:
    """``DeviceUsageList.Less`` on (device, score) pairs."""
    if "," in policy or policy == NUMA:
        return _less_by_chain(a, b, _sort_key_chain(policy, numa_bind))
    (da, sa), (db, sb) = a, b
    binpack = policy == BINPACK
    if policy == MUTEX:
        return da.used > db.used if da.used != db.used else da.numa < db.numa
    if numa_bind:
        if da.numa == db.numa:
            return sa < sb if binpack else sa > sb
        return da.numa > db.numa if binpack else da.numa < db.numa
    if sa != sb:
        return sa < sb if binpack else sa > sb
    return da.numa < db.numa


def sort_devices(scored: list[tuple[DeviceUsage, float]], policy: str, numa_bind: bool
                 ) -> list[tuple[DeviceUsage, float]]:
    """Sorted as HAMi sorts before Fit (stable where Go's sort leaves ties unspecified)."""
    def cmp(a, b):
        return -1 if less(a, b, policy, numa_bind) else (1 if less(b, a, policy, numa_bind) else 0)
    return sorted(scored, key=cmp_to_key(cmp))


def _matches_uuid(values: list[str], uuid: str) -> bool:
    return any(v.strip() == uuid for v in values)


def check_uuid(c: Constraints, uuid: str) -> bool:
    if [u for u in c.use_uuids if u.strip()] and not _matches_uuid(c.use_uuids, uuid):
        return False
    return not _matches_uuid(c.nouse_uuids, uuid)


def _matches_type(values: list[str], card_type: str) -> bool:
    card = card_type.upper()
    return any(t.strip() and t.strip().upper() in card for t in values)


def check_type(c: Constraints, card_type: str) -> bool:
    """``device.CheckType``: case-insensitive substring match of the card model against use/nouse lists."""
    if [t for t in c.use_types if t.strip()] and not _matches_type(c.use_types, card_type):
        return False
    return not _matches_type(c.nouse_types, card_type)


def gen_reason(reasons: Counter[str], cards: int) -> list[str]:
    """``common.GenReason`` as a list: ``"<n>/<cards> <Reason>"`` sorted as strings."""
    return sorted(f"{n}/{cards} {r}" for r, n in reasons.items())


def _resolve_memreq(dev: DeviceUsage, k: DeviceRequest) -> int:
    memreq = k.memreq if k.memreq > 0 else 0
    if k.mem_percentagereq != UNSET_PERCENTAGE and k.memreq == 0:
        memreq = dev.totalmem * k.mem_percentagereq // 100
    return memreq


def _reject(dev: DeviceUsage, k: DeviceRequest, memreq: int, mutex: bool) -> str | None:
    """The reason Fit skips a healthy card of the right type and uuid, or None if it fits."""
    if dev.count <= dev.used:
        return CARD_TIME_SLICING_EXHAUSTED
    if mutex and dev.used > 0:
        return EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT
    if dev.totalmem - dev.usedmem < memreq:
        return CARD_INSUFFICIENT_MEMORY
    if dev.totalcore - dev.usedcores < k.coresreq:
        return CARD_INSUFFICIENT_CORE
    if dev.totalcore == 100 and k.coresreq == 100 and dev.used > 0:
        return EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT
    if dev.totalcore != 0 and dev.usedcores == dev.totalcore and k.coresreq == 0:
        return CARD_COMPUTE_UNITS_EXHAUSTED
    return None


def fit(devices: list[DeviceUsage], request: DeviceRequest, c: Constraints
        ) -> tuple[bool, list[ContainerDevice], list[str]]:
    """``Fit``: ``devices`` sorted as :func:`sort_devices` leaves them; returns (fits, picked, reasons)."""
    tokens = policy_tokens(c.policy)
    topology, mutex = TOPOLOGY in tokens, MUTEX in tokens
    k = DeviceRequest(request.nums, request.memreq, request.mem_percentagereq, min(request.coresreq, 100))
    origin, nums, prevnuma = request.nums, request.nums, None
    picked: list[ContainerDevice] = []
    reasons: Counter[str] = Counter()
    for dev in reversed(devices):
        if not dev.health:
            reasons[CARD_NOT_HEALTH] += 1
            continue
        if not check_type(c, dev.type):
            reasons[CARD_TYPE_MISMATCH] += 1
            continue
        if c.numa_bind and prevnuma != dev.numa:
            if nums != origin:
                reasons[NUMA_NOT_FIT] += len(picked)
            nums, prevnuma, picked = origin, dev.numa, []
        if not check_uuid(c, dev.id):
            reasons[CARD_UUID_MISMATCH] += 1
            continue
        memreq = _resolve_memreq(dev, k)
        reason = _reject(dev, k, memreq, mutex)
        if reason is not None:
            reasons[reason] += 1
            continue
        if nums > 0:
            if not topology:
                nums -= 1
            picked.append(ContainerDevice(dev.index, dev.id, memreq, k.coresreq))
        if nums == 0 and not topology:
            return True, picked, []
    if topology and len(picked) == origin:
        return True, picked, []
    if topology and len(picked) > origin:
        if origin == 1:
            return True, worst_single_card(picked, c.pair_scores), []
        return True, best_combination(list(itertools.combinations(picked, origin)), c.pair_scores), []
    if picked:
        reasons[ALLOCATED_CARDS_INSUFFICIENT_REQUEST] = len(picked)
    return False, picked, gen_reason(reasons, len(devices))


def _pair(scores: dict[str, dict[str, int]], a: str, b: str) -> int:
    return scores.get(a, {}).get(b, 0)


def worst_single_card(devs: list[ContainerDevice], scores: dict[str, dict[str, int]]) -> list[ContainerDevice]:
    """``computeWorstSingleCard``: the card with the lowest total pair score to the other candidates."""
    totals = [sum(_pair(scores, d.uuid, o.uuid) for o in devs if o.uuid != d.uuid) for d in devs]
    return [devs[totals.index(min(totals))]] if devs else []


def best_combination(combos: list[tuple[ContainerDevice, ...]], scores: dict[str, dict[str, int]]
                     ) -> list[ContainerDevice]:
    """``computeBestCombination``: the set with the highest sum of pair scores (first one on ties)."""
    def total(combo):
        return sum(_pair(scores, a.uuid, b.uuid) for a, b in itertools.combinations(combo, 2))
    return list(max(combos, key=total)) if combos else []


def parse_scoring_weights(value: str) -> Weights:
    """``hami.io/device-scoring-weights: slot=a,core=b,memory=c`` (non-negative integers, not all 0)."""
    key = "hami.io/device-scoring-weights"
    parts = value.split(",")
    if len(parts) != 3:
        raise ValueError(f"invalid {key} annotation {value!r}: expected slot, core, and memory weights")
    got: dict[str, int] = {}
    for part in parts:
        name, sep, raw = part.strip().partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"invalid {key} annotation {value!r}: expected key=value entries")
        if name in got:
            raise ValueError(f"invalid {key} annotation {value!r}: duplicate {name!r} weight")
        try:
            weight = int(raw.strip(), 10)
        except ValueError:
            raise ValueError(f"invalid {key} annotation {value!r}: {name!r} weight must be an integer") from None
        if weight < 0:
            raise ValueError(f"invalid {key} annotation {value!r}: {name!r} weight must not be negative")
        if name not in ("slot", "core", "memory"):
            raise ValueError(f"invalid {key} annotation {value!r}: unknown weight {name!r}")
        got[name] = weight
    if not any(got.values()):
        raise ValueError(f"invalid {key} annotation {value!r}: at least one weight must be positive")
    return Weights(got["slot"], got["core"], got["memory"])
