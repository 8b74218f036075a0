"""HAMi-core's env read as HAMi-core reads it, and our own SLICELM_SLICE_* env (moved out of the engine)."""

from __future__ import annotations

import pytest

from slicelm.slicing import hami_env
from slicelm.slicing.spec import Slice, SliceEnvError, slice_from_env

MiB, GiB = 1 << 20, 1 << 30


@pytest.mark.parametrize(("raw", "expected"), [
    ("1g", GiB), ("1G", GiB), ("1024m", GiB), ("1024M", GiB), ("1048576k", GiB), ("1048576K", GiB),
    ("1073741824", GiB),  # no suffix = bytes (HAMi-core README: 1g,1024m,1048576k,1073741824)
    ("14000m", 14000 * MiB), ("0x400m", 1024 * MiB), ("010m", 8 * MiB),  # strtoul base 0: hex, octal
    (" 2g", 2 * GiB), ("0", 0), ("0m", 0), ("", 0),
])
def test_parse_limit_hami_core_units(raw, expected):
    assert hami_env.parse_limit("CUDA_DEVICE_MEMORY_LIMIT", raw) == expected


@pytest.mark.parametrize("raw", ["14000mb", "-1", "1.5g", "m", "12 m", "ten", "08", "99999999999999999999g"])
def test_parse_limit_refuses_garbage_naming_the_variable(raw):
    with pytest.raises(hami_env.HamiEnvError, match="CUDA_DEVICE_MEMORY_LIMIT_1"):
        hami_env.parse_limit("CUDA_DEVICE_MEMORY_LIMIT_1", raw)


@pytest.mark.parametrize(("env", "index", "expected"), [
    ({}, 0, None),
    ({"CUDA_DEVICE_MEMORY_LIMIT": "2g"}, 0, 2 * GiB),
    ({"CUDA_DEVICE_MEMORY_LIMIT": "2g", "CUDA_DEVICE_MEMORY_LIMIT_0": "1000m"}, 0, 1000 * MiB),
    ({"CUDA_DEVICE_MEMORY_LIMIT": "2g", "CUDA_DEVICE_MEMORY_LIMIT_0": "1000m"}, 1, 2 * GiB),
    ({"CUDA_DEVICE_MEMORY_LIMIT_1": "3g"}, 0, None),
    ({"CUDA_DEVICE_MEMORY_LIMIT_1": "3g"}, 1, 3 * GiB),
    # per-device 0 falls back to the global value, as in do_init_device_memory_limits
    ({"CUDA_DEVICE_MEMORY_LIMIT": "2g", "CUDA_DEVICE_MEMORY_LIMIT_0": "0"}, 0, 2 * GiB),
    ({"CUDA_DEVICE_MEMORY_LIMIT": "0"}, 0, None),
])
def test_memory_limit_per_device_wins(env, index, expected):
    assert hami_env.memory_limit_bytes(env, index) == expected


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None), ({"CUDA_DEVICE_SM_LIMIT": "0"}, None), ({"CUDA_DEVICE_SM_LIMIT": "100"}, None),
    ({"CUDA_DEVICE_SM_LIMIT": "150"}, None), ({"CUDA_DEVICE_SM_LIMIT": "30"}, 30),
    ({"CUDA_DEVICE_SM_LIMIT": "30", "CUDA_DEVICE_SM_LIMIT_0": "70"}, 70),
    ({"CUDA_DEVICE_SM_LIMIT": "30", "GPU_CORE_UTILIZATION_POLICY": "disable"}, None),
    ({"CUDA_DEVICE_SM_LIMIT": "30", "GPU_CORE_UTILIZATION_POLICY": "force"}, 30),
])
def test_sm_limit(env, expected):
    assert hami_env.sm_limit_percent(env, 0) == expected


def test_core_policy_is_case_sensitive_like_hami_core():
    assert hami_env.core_policy({"GPU_CORE_UTILIZATION_POLICY": "DISABLE"}) == "disable"
    assert hami_env.core_policy({"GPU_CORE_UTILIZATION_POLICY": "Disable"}) == "default"


def test_slice_round_trips_through_env():
    s = Slice(0, "GPU-abc", 6 * GiB, 30, "stack")
    env = s.to_env()
    assert env == {"SLICELM_SLICE_SOURCE": "stack", "SLICELM_SLICE_MEMORY_BYTES": str(6 * GiB),
                   "SLICELM_SLICE_SM_PERCENT": "30"}
    back = slice_from_env(env, 0)
    assert (back.memory_bytes, back.sm_percent, back.source) == (6 * GiB, 30, "stack")
    assert Slice(None, None, None, None, "flag").to_env() == {"SLICELM_SLICE_SOURCE": "flag"}


def test_slice_from_env_order():
    assert slice_from_env({}, 0) is None
    hami = slice_from_env({"CUDA_DEVICE_MEMORY_LIMIT_0": "14000m", "CUDA_DEVICE_SM_LIMIT": "50"}, 0)
    assert hami == Slice(0, None, 14000 * MiB, 50, "hami-env")
    # ours first; inside a HAMi container HAMi-core's smaller memory limit still binds
    both = slice_from_env({"SLICELM_SLICE_MEMORY_BYTES": str(8 * GiB), "SLICELM_SLICE_SOURCE": "stack",
                           "CUDA_DEVICE_MEMORY_LIMIT": "4g", "CUDA_DEVICE_SM_LIMIT": "20"}, 0)
    assert both == Slice(0, None, 4 * GiB, 20, "stack")
    ours = slice_from_env({"SLICELM_SLICE_MEMORY_BYTES": str(2 * GiB), "CUDA_DEVICE_MEMORY_LIMIT": "4g"}, 0)
    assert ours.memory_bytes == 2 * GiB and ours.source == "stack"


@pytest.mark.parametrize(("env", "match"), [
    ({"SLICELM_SLICE_MEMORY_BYTES": "lots"}, "SLICELM_SLICE_MEMORY_BYTES"),
    ({"SLICELM_SLICE_MEMORY_BYTES": "-5"}, "memory_bytes"),
    ({"SLICELM_SLICE_SM_PERCENT": "130"}, "sm_percent"),
    ({"SLICELM_SLICE_SOURCE": "k8s"}, "source"),
])
def test_bad_own_env_is_refused(env, match):
    with pytest.raises(SliceEnvError, match=match):
        slice_from_env(env, 0)
