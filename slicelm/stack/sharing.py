"""What ``slicelm up`` adds for elastic sharing and sleep (the stack file's ``slicelm.elastic`` / ``idleSleep``).

- ``slicelm.elastic``: one memory broker for the stack (``broker.py`` / ``broker_server.py``) at
  ``ipc://<run dir>/broker.ipc``, its books per GPU: capacity = the GPU's memory less what other
  processes use and ``HEADROOM_MIB``; every GPU replica runs with ``--elastic-kv`` and is told the broker's
  address, its name and its GPU (``SLICELM_KV_BROKER``, ``SLICELM_REPLICA``, ``SLICELM_KV_BROKER_GPU``); its
  guarantee is its slice. ``maxBorrowPercentage`` (of the GPU) bounds borrowing (0: HAMi's static slices).
- ``slicelm.idleSleep``: every replica runs with ``--enable-sleep-mode``; the router gets
  ``--idle-sleep-after`` / ``--idle-sleep-level`` (it sleeps idle replicas and wakes them on a request).

Replicas on several GPUs (tensor parallel) get neither. The Helm chart does not render these (a broker needs every
engine of a GPU on one machine).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slicelm.slicing.broker_client import BROKER_ENV, GPU_ENV, REPLICA_ENV
from slicelm.stack.broker import BrokerState
from slicelm.stack.broker_server import BrokerServer
from slicelm.stack.planning import ReplicaPlacement, StackPlan
from slicelm.stack.spec import StackSpec

HEADROOM_MIB = 1024  # kept free on every GPU (CUDA contexts of processes that are not replicas, fragmentation)


def broker_address(run_dir: Path) -> str:
    return f"ipc://{run_dir}/broker.ipc"


def gpu_capacities(plan: StackPlan) -> dict[str, int]:
    """Bytes the broker may hand out per GPU that replicas of this stack use."""
    uuids = {g.uuid for p in plan.placements for g in p.gpus}
    return {u: max(0, plan.gpu_free_mib.get(u, 0) - HEADROOM_MIB) << 20 for u in uuids if u in plan.gpu_free_mib}


def start_broker(spec: StackSpec, plan: StackPlan, run_dir: Path,
                 on_overdue: Callable[[str], None]) -> BrokerServer | None:
    el = spec.slicelm.elastic
    if el is None or not el.enabled or not any(p.gpus for p in plan.placements):
        return None
    capacities = gpu_capacities(plan)
    max_borrow = None
    if el.maxBorrowPercentage is not None:
        max_borrow = int(max(capacities.values(), default=0) * el.maxBorrowPercentage / 100)
    state = BrokerState(capacities, max_borrow=max_borrow, reclaim_timeout=el.reclaimTimeout)
    (run_dir / "broker.ipc").unlink(missing_ok=True)
    return BrokerServer(broker_address(run_dir), state, on_overdue=on_overdue).start()


def replica_options(spec: StackSpec, placement: ReplicaPlacement, name: str,
                    run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Extra ``slicelm serve`` flags and env of one replica."""
    flags: list[str] = []
    env: dict[str, str] = {}
    if len(placement.gpus) > 1:  # tensor parallel: elastic KV and sleep are one-GPU features
        return flags, env
    el = spec.slicelm.elastic
    if el is not None and el.enabled and placement.gpus:
        flags += ["--elastic-kv", "--elastic-kv-watermark", str(el.freeWatermark)]
        env.update({BROKER_ENV: broker_address(run_dir), REPLICA_ENV: name, GPU_ENV: placement.gpus[0].uuid})
    if spec.slicelm.idleSleep is not None:
        flags.append("--enable-sleep-mode")
    return flags, env


def router_options(spec: StackSpec) -> list[str]:
    sleep = spec.slicelm.idleSleep
    if sleep is None:
        return []
    return ["--idle-sleep-after", str(sleep.after), "--idle-sleep-level", str(sleep.level)]
