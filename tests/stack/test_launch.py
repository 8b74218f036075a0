"""A placement -> the replica's command and env: its card only, its slice as env and as the memory budget."""

from __future__ import annotations

from pathlib import Path

from slicelm.slicing.placement import AssignedGPU
from slicelm.slicing.spec import Slice
from slicelm.stack.launch import replica_launches
from slicelm.stack.planning import ReplicaPlacement, StackPlan
from slicelm.stack.spec import parse_stack

UUID = "GPU-11111111-2222-3333-4444-555555555555"


def stack(**model):
    return parse_stack({"servingEngineSpec": {"modelSpec": [{"name": "m", "modelURL": "/models/m", **model}]},
                        "slicelm": {"host": "127.0.0.1"}})


def test_gpu_slice_reaches_env_and_flags(tmp_path: Path) -> None:
    spec = stack(requestGPU=1, requestGPUMem="8000", requestGPUCores=30,
                 vllmConfig={"gpuMemoryUtilization": 0.5}, env=[{"name": "FOO", "value": 1}])
    plan = StackPlan([ReplicaPlacement("m", 0, [AssignedGPU(UUID, 3, 8000, 30)], 4.2)], [])
    mps_calls = []
    (la,) = replica_launches(spec, plan, tmp_path, mps_env=lambda sl: mps_calls.append(sl) or {"MPS": "1"})
    sl = Slice(device_index=0, device_uuid=UUID, memory_bytes=8000 << 20, sm_percent=30, source="stack")
    assert mps_calls == [sl]
    assert la.env["CUDA_VISIBLE_DEVICES"] == UUID and la.env["FOO"] == "1" and la.env["MPS"] == "1"
    assert sl.to_env().items() <= la.env.items()
    assert la.cmd[la.cmd.index("--device") + 1] == "cuda"
    assert la.cmd[la.cmd.index("--gpu-memory-budget") + 1] == "4000MiB"
    assert (la.memory_mib, la.cores, la.gpus) == (8000, 30, [{"uuid": UUID, "index": 3}])
    assert la.log == tmp_path / "logs" / "m-0.log" and la.url.startswith("http://127.0.0.1:")


def test_whole_card_has_no_budget_and_cpu_sees_no_gpu(tmp_path: Path) -> None:
    spec = stack(requestGPU=1)
    plan = StackPlan([ReplicaPlacement("m", 0, [AssignedGPU(UUID, 0, 81920, 0)], 1.0)], [])
    (la,) = replica_launches(spec, plan, tmp_path)
    assert "--gpu-memory-budget" not in la.cmd and la.memory_mib is None and la.cores == 0
    cpu = replica_launches(stack(), StackPlan([ReplicaPlacement("m", 0, [], None)], []), tmp_path)[0]
    assert cpu.env["CUDA_VISIBLE_DEVICES"] == "" and cpu.cmd[cpu.cmd.index("--device") + 1] == "cpu"
    assert cpu.gpus == [] and cpu.memory_mib is None


def test_replicas_get_distinct_ports_away_from_the_router(tmp_path: Path) -> None:
    spec = stack(replicaCount=4)
    plan = StackPlan([ReplicaPlacement("m", r, [], None) for r in range(4)], [])
    ports = [la.port for la in replica_launches(spec, plan, tmp_path)]
    assert len(set(ports)) == 4 and spec.routerSpec.containerPort not in ports


def test_cpu_replicas_share_the_cores_unless_the_stack_sets_threads(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    plan = StackPlan([ReplicaPlacement("m", r, [], None) for r in range(3)], [])
    launches = replica_launches(stack(replicaCount=3), plan, tmp_path)
    assert [la.env["OMP_NUM_THREADS"] for la in launches] == ["2"] * 3  # 8 cores // 3 CPU replicas
    gpu_and_cpu = StackPlan([ReplicaPlacement("m", 0, [AssignedGPU(UUID, 0, 81920, 0)], 1.0),
                             ReplicaPlacement("m", 1, [], None)], [])
    gpu, cpu = replica_launches(stack(replicaCount=2), gpu_and_cpu, tmp_path)
    assert "OMP_NUM_THREADS" not in gpu.env and cpu.env["OMP_NUM_THREADS"] == "8"  # the only CPU replica
    own = stack(replicaCount=3, env=[{"name": "OMP_NUM_THREADS", "value": 1}])
    assert {la.env["OMP_NUM_THREADS"] for la in replica_launches(own, plan, tmp_path)} == {"1"}
