"""``slicelm.elastic`` / ``slicelm.idleSleep`` in the stack file: validation, what replicas and the router are
started with, the broker's capacities, and the supervisor restarting a borrower that keeps an owner waiting
(real processes: stdlib HTTP servers as replicas, ``BrokerLink`` clients speaking for them)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from slicelm.slicing.broker_client import BROKER_ENV, GPU_ENV, REPLICA_ENV, BrokerLink
from slicelm.slicing.placement import AssignedGPU
from slicelm.stack.launch import replica_launches, router_launch
from slicelm.stack.planning import ReplicaPlacement, StackPlan
from slicelm.stack.sharing import HEADROOM_MIB, broker_address, start_broker
from slicelm.stack.spec import StackSpecError, parse_stack
from slicelm.stack.state import read_state
from slicelm.stack.status import status

UUID = "GPU-11111111-2222-3333-4444-555555555555"
UUID2 = "GPU-22222222-2222-3333-4444-555555555555"


def stack(slicelm: dict, router: bool = True, **model) -> object:
    return parse_stack({"servingEngineSpec": {"modelSpec": [{"name": "m", "modelURL": "/models/m", **model}]},
                        "routerSpec": {"enableRouter": router}, "slicelm": {"host": "127.0.0.1", **slicelm}})


def test_options_are_validated_with_their_field_paths() -> None:
    spec = stack({"elastic": {"maxBorrowPercentage": 50, "reclaimTimeout": 1.5}, "idleSleep": {"after": 30}})
    assert spec.slicelm.elastic.freeWatermark == 0.1 and spec.slicelm.idleSleep.level == 1
    with pytest.raises(StackSpecError, match=r"slicelm\.idleSleep: idle replicas are woken by the router"):
        stack({"idleSleep": {"after": 30}}, router=False)
    with pytest.raises(StackSpecError, match=r"slicelm\.elastic\.maxBorrowPercentage"):
        stack({"elastic": {"maxBorrowPercentage": 120}})
    with pytest.raises(StackSpecError, match=r"slicelm\.elastic\.reclaimTimout: unknown key .*'reclaimTimeout'"):
        stack({"elastic": {"reclaimTimout": 1}})


def test_replicas_and_router_get_the_flags_and_the_broker(tmp_path: Path) -> None:
    spec = stack({"elastic": {"freeWatermark": 0.2}, "idleSleep": {"after": 12.5, "level": 2}},
                 requestGPU=1, requestGPUMem="8000", replicaCount=2)
    plan = StackPlan([ReplicaPlacement("m", 0, [AssignedGPU(UUID, 0, 8000, 0)], 1.0),
                      ReplicaPlacement("m", 1, [], None)], [], gpu_free_mib={UUID: 40000})
    gpu, cpu = replica_launches(spec, plan, tmp_path,
                                mps_env=lambda sl: {"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=8000M", "MPS": "1"})
    assert gpu.env["MPS"] == "1" and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in gpu.env  # the broker bounds it
    assert gpu.cmd[gpu.cmd.index("--elastic-kv-watermark") + 1] == "0.2" and "--enable-sleep-mode" in gpu.cmd
    assert {k: gpu.env[k] for k in (BROKER_ENV, REPLICA_ENV, GPU_ENV)} == {
        BROKER_ENV: broker_address(tmp_path), REPLICA_ENV: "m/0", GPU_ENV: UUID}
    assert "--elastic-kv" not in cpu.cmd and "--enable-sleep-mode" in cpu.cmd and BROKER_ENV not in cpu.env
    two = StackPlan([ReplicaPlacement("m", 0, [AssignedGPU(UUID, 0, 8000, 0), AssignedGPU(UUID2, 1, 8000, 0)],
                                      1.0)], [], gpu_free_mib={UUID: 40000, UUID2: 40000})
    tp = replica_launches(stack({"elastic": {}, "idleSleep": {"after": 5}}, requestGPU=2, requestGPUMem="8000"),
                          two, tmp_path)[0]
    assert "--tensor-parallel-size" in tp.cmd and "--elastic-kv" not in tp.cmd  # one-GPU features only
    assert "--enable-sleep-mode" not in tp.cmd and BROKER_ENV not in tp.env
    router = router_launch(spec, tmp_path)
    assert router is not None
    assert router.cmd[router.cmd.index("--idle-sleep-after") + 1:][:3] == ["12.5", "--idle-sleep-level", "2"]
    broker = start_broker(spec, plan, tmp_path, on_overdue=lambda _: None)
    try:
        cap = (40000 - HEADROOM_MIB) << 20
        assert broker.status()["gpus"] == {UUID: {"capacity": cap, "free": cap, "waiting": 0}}
    finally:
        broker.stop()
    static = stack({"elastic": {"maxBorrowPercentage": 0}}, requestGPU=1, requestGPUMem="8000")
    b2 = start_broker(static, plan, tmp_path, on_overdue=lambda _: None)
    assert b2.state.max_borrow == 0
    b2.stop()


@pytest.mark.slow
def test_a_borrower_that_keeps_an_owner_waiting_is_restarted(tmp_path: Path) -> None:
    from stack.test_supervisor_unit import launch, run_until, supervisor

    sup = supervisor(tmp_path, [launch(tmp_path, "borrower"), launch(tmp_path, "owner")])
    spec = stack({"elastic": {"reclaimTimeout": 0.5}}, requestGPU=1, requestGPUMem="100")
    plan = StackPlan([ReplicaPlacement("m", 0, [AssignedGPU(UUID, 0, 100, 0)], 1.0)], [],
                     gpu_free_mib={UUID: HEADROOM_MIB + 300})
    sup.broker = start_broker(spec, plan, tmp_path, on_overdue=sup.kill_replica)
    links = {name: BrokerLink(sup.broker.address, f"{name}/0", UUID) for name in ("borrower", "owner")}
    try:
        sup.start_all(sup.replicas)
        sup.wait_healthy(sup.replicas)
        borrower = sup.replicas[0]
        old = borrower.proc.pid
        for link in links.values():
            link.register(100 << 20)
        assert links["borrower"].acquire(300 << 20, wait_s=2)[1] is True  # all of the GPU
        t0 = time.monotonic()
        seq, granted = links["owner"].acquire(100 << 20, wait_s=0.05)
        assert granted is None  # the borrower never answers its Reclaim: overdue after 0.5 s, then killed
        run_until(sup, lambda: borrower.state == "ready" and borrower.proc.pid != old, 15)
        assert borrower.restarts == 1
        msgs: list = []
        while not msgs:
            assert time.monotonic() - t0 < 10
            msgs = links["owner"].poll()
        assert msgs[0].seq == seq and msgs[0].granted  # the owner got its share once the borrower was gone
        sup._broker_checked = 0.0
        sup.step()
        books = read_state(tmp_path)["broker"]["members"]
        assert "borrower/0" not in books and books["owner/0"]["used"] == 100 << 20
        st = status(tmp_path)
        assert st is not None and st["broker"]["members"]["owner/0"]["borrowed"] == 0
    finally:
        for link in links.values():
            link.close()
        sup.shutdown()
