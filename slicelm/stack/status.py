"""``slicelm ps`` and ``slicelm down``: read a running stack's ``state.json`` from any shell.

``ps --format json`` is a contract: ``{"router": {"url"} | null, "replicas": [{"model", "replica", "pid",
"url", "state", "restarts", "gpus", "memory_mib", "cores"}]}`` (plus ``port``, ``memory_used_mib``,
``uptime_s``, ``device``, ``policy``, ``served_names``, ``phase``, ``router_state``, and ``weights_bytes`` /
``quantization`` where the model directory is local); ``gpus`` lists ``{"uuid", "index"}`` (empty on the CPU),
``memory_mib`` is the slice, ``memory_used_mib`` what NVML measures (GPU) or the resident memory of the replica's
processes (CPU). A top-level ``gpus`` lists the machine's GPUs: ``{"uuid", "index", "type", "memory_mib" (total),
"memory_used_mib" (NVML, every process)}``. ``router`` is null until the router answers ``/health`` (so its URL
accepts connections): while the replicas load, while it starts, and while it restarts; ``router_state`` says which.
Rows also carry ``sleeping`` (replicas with --enable-sleep-mode), and with the memory broker ``memory_held_mib`` /
``memory_borrowed_mib``: what the broker's books say the replica holds and holds beyond its slice; a top-level
``broker`` holds its per-GPU books.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from slicelm.stack.procs import group_members, process_groups, signal_group
from slicelm.stack.state import live_supervisor, pid_alive, read_state
from slicelm.stack.weights import flag_value, weight_summary


@dataclass
class NvmlUse:
    """NVML's view of this machine: GPU memory per pid and per GPU (uuid), in MiB."""

    by_pid: dict[int, int] = field(default_factory=dict)
    by_gpu: dict[str, int] = field(default_factory=dict)


def nvml_use() -> NvmlUse:
    """Read once from NVML (all GPUs); empty without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return NvmlUse()
    use = NvmlUse()
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            use.by_gpu[uuid.decode() if isinstance(uuid, bytes) else uuid] = \
                int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) // (1 << 20)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.usedGpuMemory is not None:
                    use.by_pid[proc.pid] = use.by_pid.get(proc.pid, 0) + int(proc.usedGpuMemory) // (1 << 20)
    except pynvml.NVMLError:
        pass
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return use


def resident_mib(pids: list[int]) -> int | None:
    """Resident memory of ``pids`` together (a CPU replica: its server and engine process), in MiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total // (1 << 20) or None


def _memory_used(r: dict[str, Any], members: list[int], used: dict[int, int]) -> int | None:
    """NVML's use of a GPU replica, resident memory of a CPU one (its whole process group)."""
    if r.get("gpus"):
        return sum(used.get(p, 0) for p in members) or None
    return resident_mib(members)



def _sleeping(r: dict[str, Any]) -> bool | None:
    """Asks a ready replica started with --enable-sleep-mode whether it sleeps (None: not asked / no answer)."""
    if r.get("state") != "ready" or "--enable-sleep-mode" not in (r.get("command") or []):
        return None
    try:
        with urllib.request.urlopen(f"{r['url']}/is_sleeping", timeout=1.0) as resp:
            return bool(json.loads(resp.read()).get("is_sleeping"))
    except (OSError, ValueError):
        return None


def _replica_row(r: dict[str, Any], supervisor_alive: bool, used: dict[int, int],
                 groups: dict[int, list[int]], broker: dict[str, Any] | None = None) -> dict[str, Any]:
    pid = r.get("pid")
    alive = pid_alive(pid)
    state = r["state"] if supervisor_alive else ("orphaned" if alive else "stopped")
    started = r.get("started_at")
    cmd = r.get("command") or []
    weights = None
    if "serve" in cmd and cmd.index("serve") + 1 < len(cmd):
        weights = weight_summary(cmd[cmd.index("serve") + 1], flag_value(cmd, "--quantization"))
    row = {"model": r["model"], "replica": r["replica"], "pid": pid if alive else None, "url": r["url"],
           "state": state, "restarts": r["restarts"], "gpus": r.get("gpus", []), "memory_mib": r.get("memory_mib"),
           "cores": r.get("cores"), "port": r.get("port"),
           "memory_used_mib": _memory_used(r, groups.get(pid, []), used) if alive else None,
           "uptime_s": round(time.time() - started, 1) if started and alive else None,
           "device": r.get("device", "cuda" if r.get("gpus") else "cpu"), "policy": r.get("policy"),
           "served_names": r.get("served_names") or [r["model"]],
           "weights_bytes": weights.total_bytes if weights else None,
           "quantization": weights.quantization if weights else None,
           "sleeping": _sleeping(r) if supervisor_alive and alive else None}
    member = (broker or {}).get("members", {}).get(f"{r['model']}/{r['replica']}")
    if member is not None:
        row["memory_held_mib"], row["memory_borrowed_mib"] = member["used"] >> 20, member["borrowed"] >> 20
    return row


def _gpu_row(g: dict[str, Any], use: NvmlUse) -> dict[str, Any]:
    return {"uuid": g["uuid"], "index": g["index"], "type": g.get("type"), "memory_mib": g.get("memory_mib"),
            "memory_used_mib": use.by_gpu.get(g["uuid"])}


def status(run_dir: Path) -> dict[str, Any] | None:
    """The ``ps --format json`` object, or None when no stack ever ran in ``run_dir``."""
    state = read_state(run_dir)
    if state is None:
        return None
    sup = live_supervisor(run_dir)
    use = nvml_use() if state.get("gpus") or any(r.get("gpus") for r in state["replicas"]) else NvmlUse()
    router = state.get("router") if sup else None
    ready = router is not None and router.get("state") == "ready"
    groups = process_groups()
    broker = state.get("broker") if sup else None
    return {"router": {"url": router["url"]} if ready else None,
            "router_state": router.get("state") if router else None,
            "replicas": [_replica_row(r, sup is not None, use.by_pid, groups, broker) for r in state["replicas"]],
            "gpus": [_gpu_row(g, use) for g in state.get("gpus") or []],
            "phase": state.get("phase") if sup else "stopped", "supervisor_pid": sup, "broker": broker}


def _fmt_uptime(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def table(st: dict[str, Any], title: str | None = None) -> Any:
    from rich.table import Table

    t = Table(title=title)
    borrowing = st.get("broker") is not None
    for col in ("model", "replica", "GPU", "memory slice / used", "weights",
                *(["held / borrowed"] if borrowing else []), "cores", "state", "restarts", "uptime", "port"):
        t.add_column(col)
    for r in st["replicas"]:
        gpu = ",".join(str(g["index"]) for g in r["gpus"]) or "cpu"
        slice_ = f"{r['memory_mib']} MiB" if r.get("memory_mib") else ("whole" if r["gpus"] else "-")
        used = f"{r['memory_used_mib']} MiB" if r.get("memory_used_mib") else "-"
        cores = f"{r['cores']}%" if r.get("cores") else "-"
        state = "asleep" if r.get("sleeping") else r["state"]
        color = {"ready": "green", "asleep": "blue", "starting": "yellow", "restarting": "yellow"}.get(state, "red")
        weights = f"{r['weights_bytes'] / (1 << 30):.2f} GiB {r.get('quantization') or ''}".strip() \
            if r.get("weights_bytes") else "-"
        held = ([f"{r['memory_held_mib']} / {r['memory_borrowed_mib']} MiB" if "memory_held_mib" in r else "-"]
                if borrowing else [])
        t.add_row(r["model"], str(r["replica"]), gpu, f"{slice_} / {used}", weights, *held, cores,
                  f"[{color}]{state}[/]",
                  str(r["restarts"]), _fmt_uptime(r.get("uptime_s")), str(r.get("port") or "-"))
    return t


def down(run_dir: Path, timeout_s: float = 60.0) -> list[str]:
    """Stops the stack in ``run_dir`` (SIGTERM to its supervisor, which drains); then makes sure no
    recorded process group is left. Returns what it did, one line each."""
    state = read_state(run_dir)
    if state is None:
        return [f"no stack in {run_dir}"]
    done = []
    sup = live_supervisor(run_dir)
    if sup:
        os.kill(sup, signal.SIGTERM)
        deadline = time.time() + timeout_s
        while pid_alive(sup) and time.time() < deadline:
            time.sleep(0.1)
        if pid_alive(sup):
            os.kill(sup, signal.SIGKILL)
            done.append(f"supervisor {sup} did not stop in {timeout_s:.0f} s: killed")
        else:
            done.append(f"stopped supervisor {sup}")
    groups = [r.get("pid") for r in state["replicas"]] + [(state.get("router") or {}).get("pid")]
    for pgid in filter(None, groups):
        # left over (the supervisor was SIGKILLed and a child ignored PDEATHSIG); only slicelm's own processes
        if any(_is_slicelm(p) for p in group_members(pgid)):
            signal_group(pgid, signal.SIGKILL)
            done.append(f"killed leftover process group {pgid}")
    return done


def _is_slicelm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"slicelm" in f.read()
    except OSError:
        return False
