"""The dashboard's replicas, one ``ReplicaRow`` each: from a ``slicelm up`` stack (its ``state.json`` through
``slicelm.stack.status``, every replica whatever its state) merged with the router's view of each backend, or from
the router's backends alone (static or Kubernetes discovery: slice figures from the replicas' own ``slicelm:*``
metrics and HAMi's pod annotations)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from slicelm.router.dashboard.hami import NODE, allocated_devices
from slicelm.router.dashboard.scrape import ReplicaScrape
from slicelm.router.discovery import Endpoint

MiB = 1 << 20


class BackendView(Protocol):
    """What the dashboard reads of a router backend (``slicelm.router.backends.Backend``)."""

    endpoint: Endpoint
    healthy: bool
    in_flight: int
    ejected_reason: str | None

    @property
    def url(self) -> str: ...

    @property
    def models(self) -> tuple[str, ...]: ...


@dataclass
class ReplicaRow:
    key: str  # "chat/0" in a stack, else the URL
    model: str  # the stack's model name, else the first served name
    replica: int | None
    url: str
    served_names: list[str]
    state: str  # the supervisor's state (stack), else the router's: ready / unhealthy
    status: str  # what the page shows: ready / starting / restarting / unhealthy / failed / stopped / ...
    restarts: int | None = None
    pid: int | None = None
    uptime_s: float | None = None
    device: str | None = None  # cuda / cpu / None (not known yet)
    gpus: list[dict[str, Any]] = field(default_factory=list)  # [{"uuid", "index"}]
    memory_mib: int | None = None  # the memory slice
    memory_used_mib: int | None = None  # NVML (GPU) or resident (CPU)
    cores: int | None = None  # SM share, percent
    policy: str | None = None
    node: str | None = None
    healthy: bool | None = None  # the router's view; None: not among its backends now
    in_flight: int = 0
    ejected_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _status(state: str, restarts: int, backend: BackendView | None) -> str:
    if state == "starting" and restarts:
        return "restarting"  # the supervisor restarts it: dead, backing off, then loading again
    if state == "ready" and backend is not None and not backend.healthy:
        return "unhealthy"
    return state


def stack_rows(status: dict[str, Any], backends: dict[str, BackendView]) -> list[ReplicaRow]:
    """``slicelm ps --format json``'s replicas, each with the router's view of its URL."""
    rows = []
    for r in status["replicas"]:
        b = backends.get(r["url"])
        rows.append(ReplicaRow(
            key=f"{r['model']}/{r['replica']}", model=r["model"], replica=r["replica"], url=r["url"],
            served_names=list(r.get("served_names") or [r["model"]]), state=r["state"],
            status=_status(r["state"], r["restarts"], b), restarts=r["restarts"], pid=r["pid"],
            uptime_s=r.get("uptime_s"), device=r.get("device"), gpus=list(r["gpus"]), memory_mib=r["memory_mib"],
            memory_used_mib=r.get("memory_used_mib"), cores=r["cores"], policy=r.get("policy"),
            healthy=b.healthy if b else None, in_flight=b.in_flight if b else 0,
            ejected_reason=b.ejected_reason if b else None))
    return rows


def pool_rows(backends: list[BackendView], scrapes: dict[str, ReplicaScrape]) -> list[ReplicaRow]:
    """The router's backends: slice figures from each replica's metrics, its GPU from HAMi's annotations."""
    rows = []
    for b in sorted(backends, key=lambda b: b.url):
        s = scrapes.get(b.url)
        hami = allocated_devices(b.endpoint.annotations)
        device = "cuda" if hami else _device(s)
        state = "ready" if b.healthy else "unhealthy"
        rows.append(ReplicaRow(
            key=b.url, model=b.models[0] if b.models else b.url, replica=None, url=b.url,
            served_names=list(b.models), state=state, status=state, device=device,
            gpus=[{"uuid": d.uuid, "index": None, "type": d.type} for d in hami],
            memory_mib=hami[0].memory_mib if hami else _mib(s.slice_memory_bytes if s else None),
            memory_used_mib=_mib(s.memory_used_bytes if s else None),
            cores=hami[0].cores if hami and hami[0].cores else _int(s.slice_sm_percent if s else None),
            node=b.endpoint.annotations.get(NODE), healthy=b.healthy, in_flight=b.in_flight,
            ejected_reason=b.ejected_reason))
    return rows


def _device(s: ReplicaScrape | None) -> str | None:
    """``cuda`` / ``cpu`` from the device label of the replica's ``slicelm:memory_used_bytes``; None unknown."""
    if s is None or s.device is None:
        return None
    return "cuda" if s.device.startswith("cuda") else "cpu"


def _mib(v: float | None) -> int | None:
    return None if v is None else int(v) // MiB


def _int(v: float | None) -> int | None:
    return None if v is None else int(v)
