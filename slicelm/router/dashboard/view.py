"""The JSON of ``/dashboard/api/state`` (what the page and ``slicelm top`` draw), built from the replica rows and
the history of samples:

``{"time", "interval_s", "windows": {"rate_s", "latency_s"}, "router": {...}, "stack": {"run_dir", "phase"} | null,
"replicas": [row + load], "models": [{"name", "served_names", "replicas", "ready", ...load}],
"gpus": [{"uuid", "index", "type", "memory_mib", "memory_used_mib", "label", "slices": [slice]}],
"cpu": {"memory_mib", "cores", "slices": [slice]} | null, "history": {"t": [...], "models": {name: {series: [...]}},
"gpus": {gpu id: [used MiB...]}, "cpu": [...]}}``; a slice is ``{"key", "model", "replica", "memory_mib",
"memory_used_mib", "cores", "policy", "status"}``; times in seconds, memory in MiB, rates per second, usage 0..1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from slicelm.router.dashboard.history import LATENCY_WINDOW_S, RATE_WINDOW_S, History, load_of
from slicelm.router.dashboard.rows import ReplicaRow

SERIES = ("requests_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "running", "waiting", "kv_usage")


@dataclass
class Meta:
    """Where the state comes from and what the router is doing."""

    discovery: str  # stack / static / k8s
    routing_logic: str | None = None
    run_dir: str | None = None
    phase: str | None = None  # the stack's, when there is one
    interval_s: float = 2.0
    history_s: float = 600.0
    version: str = ""
    backends: int = 0
    healthy: int = 0
    queued: dict[str, int] = field(default_factory=dict)
    host_memory_mib: int | None = None  # this machine's memory (the CPU view's total), None on Kubernetes


def slice_of(r: ReplicaRow) -> dict[str, Any]:
    return {"key": r.key, "model": r.model, "replica": r.replica, "memory_mib": r.memory_mib,
            "memory_used_mib": r.memory_used_mib, "cores": r.cores, "policy": r.policy, "status": r.status}


def _new_gpu(uuid: str | None, index: int | None, type_: str | None, label: str) -> dict[str, Any]:
    return {"uuid": uuid, "index": index, "type": type_, "memory_mib": None, "memory_used_mib": None,
            "label": label, "slices": []}


def gpu_views(rows: list[ReplicaRow], gpus: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each GPU with the slices of the replicas on it: the stack's GPUs (totals and NVML use) or, without a
    stack, one per GPU named by HAMi, else one per replica that reports a CUDA device."""
    out: dict[str, dict[str, Any]] = {}
    for g in gpus:
        out[g["uuid"]] = {**_new_gpu(g["uuid"], g["index"], g.get("type"), f"GPU {g['index']}"),
                          "memory_mib": g.get("memory_mib"), "memory_used_mib": g.get("memory_used_mib")}
    for r in rows:
        if r.device != "cuda":
            continue
        for g in r.gpus or [{"uuid": None}]:
            gid = g["uuid"] or r.url
            if gid not in out:
                label = f"GPU {g['index']}" if g.get("index") is not None else (
                    f"GPU {g['uuid']}" if g["uuid"] else f"GPU of {r.url}")
                out[gid] = _new_gpu(g["uuid"], g.get("index"), g.get("type"), label)
            out[gid]["slices"].append(slice_of(r))
    return sorted(out.values(), key=lambda g: (g["index"] is None, g["index"] or 0, g["label"]))


def cpu_view(rows: list[ReplicaRow], host_memory_mib: int | None) -> dict[str, Any] | None:
    slices = [slice_of(r) for r in rows if r.device == "cpu"]
    if not slices:
        return None
    return {"memory_mib": host_memory_mib, "cores": os.cpu_count() if host_memory_mib else None, "slices": slices}


def _by_model(rows: list[ReplicaRow]) -> dict[str, list[ReplicaRow]]:
    out: dict[str, list[ReplicaRow]] = {}
    for r in rows:
        out.setdefault(r.model, []).append(r)
    return out


def model_views(rows: list[ReplicaRow], history: History) -> list[dict[str, Any]]:
    return [{"name": name, "served_names": rs[0].served_names, "replicas": len(rs),
             "ready": sum(r.status == "ready" for r in rs), **load_of(history, [r.key for r in rs]).to_json()}
            for name, rs in _by_model(rows).items()]


def _gpu_id(g: dict[str, Any]) -> str:
    return g["uuid"] or g["label"]


def _used(slices: list[dict[str, Any]]) -> int | None:
    used = [s["memory_used_mib"] for s in slices if s["memory_used_mib"] is not None]
    return sum(used) if used else None


def chart_point(models: list[dict[str, Any]], gpus: list[dict[str, Any]], cpu: dict[str, Any] | None
                ) -> dict[str, Any]:
    """The values the charts plot for one sample."""
    return {"models": {m["name"]: {k: m[k] for k in SERIES} for m in models},
            "gpus": {_gpu_id(g): g["memory_used_mib"] if g["memory_used_mib"] is not None else _used(g["slices"])
                     for g in gpus},
            "cpu": _used(cpu["slices"]) if cpu else None}


def history_json(history: History) -> dict[str, Any]:
    """The samples' chart points as one array per series, aligned with ``t`` (null where a series has no value)."""
    points = [s for s in history.samples if s.point]
    models: dict[str, dict[str, list[float | None]]] = {}
    gpus: dict[str, list[float | None]] = {}
    for i, s in enumerate(points):
        for name, values in s.point["models"].items():
            series = models.setdefault(name, {k: [None] * len(points) for k in SERIES})
            for k in SERIES:
                series[k][i] = values[k]
        for gid, used in s.point["gpus"].items():
            gpus.setdefault(gid, [None] * len(points))[i] = used
    return {"t": [round(s.t, 3) for s in points], "models": models, "gpus": gpus,
            "cpu": [s.point["cpu"] for s in points]}


def build_state(meta: Meta, rows: list[ReplicaRow], gpus: list[dict[str, Any]], history: History,
                now: float) -> dict[str, Any]:
    """The state at the latest sample; also stores that sample's chart point."""
    models = model_views(rows, history)
    gpu_list, cpu = gpu_views(rows, gpus), cpu_view(rows, meta.host_memory_mib)
    if history.latest is not None:
        history.latest.point = chart_point(models, gpu_list, cpu)
    return {"time": now, "interval_s": meta.interval_s, "history_s": meta.history_s,
            "windows": {"rate_s": RATE_WINDOW_S, "latency_s": LATENCY_WINDOW_S},
            "router": {"discovery": meta.discovery, "routing_logic": meta.routing_logic, "version": meta.version,
                       "backends": meta.backends, "healthy": meta.healthy, "queued": meta.queued},
            "stack": {"run_dir": meta.run_dir, "phase": meta.phase} if meta.run_dir else None,
            "replicas": [{**r.to_json(), **load_of(history, [r.key]).to_json()} for r in rows],
            "models": models, "gpus": gpu_list, "cpu": cpu}
