"""The stack file: bad files give one clear error naming the field path; production-stack's files validate."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from slicelm.stack.spec import StackSpecError, export_schema, load_stack, parse_stack

ROOT = Path(__file__).resolve().parents[2]
# ../shared/docs/stack-examples: production-stack's tutorial values files and the seed's HAMi RAG stack, unchanged
EXAMPLES = sorted((ROOT.parent / "shared" / "docs" / "stack-examples").glob("*.yaml"))
M0 = "servingEngineSpec.modelSpec[0]"


def stack(**model) -> dict:
    base = {"name": "chat", "modelURL": "smollm2-135m-instruct"}
    return {"servingEngineSpec": {"modelSpec": [{**base, **model}]}}


def with_vllm(**vc) -> dict:
    return stack(vllmConfig=vc)


BAD = [  # (id, stack dict, the path the error must name, a word the message must contain)
    ("gpumem-unit", stack(requestGPUMem="14Gi"), f"{M0}.requestGPUMem", "MiB"),
    ("gpumem-zero", stack(requestGPUMem=0), f"{M0}.requestGPUMem", "> 0"),
    ("percentage-over", stack(requestGPUMemPercentage=120), f"{M0}.requestGPUMemPercentage", "0-100"),
    ("percentage-negative", stack(requestGPUMemPercentage="-5"), f"{M0}.requestGPUMemPercentage", "percentage"),
    ("gpu-fraction", stack(requestGPU=0.5), f"{M0}.requestGPU", "whole number"),
    ("cores-negative", stack(requestGPUCores=-1), f"{M0}.requestGPUCores", ">= 0"),
    ("typo-modelurl", {"servingEngineSpec": {"modelSpec": [{"name": "a", "modelURL": "x", "modelUrl": "y"}]}},
     f"{M0}.modelUrl", "modelURL"),
    ("unknown-top", {**stack(), "servingEngine": {}}, "servingEngine", "unknown key"),
    ("missing-modelurl", {"servingEngineSpec": {"modelSpec": [{"name": "a"}]}}, f"{M0}.modelURL", "required"),
    ("missing-serving", {"routerSpec": {}}, "servingEngineSpec", "required"),
    ("empty-models", {"servingEngineSpec": {"modelSpec": []}}, "servingEngineSpec.modelSpec", "at least 1"),
    ("name-uppercase", stack(name="Chat"), f"{M0}.name", "DNS label"),
    ("name-duplicate", {"servingEngineSpec": {"modelSpec": [{"name": "a", "modelURL": "x"},
                                                            {"name": "a", "modelURL": "y"}]}},
     "servingEngineSpec.modelSpec[1].name", "twice"),
    ("replicas-negative", stack(replicaCount=-1), f"{M0}.replicaCount", "greater than or equal"),
    ("maxmodellen-zero", with_vllm(maxModelLen=0), f"{M0}.vllmConfig.maxModelLen", "greater than"),
    ("dtype", with_vllm(dtype="float8"), f"{M0}.vllmConfig.dtype", "bfloat16"),
    ("tensor-parallel", with_vllm(tensorParallelSize=2), f"{M0}.vllmConfig.tensorParallelSize", "needs requestGPU"),
    ("utilization", with_vllm(gpuMemoryUtilization=1.5), f"{M0}.vllmConfig.gpuMemoryUtilization", "(0, 1]"),
    ("extra-arg-unknown", with_vllm(extraArgs=["--trust-remote-code"]), f"{M0}.vllmConfig.extraArgs[0]",
     "not a slicelm serve flag"),
    ("extra-arg-managed", with_vllm(extraArgs=["--max-num-seqs", "8", "--port", "9000"]),
     f"{M0}.vllmConfig.extraArgs[2]", "set by slicelm up"),
    ("vllm-typo", with_vllm(maxNumSeq=8), f"{M0}.vllmConfig.maxNumSeq", "maxNumSeqs"),
    ("policy", stack(podAnnotations={"hami.io/gpu-scheduler-policy": "fastest"}),
     f"{M0}.podAnnotations[hami.io/gpu-scheduler-policy]", "binpack"),
    ("numa-bind", stack(podAnnotations={"nvidia.com/numa-bind": "yes"}), f"{M0}.podAnnotations[nvidia.com/numa-bind]",
     "true"),
    ("scoring-weights", stack(podAnnotations={"hami.io/device-scoring-weights": "slot=a"}),
     f"{M0}.podAnnotations[hami.io/device-scoring-weights]", "name=number"),
    ("gputype-empty-item", stack(podAnnotations={"nvidia.com/use-gputype": "A100,,H100"}),
     f"{M0}.podAnnotations[nvidia.com/use-gputype]", "empty"),
    ("limit-differs", stack(requestGPU=1, requestGPUMem="8000", limitGPUMem="9000"), f"{M0}.limitGPUMem",
     "must equal requestGPUMem"),
    ("gpu-type-mig", stack(requestGPU=1, requestGPUType="nvidia.com/mig-4g.71gb"), f"{M0}.requestGPUType",
     "nvidia.com/gpu"),
    ("lora", stack(enableLoRA=True), f"{M0}.enableLoRA", "LoRA"),
    ("env-secret", stack(env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s"}}}]),
     f"{M0}.env[0].valueFrom", "secrets"),
    ("env-bad-name", stack(env=[{"name": "1X", "value": "1"}]), f"{M0}.env[0].name", "pattern"),
    ("routing-kvaware", {**stack(), "routerSpec": {"routingLogic": "kvaware"}}, "routerSpec.routingLogic",
     "roundrobin"),
    ("session-without-key", {**stack(), "routerSpec": {"routingLogic": "session"}}, "routerSpec.sessionKey",
     "needs sessionKey"),
    ("router-port", {**stack(), "routerSpec": {"containerPort": 70000}}, "routerSpec.containerPort", "65535"),
    ("slicelm-device", {**stack(), "slicelm": {"device": "tpu"}}, "slicelm.device", "cpu"),
    ("slicelm-unknown", {**stack(), "slicelm": {"gpus": 2}}, "slicelm.gpus", "unknown key"),
]


@pytest.mark.parametrize(("raw", "path", "word"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_stack_names_the_field(raw: dict, path: str, word: str) -> None:
    with pytest.raises(StackSpecError) as e:
        parse_stack(raw)
    assert len(e.value.problems) == 1, e.value.problems
    line = e.value.problems[0]
    assert line.startswith(f"{path}: "), line
    assert word in line, line


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("servingEngineSpec:\n  modelSpec:\n  - name: a\n   modelURL: [x\n")
    with pytest.raises(StackSpecError, match=r"line \d+, column \d+: not valid YAML"):
        load_stack(tmp_path / "s.yaml")
    (tmp_path / "l.yaml").write_text("- a\n- b\n")
    with pytest.raises(StackSpecError, match="must be a YAML mapping"):
        load_stack(tmp_path / "l.yaml")
    with pytest.raises(StackSpecError, match="cannot read"):
        load_stack(tmp_path / "missing.yaml")


def test_bad_file_through_the_cli_starts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(stack(requestGPUMemPercentage=150)))
    for cmd in (["plan", str(path)], ["up", str(path), "--run-dir", str(tmp_path / "run")]):
        r = subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", *cmd], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2, r
        assert f"error: {M0}.requestGPUMemPercentage: must be within 0-100, got 150" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing started, not even a run dir


def test_hami_values_parse_as_hami_does() -> None:
    spec = parse_stack(stack(requestGPU="1", requestGPUMem=" 14000 ", requestGPUMemPercentage="30",
                             requestGPUCores="250", podAnnotations={"nvidia.com/numa-bind": "true"}))
    m = spec.models()[0]
    assert (m.requestGPU, m.requestGPUMem, m.requestGPUMemPercentage, m.requestGPUCores) == (1, 14000, 30, 100)
    assert any("requestGPUCores: 250 clamped to 100" in w for w in spec.warnings)
    only_limit = parse_stack(stack(limitGPU=1, limitGPUMem="8000")).models()[0]
    assert only_limit.gpu("GPUMem") == 8000 and only_limit.gpu("GPU") == 1


def test_known_production_stack_keys_are_reported_ignored() -> None:
    raw = stack(repository="vllm/vllm-openai", pvcStorage="10Gi", keda={"enabled": True},
                vllmConfig={"maxLoras": 4, "v0": "1"}, podAnnotations={"prometheus.io/scrape": "true"})
    raw["routerSpec"] = {"ingress": {"enabled": True}, "serviceDiscovery": "k8s"}
    raw["cacheserverSpec"] = {"enabled": False}
    warnings = parse_stack(raw).warnings
    for path in (f"{M0}.repository", f"{M0}.pvcStorage", f"{M0}.keda",
                 f"{M0}.vllmConfig.maxLoras", f"{M0}.vllmConfig.v0", f"{M0}.podAnnotations[prometheus.io/scrape]",
                 "routerSpec.ingress", "routerSpec.serviceDiscovery", "cacheserverSpec"):
        assert any(w.startswith(f"{path}: ignored (") for w in warnings), (path, warnings)


def test_hf_token_string_is_the_replicas_hf_token_and_a_secret_ref_is_reported() -> None:
    from slicelm.stack.serve_args import model_env

    spec = parse_stack(stack(hf_token="hf_abc", env=[{"name": "HF_HOME", "value": "/models"}]))
    assert model_env([], spec.models()[0], None) == {"HF_TOKEN": "hf_abc", "HF_HOME": "/models"}
    ref = parse_stack(stack(hf_token={"secretName": "hf", "secretKey": "token"}))
    assert "HF_TOKEN" not in model_env([], ref.models()[0], None)
    assert any(w.startswith(f"{M0}.hf_token: ignored by slicelm up") for w in ref.warnings)
    with pytest.raises(StackSpecError, match="hf_token"):
        parse_stack(stack(hf_token={"secretName": "hf"}))


def test_shared_examples_are_there() -> None:
    assert len(EXAMPLES) >= 4, "../shared/docs/stack-examples is missing (it sits beside the checkout, in CI too)"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_production_stack_examples_validate(path: Path) -> None:
    spec = load_stack(path)
    assert spec.models()
    for m in spec.models():
        assert m.modelURL and m.replicaCount >= 1


def test_seed_example_values() -> None:
    seed = next(p for p in EXAMPLES if p.name == "seed-hami-rag.yaml")
    embed, rerank = load_stack(seed).models()
    assert (embed.requestGPUMem, rerank.requestGPUMem) == (14000, 8000)
    assert embed.podAnnotations["hami.io/gpu-scheduler-policy"] == "binpack"
    assert embed.vllmConfig.extraArgs == ["--task", "embed"]


def test_schema_file_equals_export() -> None:
    checked_in = json.loads((ROOT / "slicelm" / "stack" / "stack.schema.json").read_text())
    assert checked_in == export_schema(), "run: python -m slicelm.stack.schema > slicelm/stack/stack.schema.json"


def test_schema_accepts_what_production_stack_knows() -> None:
    schema = export_schema()
    model = schema["$defs"]["ModelSpec"]
    assert model["additionalProperties"] is False
    for key in ("requestGPUMem", "pvcStorage", "vllmConfig", "podAnnotations", "hf_token"):
        assert key in model["properties"], key
    assert {"integer", "string"} <= set(model["properties"]["requestGPUMem"]["anyOf"][0]["type"])


def test_cpu_rag_example_validates() -> None:
    spec = load_stack(ROOT / "examples" / "stacks" / "cpu-rag.yaml")
    assert [m.name for m in spec.models()] == ["chat", "embed"]
    assert not spec.warnings


def test_gpu_rag_example_validates() -> None:
    spec = load_stack(ROOT / "examples" / "stacks" / "gpu-rag.yaml")
    assert [m.requestGPUMemPercentage for m in spec.models()] == [40, 20, 20]
    assert not spec.warnings


def test_sample_of_the_error_text() -> None:
    raw = yaml.safe_load(textwrap.dedent("""
        servingEngineSpec:
          modelSpec:
            - name: ok
              modelURL: a
            - name: bad
              modelURL: b
              requestGPUMem: 14GiB
    """))
    with pytest.raises(StackSpecError) as e:
        parse_stack(raw)
    assert str(e.value) == ("servingEngineSpec.modelSpec[1].requestGPUMem: must be a whole number of MiB "
                            "(HAMi's nvidia.com/gpumem, e.g. \"14000\"), got '14GiB'")
