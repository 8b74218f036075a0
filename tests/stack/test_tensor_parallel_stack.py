"""A ``requestGPU: N`` replica: HAMi's topology-aware pick gives it an NVLink pair, ``slicelm up`` gives it those
N cards (``CUDA_VISIBLE_DEVICES``) and ``slicelm serve --tensor-parallel-size N``; production-stack's
``vllmConfig.tensorParallelSize`` must agree with the GPU count (both ``slicelm up`` and the chart say so,
naming the field); the chart passes the same flag (tests/deploy/test_chart_tensor_parallel.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slicelm.slicing.placement import AssignedGPU
from slicelm.stack.launch import replica_launches
from slicelm.stack.planning import ReplicaPlacement, StackPlan
from slicelm.stack.procs import free_port
from slicelm.stack.serve_args import serve_command
from slicelm.stack.serve_flags import check_extra_args
from slicelm.stack.spec import StackSpecError, parse_stack

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "stacks" / "gpu-tp.yaml"
M0 = "servingEngineSpec.modelSpec[0]"
H200 = {"count": 10, "devmem": 143771, "devcore": 100, "type": "NVIDIA-NVIDIA H200", "numa": 0, "mode": "hami-core",
        "health": True}


def uuid(i: int) -> str:
    return f"GPU-{i:08d}-0000-0000-0000-000000000000"


def four_gpus_two_nvlink_pairs() -> list[dict]:
    """GPUs 1-2 and 0-3 are NVLink pairs (18 links each, HAMi scores 100 per link); the rest cross PCIe."""
    pairs = {(1, 2): 1800, (0, 3): 1800}
    gpus = [{**H200, "id": uuid(i), "index": i, "links": {}} for i in range(4)]
    for a in range(4):
        for b in range(4):
            if a != b:
                gpus[a]["links"][uuid(b)] = pairs.get((min(a, b), max(a, b)), 20)
    return gpus


def model(**kw):
    return parse_stack({"servingEngineSpec": {"modelSpec": [{"name": "m", "modelURL": "/models/x", **kw}]},
                        "slicelm": {"host": "127.0.0.1"}})


@pytest.mark.parametrize(("fields", "says"), [
    ({"vllmConfig": {"tensorParallelSize": 2}}, "tensorParallelSize: 2 needs requestGPU: 2"),
    ({"requestGPU": 4, "vllmConfig": {"tensorParallelSize": 2}}, "tensorParallelSize: 2 must equal requestGPU (4)"),
    ({"requestGPU": 2, "vllmConfig": {"tensorParallelSize": 1}}, "tensorParallelSize: 1 must equal requestGPU (2)"),
])
def test_tensor_parallel_size_must_match_the_gpus(fields, says):
    with pytest.raises(StackSpecError) as e:
        model(**fields)
    assert f"{M0}.vllmConfig.{says}" in str(e.value)


def test_the_gpu_count_becomes_the_tensor_parallel_size():
    for fields, tp in (({"requestGPU": 2}, 2), ({"requestGPU": 2, "vllmConfig": {"tensorParallelSize": 2}}, 2),
                       ({"limitGPU": 4}, 4), ({"requestGPU": 1}, 1), ({}, 1),
                       ({"vllmConfig": {"tensorParallelSize": 1}}, 1)):
        m = model(**fields).models()[0]
        cmd = serve_command(m, "h", 1, "cuda", None)
        assert m.tensor_parallel_size() == tp
        assert (cmd[cmd.index("--tensor-parallel-size") + 1] == str(tp)) if tp > 1 else \
            "--tensor-parallel-size" not in cmd
    problems = check_extra_args(["--tensor-parallel-size", "2", "-tp", "2"], M0)
    assert [p.split(": ")[1] for p in problems] == ["--tensor-parallel-size is set by slicelm up for each replica",
                                                   "-tp is set by slicelm up for each replica"]


def test_a_replica_on_two_gpus_sees_both_and_runs_tensor_parallel(tmp_path: Path, caplog):
    spec = model(requestGPU=2, requestGPUMem="60000", requestGPUCores=50)
    plan = StackPlan([ReplicaPlacement("m", 0, [AssignedGPU(uuid(1), 1, 60000, 50),
                                                AssignedGPU(uuid(2), 2, 60000, 50)], 3.0)], [])
    mps_calls = []
    (la,) = replica_launches(spec, plan, tmp_path, mps_env=lambda sl: mps_calls.append(sl) or {"MPS": "1"})
    assert la.env["CUDA_VISIBLE_DEVICES"] == f"{uuid(1)},{uuid(2)}"
    assert la.cmd[la.cmd.index("--tensor-parallel-size") + 1] == "2"
    assert la.cmd[la.cmd.index("--gpu-memory-budget") + 1] == "60000MiB"  # per GPU, as HAMi's gpumem
    assert la.env["SLICELM_SLICE_MEMORY_BYTES"] == str(60000 << 20)
    assert mps_calls == [] and "MPS" not in la.env  # an MPS client reaches one card's daemon
    assert "requestGPUCores 50% is not enforced" in caplog.text
    assert [g["uuid"] for g in la.gpus] == [uuid(1), uuid(2)]


def test_plan_and_dry_run_give_the_70b_replica_an_nvlink_pair(tmp_path: Path):
    (tmp_path / "inv.json").write_text(json.dumps(four_gpus_two_nvlink_pairs()))
    cli = [sys.executable, "-m", "slicelm.entrypoints.cli"]
    out = subprocess.run([*cli, "plan", str(EXAMPLE), "--inventory", str(tmp_path / "inv.json"), "--format", "json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    placed = {p["model"]: sorted(g["index"] for g in p["gpus"]) for p in json.loads(out.stdout)["placements"]}
    assert placed["llama70b"] in ([1, 2], [0, 3]) and len(placed["chat"]) == 1
    assert not set(placed["chat"]) & set(placed["llama70b"])
    spec = yaml.safe_load(EXAMPLE.read_text())  # the router on a free port: the dry run checks it is free
    spec.setdefault("routerSpec", {})["containerPort"] = free_port("127.0.0.1")
    (tmp_path / "stack.yaml").write_text(yaml.safe_dump(spec))
    dry = subprocess.run([*cli, "up", str(tmp_path / "stack.yaml"), "--dry-run",
                          "--inventory", str(tmp_path / "inv.json"),
                          "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    line = next(ln for ln in dry.stdout.splitlines() if "Llama-3.1-70B" in ln and "serve" in ln)
    visible = next(w for w in line.split() if w.startswith("CUDA_VISIBLE_DEVICES=")).split("=", 1)[1]
    assert sorted(visible.split(",")) == [uuid(i) for i in placed["llama70b"]] and "--tensor-parallel-size 2" in line
