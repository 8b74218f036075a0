"""The chart renders a ``requestGPU: 2`` replica as production-stack does (``nvidia.com/gpu: "2"``) with
``slicelm serve --tensor-parallel-size 2``, and refuses a ``tensorParallelSize`` that disagrees with the GPU
count, naming the field as ``slicelm up`` does."""

from __future__ import annotations

from pathlib import Path

import yaml
from helm_utils import CHART, ROOT, find, helm, render

EXAMPLE = ROOT / "examples" / "stacks" / "gpu-tp.yaml"
M0 = "servingEngineSpec.modelSpec[0]"


def test_chart_passes_the_size_and_rejects_a_mismatch(tmp_path: Path):
    deployment = find(render(EXAMPLE), "Deployment", "rel-llama70b-deployment-vllm")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    values = yaml.safe_load(EXAMPLE.read_text())
    values["servingEngineSpec"]["modelSpec"][0]["requestGPU"] = 4
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(values))
    proc = helm("template", "rel", str(CHART), "-f", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode != 0
    assert f"{M0}.vllmConfig.tensorParallelSize: 2 must equal requestGPU (4)" in proc.stderr
