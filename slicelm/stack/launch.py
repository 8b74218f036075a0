"""From a plan to processes to start: each replica's ``slicelm serve`` command, env and log; the router's.

A GPU replica sees only its cards (``CUDA_VISIBLE_DEVICES=<uuid>[,<uuid>…]``), gets its slice as our env
(``Slice.to_env()``: the engine's absolute memory budget and SM share, per GPU as HAMi's) plus the MPS client
env of slicelm's daemon on that card (thread percentage, pinned memory limit), and ``--gpu-memory-budget``.
A replica on N GPUs runs ``--tensor-parallel-size N`` (one process per GPU) and no MPS client env: an MPS
client reaches one daemon, which serves one card. A CPU replica gets ``--device cpu`` and its share of the machine's
cores as ``OMP_NUM_THREADS`` (cores / CPU replicas, unless the stack's env sets it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slicelm.slicing.spec import Slice
from slicelm.stack.planning import ReplicaPlacement, StackPlan
from slicelm.stack.procs import free_port
from slicelm.stack.requests import scheduler_policy
from slicelm.stack.serve_args import model_env, serve_command, served_model_names
from slicelm.stack.sharing import replica_options, router_options
from slicelm.stack.spec import ModelSpec, StackSpec

logger = logging.getLogger("slicelm.stack")


@dataclass
class Launch:
    """One process ``slicelm up`` runs and keeps alive."""

    name: str  # "chat/0", "router"
    cmd: list[str]
    env: dict[str, str]  # added to the supervisor's environment
    log: Path
    url: str
    model: str | None = None
    replica: int | None = None
    served_names: list[str] = field(default_factory=list)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    memory_mib: int | None = None
    cores: int | None = None
    policy: str | None = None  # HAMi's placement policy of a GPU replica

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def full_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def router_available() -> bool:
    return importlib.util.find_spec("slicelm.router") is not None


def _is_slice(model: ModelSpec) -> bool:
    """A memory slice (gpumem or percentage); otherwise the replica has whole cards (HAMi)."""
    return model.gpu("GPUMem") is not None or model.gpu("GPUMemPercentage") is not None


def replica_slice(model: ModelSpec, placement: ReplicaPlacement) -> Slice | None:
    if not placement.gpus:
        return None
    gpu = placement.gpus[0]
    memory = gpu.memory_mib << 20 if _is_slice(model) and gpu.memory_mib else None
    sm = gpu.cores if gpu.cores and gpu.cores < 100 else None
    return Slice(device_index=0, device_uuid=gpu.uuid, memory_bytes=memory, sm_percent=sm, source="stack")


def _replica_launch(spec: StackSpec, model: ModelSpec, placement: ReplicaPlacement, port: int, run_dir: Path,
                    mps_env: Callable[[Slice], dict[str, str]] | None, cpu_threads: int) -> Launch:
    host = spec.slicelm.host
    sl = replica_slice(model, placement)
    budget_mib = sl.memory_bytes >> 20 if sl and sl.memory_bytes else None
    cmd = serve_command(model, host, port, "cuda" if placement.gpus else "cpu", budget_mib)
    api_key = spec.servingEngineSpec.vllmApiKey if isinstance(spec.servingEngineSpec.vllmApiKey, str) else None
    env = model_env(spec.servingEngineSpec.env, model, api_key)
    if sl is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(g.uuid for g in placement.gpus)
        env.update(sl.to_env())
        if mps_env is not None and len(placement.gpus) == 1:
            env.update(mps_env(sl))
        elif mps_env is not None and sl.sm_percent is not None:
            logger.warning("%s/%d: requestGPUCores %d%% is not enforced: MPS caps one GPU per client, and the "
                           "replica spans %d GPUs (tensor parallel)", model.name, placement.replica, sl.sm_percent,
                           len(placement.gpus))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU replica must not touch a GPU
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads))  # the CPU replicas share the cores (unless set)
    g0 = placement.gpus[0] if placement.gpus else None
    name = f"{model.name}/{placement.replica}"
    flags, sharing_env = replica_options(spec, placement, name, run_dir)
    cmd += flags
    env.update(sharing_env)
    if "--elastic-kv" in flags:  # it may borrow beyond its slice: the broker bounds it, not MPS's memory limit
        env.pop("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", None)
    return Launch(
        name=name, cmd=cmd, env=env,
        log=run_dir / "logs" / f"{model.name}-{placement.replica}.log", url=f"http://{host}:{port}",
        model=model.name, replica=placement.replica, served_names=served_model_names(model),
        gpus=[{"uuid": g.uuid, "index": g.index} for g in placement.gpus],
        memory_mib=(g0.memory_mib if g0 and _is_slice(model) else None), cores=(g0.cores if g0 else None),
        policy=scheduler_policy(model) if g0 else None)


def replica_launches(spec: StackSpec, plan: StackPlan, run_dir: Path,
                     mps_env: Callable[[Slice], dict[str, str]] | None = None) -> list[Launch]:
    """One launch per placed replica, each on a free port of ``slicelm.host``."""
    taken = {spec.routerSpec.containerPort}
    launches = []
    cpu_threads = cpu_threads_per_replica(sum(not p.gpus for p in plan.placements))
    for model in spec.models():
        for r in range(model.replicaCount):
            port = free_port(spec.slicelm.host)
            while port in taken:
                port = free_port(spec.slicelm.host)
            taken.add(port)
            launches.append(_replica_launch(spec, model, plan.placement(model.name, r), port, run_dir, mps_env,
                                            cpu_threads))
    return launches


def cpu_threads_per_replica(num_cpu_replicas: int) -> int:
    """Torch threads of each CPU replica: the machine's cores shared out (``OMP_NUM_THREADS``), so that N
    replicas do not each start one thread per core and preempt each other."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, num_cpu_replicas))


def router_launch(spec: StackSpec, run_dir: Path) -> Launch | None:
    """``slicelm router`` over this stack (production-stack's flags), when the router is installed. It is given
    the supervisor's ``state.json`` (replica URLs, served names, states; rewritten on every change)."""
    rs = spec.routerSpec
    if not rs.enableRouter or not router_available():
        return None
    cmd = [sys.executable, "-m", "slicelm.entrypoints.cli", "router", "--stack", str(run_dir / "state.json"),
           "--host", spec.slicelm.host, "--port", str(rs.containerPort), "--routing-logic", rs.routingLogic]
    for flag, value in (("--session-key", rs.sessionKey), ("--prefix-min-match-length", rs.prefixMinMatchLength),
                        ("--engine-stats-interval", rs.engineScrapeInterval),
                        ("--request-stats-window", rs.requestStatsWindow)):
        if value:
            cmd += [flag, str(value)]
    return Launch(name="router", cmd=cmd + router_options(spec) + list(rs.extraArgs), env={},
                  log=run_dir / "logs" / "router.log",
                  url=f"http://{spec.slicelm.host}:{rs.containerPort}")
