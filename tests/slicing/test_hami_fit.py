"""HAMi's Fit tables (Project-HAMi/HAMi 4707fb0 pkg/device/nvidia/device_test.go, pkg/scheduler/numa_sort_test.go,
pkg/device/devices_test.go): same devices, requests and annotations; same picks and reason strings."""

from __future__ import annotations

import pytest

from slicelm.slicing import hami_policy as hp
from slicelm.slicing.hami_policy import Constraints, DeviceRequest, DeviceUsage


def _d(id_, index=0, used=0, count=100, usedmem=0, totalmem=128, totalcore=100, usedcores=0, numa=0, health=True,
       type_="NVIDIA"):
    return DeviceUsage(id=id_, index=index, used=used, count=count, usedmem=usedmem, totalmem=totalmem,
                       totalcore=totalcore, usedcores=usedcores, numa=numa, type=type_, health=health)


def _annos(annos: dict[str, str]) -> Constraints:
    """The pod annotations Fit reads, as our Constraints."""
    split = lambda key: annos[key].split(",") if key in annos else []
    return Constraints(policy=annos.get("hami.io/gpu-scheduler-policy", "spread"),
                       numa_bind=annos.get("nvidia.com/numa-bind") == "true",
                       use_types=split("nvidia.com/use-gputype"), nouse_types=split("nvidia.com/nouse-gputype"),
                       use_uuids=split("nvidia.com/use-gpuuuid"), nouse_uuids=split("nvidia.com/nouse-gpuuuid"))


# TestDevices_Fit: (name, devices, request (nums, memreq, pct, cores), annotations, fit, picked ids, reason)
FIT = [
    ("fit success", [_d("dev-0"), _d("dev-1")], (1, 64, 0, 50), {}, True, ["dev-1"], ""),
    ("fit fail: memory not enough", [_d("dev-0")], (1, 512, 0, 50), {}, False, [], "1/1 CardInsufficientMemory"),
    ("fit fail: core not enough", [_d("dev-0", totalmem=1024, usedcores=100)], (1, 512, 0, 50), {}, False, [],
     "1/1 CardInsufficientCore"),
    # HAMi's row asks for device type "OtherType"; here the same mismatch comes from the type filter
    ("fit fail: type mismatch", [_d("dev-0")], (1, 512, 0, 50), {"nvidia.com/use-gputype": "OtherType"}, False, [],
     "1/1 CardTypeMismatch"),
    ("fit fail: user assign use uuid mismatch", [_d("dev-1", totalmem=1280)], (2, 512, 0, 50),
     {"nvidia.com/use-gpuuuid": "dev-0"}, False, [], "1/1 CardUuidMismatch"),
    ("fit fail: user assign no use uuid match", [_d("dev-0", totalmem=1280)], (2, 512, 0, 50),
     {"nvidia.com/nouse-gpuuuid": "dev-0"}, False, [], "1/1 CardUuidMismatch"),
    ("fit fail: card overused", [_d("dev-0", used=100, totalmem=1280)], (1, 512, 0, 50), {}, False, [],
     "1/1 CardTimeSlicingExhausted"),
    ("fit success: but core limit can't exceed 100", [_d("dev-0", totalmem=1280)], (1, 512, 0, 120), {}, True,
     ["dev-0"], ""),
    ("fit fail:  card exclusively", [_d("dev-0", used=20, totalmem=1280)], (1, 512, 0, 100), {}, False, [],
     "1/1 ExclusiveDeviceAllocateConflict"),
    ("fit fail:  CardComputeUnitsExhausted", [_d("dev-0", used=20, totalmem=1280, usedcores=100)], (1, 512, 0, 0), {},
     False, [], "1/1 CardComputeUnitsExhausted"),
    ("fit fail:  AllocatedCardsInsufficientRequest", [_d("dev-0", used=20, totalmem=1280, usedcores=10)],
     (2, 512, 0, 20), {}, False, [], "1/1 AllocatedCardsInsufficientRequest"),
    ("fit fail: partial allocation AllocatedCardsInsufficientRequest for multiple cards",
     [_d("dev-0", totalmem=1280), _d("dev-1", index=1, totalmem=1280)], (3, 512, 0, 20), {}, False, [],
     "2/2 AllocatedCardsInsufficientRequest"),
    ("fit success:  memory percentage", [_d("dev-0", used=20, totalmem=1280, usedcores=10)], (1, 0, 10, 20), {}, True,
     ["dev-0"], ""),
    ("fit fail:  CardNotHealth", [_d("dev-0", used=20, totalmem=1280, usedcores=10, health=False)], (1, 0, 10, 20),
     {}, False, [], "1/1 CardNotHealth"),
]


@pytest.mark.parametrize(("name", "devices", "req", "annos", "want_fit", "want_ids", "want_reason"), FIT,
                         ids=[r[0] for r in FIT])
def test_fit_table(name, devices, req, annos, want_fit, want_ids, want_reason):
    ok, picked, reasons = hp.fit(devices, DeviceRequest(*req), _annos(annos))
    assert ok is want_fit
    if want_fit:
        assert [p.uuid for p in picked] == want_ids
    assert ", ".join(reasons) == want_reason


def test_fit_clamps_cores_to_100():
    ok, picked, _ = hp.fit([_d("dev-0", totalmem=1280)], DeviceRequest(1, 512, 0, 120), Constraints())
    assert ok and picked[0].usedcores == 100


def test_fit_numa_switching():
    """TestFit_NumaSwitching: walked from the end, dev-2 (NUMA 0) is dropped when NUMA 1 starts."""
    devs = [_d("dev-0", 0, count=10, totalmem=8192, numa=1), _d("dev-1", 1, count=10, totalmem=8192, numa=1),
            _d("dev-2", 2, count=10, totalmem=8192, numa=0)]
    ok, picked, _ = hp.fit(devs, DeviceRequest(2, 100, 0, 10), _annos({"nvidia.com/numa-bind": "true"}))
    assert ok and [p.uuid for p in picked] == ["dev-1", "dev-0"]


def test_fit_mutex_policy():
    """TestFit_MutexPolicy."""
    devs = [_d("used", 0, used=1, count=10, totalmem=8192), _d("idle", 1, count=10, totalmem=8192)]
    c = _annos({"hami.io/gpu-scheduler-policy": "mutex"})
    ok, picked, _ = hp.fit(devs, DeviceRequest(1, 100, 0, 10), c)
    assert ok and [p.uuid for p in picked] == ["idle"]
    ok, _, _ = hp.fit(devs, DeviceRequest(2, 100, 0, 10), c)
    assert not ok


def _three(scores):
    devs = [_d(f"dev-{i}", i, count=10, totalmem=8192) for i in range(3)]
    c = _annos({"hami.io/gpu-scheduler-policy": "topology-aware"})
    c.pair_scores = scores
    return devs, c


TRIANGLE = {"dev-0": {"dev-1": 100, "dev-2": 200}, "dev-1": {"dev-0": 100, "dev-2": 150},
            "dev-2": {"dev-0": 200, "dev-1": 150}}


def test_fit_topology_exact_match():
    devs, c = _three({})
    ok, picked, _ = hp.fit(devs[:2], DeviceRequest(2, 100, 0, 10), c)
    assert ok and len(picked) == 2


def test_fit_topology_worst_single_card():
    devs, c = _three(TRIANGLE)
    ok, picked, _ = hp.fit(devs, DeviceRequest(1, 100, 0, 10), c)
    assert ok and [p.uuid for p in picked] == ["dev-1"]


def test_fit_topology_best_combination():
    devs, c = _three(TRIANGLE)
    ok, picked, _ = hp.fit(devs, DeviceRequest(2, 100, 0, 10), c)
    assert ok and {p.uuid for p in picked} == {"dev-0", "dev-2"}


def test_fit_topology_best_combination_zero_scores():
    devs, c = _three({f"dev-{i}": {f"dev-{j}": 0 for j in range(3) if j != i} for i in range(3)})
    ok, picked, _ = hp.fit(devs, DeviceRequest(2, 100, 0, 10), c)
    assert ok and len(picked) == 2


def test_fit_topology_negative_scores():
    devs, c = _three({"dev-0": {"dev-1": -5, "dev-2": -3}, "dev-1": {"dev-0": -5, "dev-2": -1},
                      "dev-2": {"dev-0": -3, "dev-1": -1}})
    ok, picked, _ = hp.fit(devs, DeviceRequest(1, 100, 0, 10), c)
    assert ok and [p.uuid for p in picked] == ["dev-0"]
    ok, picked, _ = hp.fit(devs, DeviceRequest(2, 100, 0, 10), c)
    assert ok and {p.uuid for p in picked} == {"dev-1", "dev-2"}


def test_worst_single_card_and_best_combination():
    """TestComputeWorstSingleCard (gpu0 300, gpu1 250, gpu2 350) and TestComputeBestCombination."""
    scores = {"gpu0": {"gpu1": 100, "gpu2": 200}, "gpu1": {"gpu0": 100, "gpu2": 150},
              "gpu2": {"gpu0": 200, "gpu1": 150}}
    cds = [hp.ContainerDevice(0, f"gpu{i}", 0, 0) for i in range(3)]
    assert [d.uuid for d in hp.worst_single_card(cds, scores)] == ["gpu1"]
    combos = [(cds[0], cds[1]), (cds[0], cds[2]), (cds[1], cds[2])]
    assert [d.uuid for d in hp.best_combination(combos, scores)] == ["gpu0", "gpu2"]


def test_numa_bind_sort_preserves_affinity():
    """numa_sort_test.go TestNumaBindSortPreservesAffinity."""
    devs = [_d("A_n0", count=10, totalmem=8192, numa=0), _d("B_n0", count=10, totalmem=8192, numa=0),
            _d("C_n1", count=10, totalmem=8192, numa=1)]
    scored = list(zip(devs, [5, 1, 3]))
    req, c = DeviceRequest(2, 100, 0, 10), _annos({"nvidia.com/numa-bind": "true"})
    ok, _, _ = hp.fit([d for d, _ in hp.sort_devices(scored, "spread", False)], req, c)
    assert not ok
    ok, picked, _ = hp.fit([d for d, _ in hp.sort_devices(scored, "spread", True)], req, c)
    assert ok and {p.uuid for p in picked} == {"A_n0", "B_n0"}


def test_score_primary_selects_across_numa():
    """numa_sort_test.go TestScorePrimarySelectsAcrossNuma."""
    devs = [_d("P_n0", count=10, totalmem=8192, numa=0), _d("Q_n1", count=10, totalmem=8192, numa=1),
            _d("R_n1", count=10, totalmem=8192, numa=1)]
    sorted_ = [d for d, _ in hp.sort_devices(list(zip(devs, [1, 8, 5])), "spread", False)]
    ok, picked, _ = hp.fit(sorted_, DeviceRequest(1, 100, 0, 10), Constraints())
    assert ok and [p.uuid for p in picked] == ["P_n0"]


# device_test.go Test_checkType, TestCheckGPUtype_*; devices_test.go TestCheckType
@pytest.mark.parametrize(("use", "nouse", "card", "want"), [
    ("A10", None, "NVIDIA A100", True), ("A10", "A100", "NVIDIA A100", False), ("A10", "A100", "NVIDIA A10", True),
    (None, "A100", "NVIDIA-A100", False), (None, "A100", "NVIDIA-V100", True),
    ("", None, "NVIDIA-A100", True), ("   ", None, "NVIDIA-A100", True), (None, "", "NVIDIA-A100", True),
    (None, "   ", "NVIDIA-A100", True), ("A100", None, "NVIDIA-V100", False), (None, None, "NVIDIA-A100", True),
    ("A100,V100", None, "NVIDIA-A100", True), ("V100", None, "NVIDIA-A100", False), (None, "V100", "NVIDIA-A100", True),
    ("a100", None, "NVIDIA-A100", True),  # case-insensitive
])
def test_check_type(use, nouse, card, want):
    c = Constraints(use_types=use.split(",") if use is not None else [],
                    nouse_types=nouse.split(",") if nouse is not None else [])
    assert hp.check_type(c, card) is want


# devices_test.go TestCheckUUID
@pytest.mark.parametrize(("use", "nouse", "uuid", "want"), [
    (None, None, "abc", True), ("abc,123", None, "abc", True), ("abc,123", None, "1abc", False),
    (None, "abc,123", "abc", False), (None, "abc,123", "1abc", True), ("abc,123", "abc", "abc", False),
    ("abc,123", "456", "abc", True), (" abc , 123 ", None, "abc", True), ("", None, "abc", True),
    ("   ", None, "abc", True), (None, "", "abc", True),
])
def test_check_uuid(use, nouse, uuid, want):
    c = Constraints(use_uuids=use.split(",") if use is not None else [],
                    nouse_uuids=nouse.split(",") if nouse is not None else [])
    assert hp.check_uuid(c, uuid) is want
