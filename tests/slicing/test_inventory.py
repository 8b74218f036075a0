"""Inventory from NVML (a fake pynvml module) and from HAMi node-register files."""

from __future__ import annotations

import json

import pytest
from fake_nvml import FakeGPU, FakeNVML

from slicelm.slicing import nvml_probe
from slicelm.slicing.inventory import GPU, Inventory, InventoryError

MiB = 1 << 20
B0, B1, B2 = "00000000:17:00.0", "00000000:65:00.0", "00000000:CA:00.0"


def _machine(**kw) -> FakeNVML:
    gpus = [
        FakeGPU("GPU-a", "NVIDIA H200", 143771, B0, procs=[(4242, 2048 * MiB)], nvlinks=[B1] * 4),
        FakeGPU("GPU-b", "NVIDIA H200", 143771, B1, nvlinks=[B0] * 4),
        FakeGPU("GPU-c", "Tesla T4", 15360, B2),
    ]
    # NODE (same CPU) between a and b, SYSTEM (cross CPU) to c
    return FakeNVML(gpus, {(0, 1): 40, (0, 2): 50, (1, 2): 50}, **kw)


def test_from_nvml_reads_gpus_links_and_foreign_processes():
    nvml = _machine()
    inv = Inventory.from_nvml(nvml, own_pids=[])
    assert nvml.initialized == 0  # shut down again
    a, b, c = inv.gpus
    assert (a.uuid, a.index, a.type, a.memory_mib, a.shares, a.cores) == ("GPU-a", 0, "NVIDIA H200", 143771, 10, 100)
    assert c.type == "NVIDIA-Tesla T4"  # HAMi prefixes names that do not start with NVIDIA
    # a process that is not ours takes memory and one share
    assert (a.used_memory_mib, a.used_shares) == (2048, 1)
    assert (b.used_memory_mib, b.used_shares) == (0, 0)
    # SameCPU 20 + four NVLinks 400; cross-CPU PCIe only 10
    assert a.links == {"GPU-b": 420, "GPU-c": 10}
    assert b.links == {"GPU-a": 420, "GPU-c": 10}
    assert c.links == {"GPU-a": 10, "GPU-b": 10}


def test_own_processes_are_not_used_memory():
    inv = Inventory.from_nvml(_machine(), own_pids=[4242])
    assert (inv.gpus[0].used_memory_mib, inv.gpus[0].used_shares) == (0, 0)


def test_hidden_process_memory_falls_back_to_device_used():
    nvml = _machine()
    nvml.gpus[1].procs = [(777, None)]
    nvml.gpus[1].used_bytes = 5000 * MiB
    assert Inventory.from_nvml(nvml).gpus[1].used_memory_mib == 5000


def test_nvswitch_links_count_the_smaller_side():
    gpus = [FakeGPU("GPU-0", "NVIDIA H100", 81559, B0, nvlinks=["switch"] * 18),
            FakeGPU("GPU-1", "NVIDIA H100", 81559, B1, nvlinks=["switch"] * 16)]
    inv = Inventory.from_nvml(FakeNVML(gpus, {(0, 1): 10}))  # single PCIe switch
    assert inv.gpus[0].links == {"GPU-1": 50 + 1600}


def test_asymmetric_links_score_zero():
    # NVLink seen from a toward b only (calculate_score_test.go: asymmetric pair scores 0)
    gpus = [FakeGPU("gpu0", "NVIDIA A100", 40960, B0, nvlinks=[B1] * 4),
            FakeGPU("gpu1", "NVIDIA A100", 40960, B1)]
    inv = Inventory.from_nvml(FakeNVML(gpus, {(0, 1): 40}))
    assert inv.gpus[0].links == {"gpu1": 0} and inv.gpus[1].links == {"gpu0": 0}


def test_hami_calculate_gpu_score_table():
    """calculate_score_test.go's 4-GPU NVLink matrix (NV1/NV2 links, no PCIe entries)."""
    matrix = {(0, 1): 1, (0, 2): 1, (0, 3): 2, (1, 2): 2, (1, 3): 1, (2, 3): 2}
    buses = [f"00000000:{i + 1:02X}:00.0" for i in range(4)]
    gpus = []
    for i in range(4):
        links = []
        for j in range(4):
            n = matrix.get((min(i, j), max(i, j)), 0) if i != j else 0
            links += [buses[j]] * n
        gpus.append(FakeGPU(f"gpu{i}", "NVIDIA V100", 16384, buses[i], nvlinks=links))
    nvml = FakeNVML(gpus)
    nvml.nvmlDeviceGetTopologyCommonAncestor = lambda h1, h2: 99  # unknown level: no PCIe entry
    inv = Inventory.from_nvml(nvml)
    assert [g.links for g in inv.gpus] == [
        {"gpu1": 100, "gpu2": 100, "gpu3": 200},
        {"gpu0": 100, "gpu2": 200, "gpu3": 100},
        {"gpu0": 100, "gpu1": 200, "gpu3": 200},
        {"gpu0": 200, "gpu1": 100, "gpu2": 200},
    ]


def test_no_driver_means_empty_inventory():
    assert Inventory.from_nvml(_machine(no_driver=True)).gpus == []


def test_bus_id_and_numa(tmp_path):
    from types import SimpleNamespace
    assert nvml_probe.bus_id(SimpleNamespace(busId=b"00000000:17:00.0")) == "0000:17:00.0"
    assert nvml_probe.sysfs_numa_node("not-a-bus") == 0
    inv = nvml_probe.probe(_machine(), numa_of=lambda bid: {"0000:ca:00.0": 1}.get(bid, 0))
    assert [g.numa for g in inv] == [0, 0, 1]


REGISTER = [
    {"id": "GPU-0", "index": 0, "count": 10, "devmem": 23034, "devcore": 100, "type": "NVIDIA L4", "numa": 0,
     "mode": "hami-core", "health": True},
    {"id": "GPU-1", "index": 1, "count": 10, "devmem": 23034, "devcore": 100, "type": "NVIDIA L4", "numa": 1,
     "mode": "hami-core", "health": False, "used": 2, "usedmem": 8000, "usedcores": 30, "links": {"GPU-0": 30}},
]


def test_from_file_reads_hami_register(tmp_path):
    path = tmp_path / "inv.json"
    path.write_text(json.dumps(REGISTER))
    inv = Inventory.from_file(path)
    assert inv.gpus[0] == GPU("GPU-0", 0, "NVIDIA L4", 23034)
    g1 = inv.gpus[1]
    assert (g1.numa, g1.health, g1.used_shares, g1.used_memory_mib, g1.used_cores, g1.links) == \
        (1, False, 2, 8000, 30, {"GPU-0": 30})
    assert Inventory.from_json(inv.to_json()) == inv


def test_from_file_reads_node_annotations():
    """Test_GetNodeDevices / TestGetNodeDevices_PairScores inputs: the annotations as the node holds them."""
    annos = {
        "hami.io/node-nvidia-register": '[{"id":"GPU-0","count":1,"devmem":8192,"devcore":100,"type":"NVIDIA-V100",'
                                        '"health":true},{"id":"GPU-1","count":1,"devmem":8192,"devcore":100,'
                                        '"type":"NVIDIA-V100","health":true}]',
        "hami.io/node-nvidia-score": '[{"uuid":"GPU-0","score":{"GPU-1":100}},{"uuid":"GPU-1","score":{"GPU-0":100}}]',
    }
    inv = Inventory.from_json(annos)
    assert [g.uuid for g in inv.gpus] == ["GPU-0", "GPU-1"]
    assert inv.gpus[0].links["GPU-1"] == 100 and inv.gpus[1].index == 1
    with pytest.raises(InventoryError, match="not JSON"):
        Inventory.from_json({"hami.io/node-nvidia-register": annos["hami.io/node-nvidia-register"],
                             "hami.io/node-nvidia-score": "not-valid-json"})


@pytest.mark.parametrize(("data", "match"), [
    ({"gpus": []}, "hami.io/node-nvidia-register"),
    ([{"devmem": 100}], r"\[0\]\.id: required"),
    ([{"id": "G", "devmem": "16g"}], r"\[0\]\.devmem: expected a non-negative integer"),
    ([{"id": "G"}], r"\[0\]\.devmem: required"),
    ([{"id": "G", "devmem": 100, "usedmem": 200}], r"\[0\]\.usedmem: 200 exceeds devmem 100"),
    ([{"id": "G", "devmem": 100, "health": "yes"}], r"\[0\]\.health"),
    ([{"id": "G", "devmem": 100}, {"id": "G", "devmem": 100}], r"\[1\]\.id: duplicate"),
    ([{"id": "G", "devmem": 100, "links": {"H": 100}}], r"\[0\]\.links: 'H' is not another GPU"),
    ([{"id": "G", "devmem": 100, "count": -1}], r"\[0\]\.count"),
])
def test_bad_register_names_the_field(data, match):
    with pytest.raises(InventoryError, match=match):
        Inventory.from_json(data)


def test_bad_file(tmp_path):
    with pytest.raises(InventoryError, match="cannot read"):
        Inventory.from_file(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(InventoryError, match="not JSON"):
        Inventory.from_file(tmp_path / "x.json")
