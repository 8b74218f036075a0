"""Placement of replicas on an inventory: HAMi's request rules, policies, reasons, and the plan's JSON contract."""

from __future__ import annotations

import json

import pytest

from slicelm.slicing.inventory import GPU, Inventory
from slicelm.slicing.placement import ReplicaRequest, place

L4 = 23034
H200 = 143771


def _inv(*gpus: GPU) -> Inventory:
    return Inventory(list(gpus))


def _gpu(i: int, mem: int = H200, type_: str = "NVIDIA H200", **kw) -> GPU:
    return GPU(f"GPU-{i}", i, type_, mem, **kw)


def _req(model="m", replica=0, **kw) -> ReplicaRequest:
    return ReplicaRequest(model, replica, **kw)


# GenerateResourceRequests + the webhook's defaultExclusiveCoreIfNeeded (device_test.go tables):
# (fields, (memreq, percentage, cores))
@pytest.mark.parametrize(("fields", "want"), [
    ({}, (0, 100, 100)),  # gpu count only: whole card, exclusive
    ({"memory_mib": 4096}, (4096, 101, 0)),
    ({"memory_percentage": 50}, (0, 50, 0)),
    ({"memory_percentage": 100}, (0, 100, 100)),  # exclusive via percentage
    ({"cores": 50}, (0, 100, 50)),  # explicit cores remain
    ({"cores": 70, "memory_percentage": 100}, (0, 100, 70)),
    ({"memory_percentage": 0}, (0, 100, 0)),  # 0 = unset: whole card, not exclusive (percentage was present)
    ({"memory_mib": 2000, "memory_percentage": 0}, (2000, 101, 0)),  # explicit memory wins
    ({"memory_mib": 2000, "memory_percentage": 30}, (2000, 101, 0)),  # gpumem wins over percentage
    ({"memory_mib": 0}, (0, 100, 0)),  # gpumem 0 = unset, like nvidia.com/gpumem: 0
    ({"cores": 120}, (0, 100, 100)),  # clamped
])
def test_request_rules(fields, want):
    k = _req(**fields).device_request()
    assert (k.memreq, k.mem_percentagereq, k.coresreq) == want


@pytest.mark.parametrize(("fields", "field"), [
    ({"memory_percentage": 101}, "memory_percentage"), ({"memory_percentage": 150}, "memory_percentage"),
    ({"memory_percentage": -1}, "memory_percentage"), ({"memory_mib": -5}, "memory_mib"), ({"cores": -1}, "cores"),
    ({"num_gpus": -1}, "num_gpus"), ({"policy": "fastest"}, "policy"), ({"policy": ""}, "policy"),
    ({"scoring_weights": (0, 0, 0)}, "scoring_weights"), ({"scoring_weights": (1, -1, 1)}, "scoring_weights"),
])
def test_bad_request_names_the_field(fields, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        _req(**fields)


def test_seed_rag_example_binpacks_on_one_l4():
    """The seed's bge-m3 (14000 MiB) + bge-reranker-v2-m3 (8000 MiB) on one L4, binpack."""
    inv = _inv(GPU("GPU-l4", 0, "NVIDIA L4", L4))
    reqs = [_req("bge-m3-embed", memory_mib=14000, use_types=["L4"], policy="binpack"),
            _req("bge-reranker-v2-m3", memory_mib=8000, use_types=["L4"], policy="binpack")]
    plan = place(reqs, inv)
    assert plan.feasible
    assert plan.to_json() == {
        "placements": [
            {"model": "bge-m3-embed", "replica": 0, "gpus": [{"uuid": "GPU-l4", "index": 0, "memory_mib": 14000,
                                                              "cores": 0}], "score": 7.08},
            {"model": "bge-reranker-v2-m3", "replica": 0,
             "gpus": [{"uuid": "GPU-l4", "index": 0, "memory_mib": 8000, "cores": 0}], "score": 11.55},
        ],
        "unplaced": [],
    }
    assert json.loads(json.dumps(plan.to_json())) == plan.to_json()
    g = plan.inventory.gpus[0]
    assert (g.used_shares, g.used_memory_mib, g.used_cores) == (2, 22000, 0)
    assert inv.gpus[0].used_shares == 0  # the caller's inventory is not touched


def test_reasons_per_gpu_aggregated():
    inv = _inv(GPU("GPU-0", 0, "NVIDIA L4", L4), GPU("GPU-1", 1, "Tesla T4", 15360))
    plan = place([_req("big", memory_mib=30000, use_types=["L4"])], inv)
    assert plan.placements == []
    assert plan.unplaced[0].reason == "1/2 CardInsufficientMemory, 1/2 CardTypeMismatch"
    assert plan.to_json()["unplaced"] == [{"model": "big", "replica": 0,
                                           "reasons": ["1/2 CardInsufficientMemory", "1/2 CardTypeMismatch"]}]


def test_binpack_fills_one_gpu_spread_uses_both():
    """Issue 8's two-H200 check: 4 small replicas, binpack → one GPU, spread → two."""
    inv = _inv(_gpu(0), _gpu(1))
    small = lambda policy: [_req("small", r, memory_mib=20000, cores=20, policy=policy) for r in range(4)]
    packed = place(small("binpack"), inv)
    assert {p.gpus[0].uuid for p in packed.placements} == {"GPU-1"}  # Fit walks from the end: the last of ties
    spread = place(small("spread"), inv)
    assert [p.gpus[0].uuid for p in spread.placements] == ["GPU-1", "GPU-0", "GPU-1", "GPU-0"]


def test_binpack_prefers_the_fuller_gpu_and_spread_the_emptier():
    inv = _inv(_gpu(0, used_shares=1, used_memory_mib=50000, used_cores=30), _gpu(1))
    assert place([_req(memory_mib=1000, policy="binpack")], inv).placements[0].gpus[0].uuid == "GPU-0"
    assert place([_req(memory_mib=1000, policy="spread")], inv).placements[0].gpus[0].uuid == "GPU-1"


def test_scoring_weights_change_binpack_choice():
    """gpu_policy_test.go's weighted-score case through place(): memory weight 3 makes gpu-b the fuller card."""
    inv = _inv(GPU("gpu-a", 0, "t", 100, cores=100, used_shares=1, used_cores=90, used_memory_mib=10),
               GPU("gpu-b", 1, "t", 100, cores=100, used_shares=7, used_cores=10, used_memory_mib=20))
    plain = place([_req(memory_percentage=40, cores=0, policy="binpack")], inv).placements[0]
    assert (plain.gpus[0].uuid, plain.score) == ("gpu-a", 16)
    weighted = place([_req(memory_percentage=40, cores=0, policy="binpack", scoring_weights=(1, 1, 3))],
                     inv).placements[0]
    assert (weighted.gpus[0].uuid, weighted.score) == ("gpu-b", 27)


def test_share_count_and_exclusive_and_compute_units():
    inv = _inv(_gpu(0, shares=2))
    plan = place([_req(replica=r, memory_mib=1000) for r in range(3)], inv)
    assert len(plan.placements) == 2 and plan.unplaced[0].reasons == ["1/1 CardTimeSlicingExhausted"]
    # an exclusive replica (cores 100) cannot join a used GPU
    inv = _inv(_gpu(0, used_shares=1, used_memory_mib=1000))
    assert place([_req(memory_mib=1000, cores=100)], inv).unplaced[0].reasons == \
        ["1/1 ExclusiveDeviceAllocateConflict"]
    # after an exclusive replica, a cores-0 replica finds the GPU's cores exhausted
    plan = place([_req("a", memory_mib=1000, cores=100), _req("b", memory_mib=1000)], _inv(_gpu(0)))
    assert plan.unplaced[0].reasons == ["1/1 CardComputeUnitsExhausted"]
    # a whole-card request takes all the memory: nothing else fits
    plan = place([_req("a"), _req("b", memory_mib=1)], _inv(_gpu(0)))
    assert plan.placements[0].gpus[0].memory_mib == H200 and plan.placements[0].gpus[0].cores == 100
    assert plan.unplaced[0].reasons == ["1/1 CardInsufficientMemory"]


def test_zero_percentage_books_the_whole_card():
    """TestZeroMemoryPercentageIsAccountedAsWholeCard."""
    plan = place([_req(memory_percentage=0)], _inv(GPU("dev-0", 0, "NVIDIA", 11264)))
    assert plan.placements[0].gpus[0].memory_mib == 11264
    plan = place([_req(memory_percentage=0)], _inv(GPU("dev-0", 0, "NVIDIA", 11264, used_memory_mib=11260)))
    assert "CardInsufficientMemory" in plan.unplaced[0].reason


def test_one_replica_never_takes_two_shares_of_one_gpu():
    assert place([_req(num_gpus=2, memory_mib=10)], _inv(_gpu(0))).unplaced[0].reasons == ["NodeInsufficientDevice"]
    plan = place([_req(num_gpus=2, memory_mib=100000)], _inv(_gpu(0), _gpu(1, mem=80000)))
    assert plan.unplaced[0].reasons == ["1/2 AllocatedCardsInsufficientRequest", "1/2 CardInsufficientMemory"]
    plan = place([_req(num_gpus=2, memory_mib=1000)], _inv(_gpu(0), _gpu(1)))
    assert sorted(g.uuid for g in plan.placements[0].gpus) == ["GPU-0", "GPU-1"]


def test_no_gpu_request_and_empty_inventory():
    assert place([_req(num_gpus=0)], _inv()).placements[0].gpus == []
    assert place([_req()], _inv()).unplaced[0].reasons == ["NodeInsufficientDevice"]


def test_uuid_filters_and_type_filters():
    inv = _inv(_gpu(0), _gpu(1), _gpu(2, type_="NVIDIA A100-SXM4-80GB", mem=81920))
    assert place([_req(memory_mib=1, use_uuids=["GPU-0"])], inv).placements[0].gpus[0].uuid == "GPU-0"
    plan = place([_req(memory_mib=1, nouse_uuids=["GPU-0", "GPU-1", "GPU-2"])], inv)
    assert plan.unplaced[0].reasons == ["3/3 CardUuidMismatch"]
    assert place([_req(memory_mib=1, use_types=["a100"])], inv).placements[0].gpus[0].uuid == "GPU-2"
    plan = place([_req(memory_mib=1, nouse_types=["h200"], policy="binpack")], inv)
    assert plan.placements[0].gpus[0].uuid == "GPU-2"


def _nvlink_box() -> Inventory:
    """4 GPUs: 0-1 and 2-3 NVLinked pairs (420), cross pairs over PCIe (20); GPU-3 also weak to 2 (120)."""
    links = {(0, 1): 420, (2, 3): 120, (0, 2): 20, (0, 3): 20, (1, 2): 20, (1, 3): 20}
    gpus = [_gpu(i) for i in range(4)]
    for (a, b), s in links.items():
        gpus[a].links[f"GPU-{b}"] = s
        gpus[b].links[f"GPU-{a}"] = s
    return _inv(*gpus)


def test_topology_aware_sets_and_worst_connected_single():
    inv = _nvlink_box()
    pair = place([_req(num_gpus=2, memory_mib=1000, policy="topology-aware")], inv).placements[0]
    assert sorted(g.uuid for g in pair.gpus) == ["GPU-0", "GPU-1"]
    # totals: GPU-0 460, GPU-1 460, GPU-2 160, GPU-3 160 → the first lowest in Fit's walk order
    single = place([_req(memory_mib=1000, policy="topology-aware")], inv).placements[0]
    assert single.gpus[0].uuid in ("GPU-2", "GPU-3")
    # a single replica first, then a pair: the NVLink pair stays free for it
    plan = place([_req("one", memory_mib=1000, policy="topology-aware"),
                  _req("two", num_gpus=2, memory_mib=1000, policy="topology-aware")], inv)
    assert sorted(g.uuid for g in plan.placements[1].gpus) == ["GPU-0", "GPU-1"]


def test_numa_bind_keeps_a_multi_gpu_replica_on_one_node():
    inv = _inv(_gpu(0, numa=0), _gpu(1, numa=1), _gpu(2, numa=1), _gpu(3, numa=0, used_memory_mib=H200 - 10))
    plan = place([_req(num_gpus=2, memory_mib=1000, numa_bind=True)], inv)
    assert {g.uuid for g in plan.placements[0].gpus} == {"GPU-1", "GPU-2"}
    # without numa-bind spread takes the two emptiest wherever they are
    assert len(place([_req(num_gpus=2, memory_mib=1000)], inv).placements[0].gpus) == 2


def test_unhealthy_gpus_are_skipped():
    plan = place([_req(memory_mib=1)], _inv(_gpu(0, health=False), _gpu(1, health=False)))
    assert plan.unplaced[0].reasons == ["2/2 CardNotHealth"]
