"""`slicelm plan`: the JSON contract, HAMi's placement of the seed stack, exit code 2 with reasons, CPU replicas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT.parent / "shared" / "docs" / "stack-examples"  # unchanged, beside the checkout (CI has it too)
L4 = {"index": 0, "count": 10, "devmem": 23034, "devcore": 100, "type": "NVIDIA-NVIDIA L4", "numa": 0,
      "mode": "hami-core", "health": True}


def gpu(i: int, **kw) -> dict:
    return {**L4, "id": f"GPU-{i:08d}-0000-0000-0000-000000000000", "index": i, **kw}


def plan(tmp: Path, stack: Path | dict, gpus: list[dict] | None, fmt: str = "json") -> subprocess.CompletedProcess:
    if isinstance(stack, dict):
        (tmp / "stack.yaml").write_text(yaml.safe_dump(stack))
        stack = tmp / "stack.yaml"
    cmd = [sys.executable, "-m", "slicelm.entrypoints.cli", "plan", str(stack), "--format", fmt]
    if gpus is not None:
        (tmp / "inv.json").write_text(json.dumps(gpus))
        cmd += ["--inventory", str(tmp / "inv.json")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def check_contract(out: dict) -> None:
    assert set(out) == {"placements", "unplaced", "weights"}
    for w in out["weights"].values():
        assert set(w) == {"bytes", "quantized_bytes", "quantization", "estimated"}
    for p in out["placements"]:
        assert set(p) == {"model", "replica", "gpus", "score"}
        for g in p["gpus"]:
            assert set(g) == {"uuid", "index", "memory_mib", "cores"}
    for u in out["unplaced"]:
        assert set(u) == {"model", "replica", "reasons"} and u["reasons"]


def test_seed_stack_binpacks_onto_one_l4(tmp_path: Path) -> None:
    r = plan(tmp_path, EXAMPLES / "seed-hami-rag.yaml", [gpu(0), gpu(1)])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    check_contract(out)
    embed, rerank = out["placements"]
    assert (embed["model"], rerank["model"]) == ("bge-m3-embed", "bge-reranker-v2-m3")
    assert embed["gpus"][0]["uuid"] == rerank["gpus"][0]["uuid"]  # binpack: the fuller card
    assert (embed["gpus"][0]["memory_mib"], rerank["gpus"][0]["memory_mib"]) == (14000, 8000)
    assert out["unplaced"] == []


def test_spread_puts_replicas_on_different_gpus(tmp_path: Path) -> None:
    stack = yaml.safe_load((EXAMPLES / "seed-hami-rag.yaml").read_text())
    for m in stack["servingEngineSpec"]["modelSpec"]:
        m["podAnnotations"]["hami.io/gpu-scheduler-policy"] = "spread"
    out = json.loads(plan(tmp_path, stack, [gpu(0), gpu(1)]).stdout)
    assert len({p["gpus"][0]["uuid"] for p in out["placements"]}) == 2


def test_infeasible_exits_2_with_hami_reasons(tmp_path: Path) -> None:
    r = plan(tmp_path, EXAMPLES / "seed-hami-rag.yaml", [gpu(0, type="NVIDIA-Tesla T4", devmem=15360)])
    assert r.returncode == 2
    out = json.loads(r.stdout)
    check_contract(out)
    assert {u["model"] for u in out["unplaced"]} == {"bge-m3-embed", "bge-reranker-v2-m3"}
    assert any("CardTypeMismatch" in reason for u in out["unplaced"] for reason in u["reasons"])
    assert "cannot place bge-m3-embed/0" in r.stderr


def test_whole_card_when_only_request_gpu(tmp_path: Path) -> None:
    out = json.loads(plan(tmp_path, EXAMPLES / "production-stack-values-01-minimal-example.yaml", [gpu(0)]).stdout)
    (p,) = out["placements"]
    assert p["gpus"][0]["memory_mib"] == L4["devmem"]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_plans_on_a_big_enough_machine(tmp_path: Path, name: str) -> None:
    r = plan(tmp_path, EXAMPLES / name, [gpu(i) for i in range(4)], fmt="table")
    assert r.returncode == 0, r.stderr
    assert "slicelm plan" in r.stdout


def test_cpu_replicas_are_placements_without_gpus(tmp_path: Path) -> None:
    r = plan(tmp_path, ROOT / "examples" / "stacks" / "cpu-rag.yaml", [gpu(0)])
    out = json.loads(r.stdout)
    check_contract(out)
    assert [(p["model"], p["gpus"], p["score"]) for p in out["placements"]] == [("chat", [], None),
                                                                                 ("embed", [], None)]


def test_gpu_stack_on_a_machine_without_gpus_runs_on_cpu(tmp_path: Path) -> None:
    r = plan(tmp_path, EXAMPLES / "seed-hami-rag.yaml", [])
    assert r.returncode == 0, r.stderr
    assert all(p["gpus"] == [] for p in json.loads(r.stdout)["placements"])
    assert "no GPU on this machine" in r.stderr
