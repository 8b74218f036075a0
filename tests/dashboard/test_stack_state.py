"""What the dashboard needs from a stack, through ``state.json`` and ``slicelm ps``'s data: the machine's GPUs (total
memory), each GPU replica's placement policy and slice; then the dashboard's GPU view of it (no process started)."""

from __future__ import annotations

from pathlib import Path

from slicelm.router.dashboard.history import History
from slicelm.router.dashboard.rows import stack_rows
from slicelm.router.dashboard.view import Meta, build_state
from slicelm.slicing.inventory import Inventory
from slicelm.stack.launch import replica_launches
from slicelm.stack.planning import make_plan
from slicelm.stack.spec import parse_stack
from slicelm.stack.status import status
from slicelm.stack.supervisor import Supervisor

UUIDS = ("GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-0000-0000-0000-000000000000")


def test_state_and_ps_carry_gpus_and_policy_to_the_gpu_view(tmp_path: Path) -> None:
    inv = Inventory.from_json([{"id": u, "index": i, "count": 10, "devmem": 81920, "devcore": 100,
                                "type": "NVIDIA-H100", "numa": 0, "health": True} for i, u in enumerate(UUIDS)])
    spec = parse_stack({"servingEngineSpec": {"modelSpec": [
        {"name": "chat", "modelURL": "/m/chat", "requestGPU": 1, "requestGPUMemPercentage": 40,
         "requestGPUCores": 30, "podAnnotations": {"hami.io/gpu-scheduler-policy": "binpack"}},
        {"name": "embed", "modelURL": "/m/embed", "requestGPU": 1, "requestGPUMemPercentage": 20,
         "podAnnotations": {"hami.io/gpu-scheduler-policy": "binpack"}},
        {"name": "cpu", "modelURL": "/m/cpu"}]}, "routerSpec": {"enableRouter": False}})
    plan = make_plan(spec, inv)
    assert plan.devices == [{"uuid": u, "index": i, "type": "NVIDIA-H100", "memory_mib": 81920}
                            for i, u in enumerate(UUIDS)]
    launches = replica_launches(spec, plan, tmp_path)
    assert [la.policy for la in launches] == ["binpack", "binpack", None]  # HAMi's policy; none on the CPU
    Supervisor(tmp_path, "stack.yaml", launches, None, 60, 1, [], gpus=plan.devices).save()
    st = status(tmp_path)
    assert [g["memory_mib"] for g in st["gpus"]] == [81920, 81920]
    assert [(r["device"], r["policy"], r["memory_mib"], r["cores"]) for r in st["replicas"]] == [
        ("cuda", "binpack", 32768, 30), ("cuda", "binpack", 16384, 0), ("cpu", None, None, None)]  # 0: no SM cap
    state = build_state(Meta(discovery="stack", run_dir=str(tmp_path)), stack_rows(st, {}), st["gpus"],
                        History(60, 10), 0.0)
    on = {g["uuid"]: [(s["key"], s["memory_mib"], s["cores"], s["policy"]) for s in g["slices"]]
          for g in state["gpus"]}
    binpacked = next(u for u in UUIDS if on[u])  # binpack: both slices on one card, the other card empty
    assert on[binpacked] == [("chat/0", 32768, 30, "binpack"), ("embed/0", 16384, 0, "binpack")]
    assert [s["key"] for s in state["cpu"]["slices"]] == ["cpu/0"]
