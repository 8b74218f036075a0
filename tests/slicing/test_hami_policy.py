"""HAMi's own scheduler test tables (Project-HAMi/HAMi 4707fb0), same inputs and expected results:
pkg/scheduler/policy/gpu_policy_test.go, pkg/scheduler/numa_sort_test.go, pkg/device/nvidia/device_test.go
(Fit, topology), pkg/device/devices_test.go (CheckType / CheckUUID), pkg/util/device_scoring_weights_test.go."""

from __future__ import annotations

import pytest

from slicelm.slicing import hami_policy as hp
from slicelm.slicing.hami_policy import DeviceRequest, DeviceUsage, Weights


def _dev(numa=0, used=0, index=0, **kw) -> DeviceUsage:
    return DeviceUsage(id=kw.pop("id", "d"), numa=numa, used=used, index=index, **kw)


# gpu_policy_test.go TestDeviceUsageList_Less: (name, policy, numa_bind, (numa, used, index, score) x2, less)
LESS = [
    ("Binpack policy with same Numa", "binpack", False, (0, 10, 0, 10), (0, 20, 0, 20), True),
    ("Binpack: score primary, lower score sorts first across NUMA", "binpack", False, (1, 10, 0, 10), (0, 20, 0, 20),
     True),
    ("Binpack: score primary, higher score sorts last even on lower NUMA", "binpack", False, (0, 10, 0, 10),
     (1, 20, 0, 20), True),
    ("Binpack: NUMA tiebreaker when scores equal", "binpack", False, (0, 0, 0, 15), (1, 0, 0, 15), True),
    ("Binpack: score primary over NUMA, high-NUMA high-score sorts last", "binpack", False, (1, 0, 0, 20),
     (0, 0, 0, 10), False),
    ("Spread: score primary, higher score sorts first", "spread", False, (0, 10, 0, 10), (0, 20, 0, 20), False),
    ("Spread: score primary, lower score sorts last across NUMA", "spread", False, (1, 10, 0, 10), (0, 20, 0, 20),
     False),
    ("Spread: score primary over NUMA, high-NUMA high-score sorts first", "spread", False, (1, 0, 0, 20),
     (0, 0, 0, 10), True),
    ("Spread: NUMA tiebreaker when scores equal", "spread", False, (0, 0, 0, 15), (1, 0, 0, 15), True),
    ("Binpack+NumaBind: NUMA primary, higher NUMA sorts first regardless of Score", "binpack", True, (1, 0, 0, 5),
     (0, 0, 0, 99), True),
    ("Binpack+NumaBind: same NUMA falls back to lower Score first", "binpack", True, (0, 0, 0, 10), (0, 0, 0, 20),
     True),
    ("Spread+NumaBind: NUMA primary, lower NUMA sorts first regardless of Score", "spread", True, (0, 0, 0, 5),
     (1, 0, 0, 99), True),
    ("Spread+NumaBind: same NUMA falls back to higher Score first", "spread", True, (0, 0, 0, 20), (0, 0, 0, 10),
     True),
    ("Mutex: busy GPU sorts before idle GPU", "mutex", False, (0, 2, 0, 0), (0, 0, 0, 0), True),
    ("Mutex: idle GPU sorts after busy GPU", "mutex", False, (0, 0, 0, 0), (0, 1, 0, 0), False),
    ("Mutex: NUMA tiebreaker when both idle", "mutex", False, (0, 0, 0, 0), (1, 0, 0, 0), True),
    ("Bare numa: NUMA is the sort key regardless of score", "numa", False, (0, 0, 0, 99), (1, 0, 0, 5), True),
    ("Bare numa: same NUMA falls to deterministic Index tiebreak", "numa", False, (0, 0, 3, 10), (0, 0, 1, 20),
     False),
    ("Chain binpack,numa: score primary, numa tiebreak when scores equal", "binpack,numa", False, (0, 0, 0, 15),
     (1, 0, 0, 15), True),
    ("Chain spread,numa: score primary, numa tiebreak when scores equal", "spread,numa", False, (0, 0, 0, 15),
     (1, 0, 0, 15), True),
    ("Chain numa,spread: numa primary regardless of score", "numa,spread", False, (1, 0, 0, 5), (0, 0, 0, 99), False),
    ("Chain numa,spread: same NUMA falls back to spread (higher score first)", "numa,spread", False, (0, 0, 0, 20),
     (0, 0, 0, 10), True),
    ("Chain mutex,spread: mutex is a Fit() filter, not a sort key; spread decides order", "mutex,spread", False,
     (0, 5, 0, 10), (0, 0, 0, 20), False),
    ("Chain with only filter tokens (mutex,topology-aware) falls back to spread", "mutex,topology-aware", False,
     (0, 0, 0, 10), (0, 0, 0, 20), False),
    ("Chain binpack,numa: deterministic Index tiebreak when score and numa both tie", "binpack,numa", False,
     (0, 0, 5, 10), (0, 0, 2, 10), False),
    ("Chain binpack,spread + NumaBind: numa forced primary to keep groups contiguous", "binpack,spread", True,
     (0, 0, 0, 99), (1, 0, 0, 5), True),
    ("Chain spread,numa + NumaBind: numa moved to front, spread breaks same-NUMA ties", "spread,numa", True,
     (0, 0, 0, 20), (0, 0, 0, 10), True),
]


@pytest.mark.parametrize(("name", "policy", "numa_bind", "a", "b", "expected"), LESS, ids=[r[0] for r in LESS])
def test_less(name, policy, numa_bind, a, b, expected):
    da, db = _dev(a[0], a[1], a[2]), _dev(b[0], b[1], b[2])
    assert hp.less((da, a[3]), (db, b[3]), policy, numa_bind) is expected


def _usage(**kw) -> DeviceUsage:
    return DeviceUsage(id="test-device", type="type1", **kw)


# gpu_policy_test.go TestComputeScore
COMPUTE_SCORE = [
    ("Zero capacity device returns score 0 without panic", dict(count=0, totalcore=0, totalmem=0), [], 0.0),
    ("Partial zero capacity (Count=0) returns score 0 without panic", dict(count=0, totalcore=8, totalmem=4096), [],
     0.0),
    ("ContainerDeviceRequests has no data",
     dict(totalcore=4, totalmem=8192, count=10, used=2, usedcores=1, usedmem=2048), [], 7.0),
    ("Filter other device types and ignore Nums for slots",
     dict(totalcore=4, totalmem=8192, count=10, used=2, usedcores=1, usedmem=2048),
     [DeviceRequest(4, 1024, 0, 1, "type1"), DeviceRequest(2, 4096, 50, 2, "type2")], 11.75),
    ("MemPercentagereq calculation evaluates correctly", dict(totalcore=10, totalmem=10000, count=10),
     [DeviceRequest(1, 0, 50, 2, "type1")], 8.0),
    ("Filter other device types and aggregate same device types", dict(totalcore=10, totalmem=10000, count=10),
     [DeviceRequest(1, 0, 10, 1, "type1"), DeviceRequest(1, 0, 20, 2, "type1"), DeviceRequest(1, 1000, 50, 5, "type2")],
     8.0),
]


@pytest.mark.parametrize(("name", "device", "requests", "expected"), COMPUTE_SCORE, ids=[r[0] for r in COMPUTE_SCORE])
def test_compute_score(name, device, requests, expected):
    assert hp.compute_score(_usage(**device), requests) == expected


def _weighted(id_, used, used_cores, used_mem, numa=0):
    return DeviceUsage(id=id_, type="type1", count=10, totalcore=100, totalmem=100, used=used, usedcores=used_cores,
                       usedmem=used_mem, numa=numa)


def _last(scored, policy, numa_bind=False):
    """Fit consumes the sorted list from the end."""
    return hp.sort_devices(scored, policy, numa_bind)[-1][0].id


def test_compute_score_with_resource_weights():
    """gpu_policy_test.go TestComputeScoreWithResourceWeights."""
    req = [DeviceRequest(1, 0, 40, 0, "type1")]
    a, b = _weighted("gpu-a", 1, 90, 10), _weighted("gpu-b", 7, 10, 20)
    assert (hp.compute_score(a, req), hp.compute_score(b, req)) == (16, 15)
    w = Weights(1, 1, 3)  # memory weight changes the device preference
    sa, sb = hp.compute_score(a, req, w), hp.compute_score(b, req, w)
    assert (sa, sb) == (26, 27)
    assert _last([(a, sa), (b, sb)], "binpack") == "gpu-b"
    assert _last([(a, sa), (b, sb)], "spread") == "gpu-a"
    w = Weights(1, 3, 1)  # core weight can independently change the device preference
    sa, sb = hp.compute_score(a, req, w), hp.compute_score(b, req, w)
    assert (sa, sb) == (34, 17)
    assert _last([(a, sa), (b, sb)], "binpack") == "gpu-a"
    # NUMA ordering remains independent from weighted score
    a, b = _weighted("gpu-a", 1, 90, 10, numa=0), _weighted("gpu-b", 7, 10, 20, numa=1)
    w = Weights(1, 1, 3)
    assert _last([(a, hp.compute_score(a, req, w)), (b, hp.compute_score(b, req, w))], "binpack", True) == "gpu-a"


def test_compute_score_is_float32():
    # 10 × (1/3 + 1/3 + 1/3) in float32 is 10.000000149..., not 10.0 as float64 would round it
    d = DeviceUsage(id="x", count=3, totalcore=3, totalmem=3)
    assert hp.compute_score(d, [DeviceRequest(1, 1, hp.UNSET_PERCENTAGE, 1)]) == hp.f32(10 * hp.f32(
        hp.f32(hp.f32(1 / 3) + hp.f32(1 / 3)) + hp.f32(1 / 3)))


# pkg/util/device_scoring_weights_test.go TestParseDeviceScoringWeights
@pytest.mark.parametrize(("value", "want"), [
    ("slot=1,core=2,memory=3", Weights(1, 2, 3)),
    (" memory = 3, slot = 1, core = 0 ", Weights(1, 0, 3)),
    ("", "expected slot, core, and memory weights"),
    ("slot=1,memory=3", "expected slot, core, and memory weights"),
    ("slot=1,core,memory=3", "expected key=value entries"),
    ("slot=1,core=high,memory=3", "'core' weight must be an integer"),
    ("slot=1,core=-1,memory=3", "'core' weight must not be negative"),
    ("slot=1,bandwidth=2,memory=3", "unknown weight 'bandwidth'"),
    ("slot=1,slot=2,memory=3", "duplicate 'slot' weight"),
    ("slot=0,core=0,memory=0", "at least one weight must be positive"),
])
def test_parse_scoring_weights(value, want):
    if isinstance(want, Weights):
        assert hp.parse_scoring_weights(value) == want
    else:
        with pytest.raises(ValueError, match=want):
            hp.parse_scoring_weights(value)
