"""The stack file: production-stack's Helm values (``servingEngineSpec``, ``routerSpec``) plus ``slicelm:``.

``load_stack(path)`` validates a YAML file and returns a ``StackSpec`` (with ``.warnings``: keys
production-stack knows that ``slicelm up`` ignores, each with the reason). Errors raise
``StackSpecError`` whose lines name the field path (``servingEngineSpec.modelSpec[1].requestGPUMem: …``).
HAMi's types and rules: ``requestGPUMem`` is whole MiB (string or int, as production-stack types it),
percentages 0–100, cores above 100 clamp to 100, and a request with only ``requestGPU`` takes whole cards.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from slicelm.stack import known_keys
from slicelm.stack.fields import (
    K8S_NAME,
    bool_annotation,
    cores,
    gpu_count,
    k8s_name,
    mib,
    percentage,
    scoring_weights,
    split_list,
    utilization,
)
from slicelm.stack.serve_flags import check_extra_args


class StackSpecError(ValueError):
    """The stack file is invalid; each line of the message names a field path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _to_str(v: Any) -> Any:
    return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


Str = Annotated[str, BeforeValidator(_to_str)]
GPUCount = Annotated[int, BeforeValidator(gpu_count), WithJsonSchema({"type": ["integer", "string"]})]
MiB = Annotated[int, BeforeValidator(mib), WithJsonSchema({"type": ["integer", "string"], "pattern": r"^\d+$"})]
Percent = Annotated[int, BeforeValidator(percentage), WithJsonSchema({"type": ["integer", "string"]})]
Cores = Annotated[int, BeforeValidator(cores), WithJsonSchema({"type": ["integer", "string"]})]
Fraction = Annotated[float, BeforeValidator(utilization), WithJsonSchema({"type": ["number", "string"]})]
Name = Annotated[str, AfterValidator(k8s_name),
                 WithJsonSchema({"type": "string", "pattern": f"^{K8S_NAME.pattern}$",
                                 "description": "lowercase DNS label, as the chart needs"})]
DTYPES = ("auto", "float32", "float", "fp32", "float16", "half", "fp16", "bfloat16", "bf16")


class EnvVar(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    value: Str = ""
    valueFrom: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _no_secrets(self) -> EnvVar:
        if self.valueFrom is not None:
            raise ValueError(f"@valueFrom: env {self.name}: Kubernetes secrets / fields are not available on one "
                             "machine; give a value")
        return self


class VLLMConfig(_Strict):
    """``vllmConfig``: each key becomes a ``slicelm serve`` flag (``serve_args.py``)."""

    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    maxModelLen: Annotated[int, Field(ge=1)] | None = None
    maxNumSeqs: Annotated[int, Field(ge=1)] | None = None
    gpuMemoryUtilization: Fraction | None = None
    tensorParallelSize: Annotated[int, Field(ge=1, description=(
        "GPUs the replica's model is sharded over (--tensor-parallel-size); equals requestGPU, "
        "which implies it when unset"))] | None = None
    enablePrefixCaching: bool | None = None
    enableChunkedPrefill: bool | None = None
    runner: Literal["auto", "generate", "pooling"] | None = None
    convert: Literal["auto", "none", "embed", "classify"] | None = None
    extraArgs: list[Str] = []


class SecretKeyRef(_Strict):
    """An existing Kubernetes Secret's name and key (production-stack's ``hf_token`` / ``vllmApiKey`` form)."""

    secretName: Annotated[str, Field(min_length=1)]
    secretKey: Annotated[str, Field(min_length=1)]


class ModelSpec(_Strict):
    name: Name
    modelURL: Annotated[str, Field(min_length=1)]
    enabled: bool = True
    replicaCount: Annotated[int, Field(ge=0)] = 1
    requestGPU: GPUCount | None = None
    limitGPU: GPUCount | None = None
    requestGPUType: str | None = None
    requestGPUMem: MiB | None = None
    limitGPUMem: MiB | None = None
    requestGPUMemPercentage: Percent | None = None
    limitGPUMemPercentage: Percent | None = None
    requestGPUCores: Cores | None = None
    limitGPUCores: Cores | None = None
    podAnnotations: dict[str, Str] = {}
    vllmConfig: VLLMConfig | None = None
    env: list[EnvVar] = []
    chatTemplate: str | None = None
    enableLoRA: bool | None = Field(None, description="must be false: LoRA is not supported")
    enableTool: bool | None = None
    toolCallParser: str | None = None
    hf_token: str | SecretKeyRef | None = Field(
        None, description="Hub token for gated / private modelURLs: a string (passed as HF_TOKEN), or "
                          "{secretName, secretKey} of an existing Secret (the chart only)")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.enableLoRA:
            raise ValueError("@enableLoRA: LoRA adapters are not supported by slicelm serve")
        for key in ("GPU", "GPUMem", "GPUMemPercentage", "GPUCores"):
            req, lim = getattr(self, f"request{key}"), getattr(self, f"limit{key}")
            if req is not None and lim is not None and req != lim:
                raise ValueError(f"@limit{key}: {lim} must equal request{key} ({req}): GPU resources are "
                                 "extended resources and cannot be overcommitted")
        if self.requestGPUType not in (None, "", "nvidia.com/gpu"):
            raise ValueError(f"@requestGPUType: {self.requestGPUType!r}: only nvidia.com/gpu (HAMi shares) is "
                             "schedulable here; pick a GPU model with podAnnotations nvidia.com/use-gputype")
        for key, value in self.podAnnotations.items():
            _check_annotation(key, value)
        self._check_tensor_parallel()
        return self

    def _check_tensor_parallel(self) -> None:
        """One replica shards its model over all its GPUs: tensorParallelSize and requestGPU agree."""
        tp, gpus = self.vllmConfig.tensorParallelSize if self.vllmConfig else None, self.gpu("GPU")
        if tp is None or (tp == 1 and not gpus):
            return
        if gpus is None:
            raise ValueError(f"@vllmConfig.tensorParallelSize: {tp} needs requestGPU: {tp} (a replica shards its "
                             "model over the GPUs it requests)")
        if tp != gpus:
            raise ValueError(f"@vllmConfig.tensorParallelSize: {tp} must equal requestGPU ({gpus}): a replica shards "
                             "its model over all its GPUs; use replicaCount for more copies")

    def tensor_parallel_size(self) -> int:
        """``--tensor-parallel-size`` of a replica: its GPU count (``requestGPU``), or ``tensorParallelSize``."""
        tp = self.vllmConfig.tensorParallelSize if self.vllmConfig else None
        return tp or max(1, self.gpu("GPU") or 1)

    # What placement needs, with the limit twin standing in for a missing request.
    def gpu(self, key: str) -> int | None:
        req = getattr(self, f"request{key}")
        return req if req is not None else getattr(self, f"limit{key}")

    def annotation(self, key: str) -> str | None:
        return self.podAnnotations.get(key)


def _check_annotation(key: str, value: str) -> None:
    try:
        if key == "hami.io/gpu-scheduler-policy" and value not in ("binpack", "spread", "topology-aware"):
            raise ValueError(f"must be binpack, spread or topology-aware, got {value!r}")
        if key == "nvidia.com/numa-bind":
            bool_annotation(key, value)
        if key == "hami.io/device-scoring-weights":
            scoring_weights(value)
        if key.endswith("-gputype") or key.endswith("-gpuuuid"):
            split_list(value)
    except ValueError as e:
        raise ValueError(f"@podAnnotations[{key}]: {e}") from None


class ServingEngineSpec(_Strict):
    enableEngine: bool = True
    modelSpec: Annotated[list[ModelSpec], Field(min_length=1)]
    env: list[EnvVar] = []
    vllmApiKey: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> ServingEngineSpec:
        seen: set[str] = set()
        for i, m in enumerate(self.modelSpec):
            if m.name in seen:
                raise ValueError(f"@modelSpec[{i}].name: {m.name!r} appears twice "
                                 "(modelSpec names must be unique)")
            seen.add(m.name)
        return self


class RouterSpec(_Strict):
    enableRouter: bool = True
    routingLogic: Literal["roundrobin", "session", "prefixaware"] = "roundrobin"
    containerPort: Annotated[int, Field(ge=1, le=65535, description="the router's port on this machine")] = 8000
    sessionKey: str | None = None
    prefixMinMatchLength: Annotated[int, Field(ge=0)] | None = None
    engineScrapeInterval: Annotated[int, Field(ge=1)] | None = None
    requestStatsWindow: Annotated[int, Field(ge=1)] | None = None
    serviceDiscovery: Literal["k8s", "static"] | None = Field(
        None, description="ignored by slicelm up: it discovers its own replicas")
    extraArgs: list[Str] = []

    @model_validator(mode="after")
    def _session_needs_key(self) -> RouterSpec:
        if self.routingLogic == "session" and not self.sessionKey:
            raise ValueError("@sessionKey: routingLogic 'session' needs sessionKey (the header naming the session)")
        return self


class ElasticSpec(_Strict):
    """Elastic KV within each slice's guarantee (``slicelm up`` only: a memory broker per machine)."""

    enabled: bool = True
    maxBorrowPercentage: Annotated[float, Field(ge=0, le=100)] | None = Field(
        None, description="how much of its GPU's memory a replica may borrow beyond its slice, in percent "
        "(default: all that is free; 0: static slices, HAMi's model)")
    reclaimTimeout: Annotated[float, Field(gt=0)] = Field(
        2.0, description="seconds a borrower has to give memory back to its owner before it is restarted")
    freeWatermark: Annotated[float, Field(ge=0, le=1)] = Field(
        0.1, description="free KV kept mapped, as a fraction of the guarantee, before chunks are given back")


class IdleSleepSpec(_Strict):
    """vLLM's sleep mode for idle replicas: the router puts them to sleep and wakes them on a request."""

    after: Annotated[float, Field(gt=0, description="seconds without requests before a replica sleeps")]
    level: Literal[1, 2] = Field(1, description="1: weights to host memory; 2: weights discarded (reloaded)")


class SlicelmSpec(_Strict):
    """What only slicelm has."""

    runDir: str | None = Field(None, description="run directory (default: $XDG_STATE_HOME/slicelm/<stack>)")
    host: str = "127.0.0.1"
    mps: bool = Field(True, description="run slicelm's own MPS daemon per GPU (falls back to time slicing)")
    device: Literal["auto", "cpu"] = Field("auto", description="cpu: run every replica on the CPU")
    startupTimeout: Annotated[float, Field(gt=0)] = Field(600.0, description="seconds a replica may take to load")
    restartLimit: Annotated[int, Field(ge=0)] = Field(10, description="restarts before a replica is given up")
    elastic: ElasticSpec | None = Field(None, description="elastic KV and the per-GPU memory broker (slicelm up)")
    idleSleep: IdleSleepSpec | None = Field(None, description="sleep idle replicas, wake them on a request "
                                            "(slicelm up; needs the router)")


class StackSpec(_Strict):
    servingEngineSpec: ServingEngineSpec
    routerSpec: RouterSpec = RouterSpec()
    slicelm: SlicelmSpec = SlicelmSpec()

    @model_validator(mode="after")
    def _sleep_needs_router(self) -> StackSpec:
        if self.slicelm.idleSleep is not None and not self.routerSpec.enableRouter:
            raise ValueError("@slicelm.idleSleep: idle replicas are woken by the router: it needs "
                             "routerSpec.enableRouter")
        return self
    # Not part of the file: keys production-stack knows that slicelm ignores, and the file's path.
    warnings: Annotated[list[str], Field(exclude=True)] = []
    source: Annotated[str | None, Field(exclude=True)] = None

    def models(self) -> list[ModelSpec]:
        """The models ``slicelm up`` starts (``enabled`` and the engine enabled)."""
        if not self.servingEngineSpec.enableEngine:
            return []
        return [m for m in self.servingEngineSpec.modelSpec if m.enabled]


# ------------------------------------------------------------------------------------------------ loading
def _strip(node: dict, table: dict[str, str], path: str, warnings: list[str]) -> dict:
    for key in [k for k in node if k in table]:
        warnings.append(f"{path}.{key}: ignored ({table[key]})".lstrip("."))
        del node[key]
    return node


def _strip_known(raw: dict) -> tuple[dict, list[str]]:
    """Removes production-stack keys that slicelm ignores; returns the rest and one warning per key."""
    data, warnings = copy.deepcopy(raw), []
    _strip(data, known_keys.TOP_LEVEL, "", warnings)
    se = data.get("servingEngineSpec")
    if isinstance(se, dict):
        _strip(se, known_keys.SERVING_ENGINE, "servingEngineSpec", warnings)
        for i, m in enumerate(se.get("modelSpec") or []):
            if not isinstance(m, dict):
                continue
            path = f"servingEngineSpec.modelSpec[{i}]"
            _strip(m, known_keys.MODEL_SPEC, path, warnings)
            for key in ("requestGPUCores", "limitGPUCores"):
                if str(m.get(key, "")).isdigit() and int(m[key]) > 100:
                    warnings.append(f"{path}.{key}: {m[key]} clamped to 100 (exclusive), as HAMi does")
            if isinstance(m.get("vllmConfig"), dict):
                _strip(m["vllmConfig"], known_keys.VLLM_CONFIG, f"{path}.vllmConfig", warnings)
    if isinstance(data.get("routerSpec"), dict):
        _strip(data["routerSpec"], known_keys.ROUTER_SPEC, "routerSpec", warnings)
    return data, warnings


def _semantic_warnings(spec: StackSpec) -> list[str]:
    out = []
    for i, m in enumerate(spec.servingEngineSpec.modelSpec):
        path = f"servingEngineSpec.modelSpec[{i}]"
        for key in m.podAnnotations:
            if key not in known_keys.POD_ANNOTATIONS:
                out.append(f"{path}.podAnnotations[{key}]: ignored (not a HAMi placement annotation)")
        vc = m.vllmConfig
        if vc is not None and vc.enableChunkedPrefill is False:
            out.append(f"{path}.vllmConfig.enableChunkedPrefill: ignored (slicelm always chunks long prefills)")
        if not m.enabled:
            out.append(f"{path}: enabled is false, not started")
        if isinstance(m.hf_token, SecretKeyRef):
            out.append(f"{path}.hf_token: ignored by slicelm up (a Kubernetes secret reference; give HF_TOKEN in env "
                       "or the token as a string)")
    if spec.routerSpec.serviceDiscovery is not None:
        out.append("routerSpec.serviceDiscovery: ignored (slicelm up discovers its own replicas)")
    if isinstance(spec.servingEngineSpec.vllmApiKey, dict):
        out.append("servingEngineSpec.vllmApiKey: ignored (a Kubernetes secret reference; give the key as a string)")
    return out


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def _message(err: dict, data: dict) -> str:
    msg, loc = err["msg"].removeprefix("Value error, "), _loc(err["loc"])
    if msg.startswith("@"):  # a model-level check naming its field: "@field: message"
        field_, _, msg = msg[1:].partition(": ")
        loc = f"{loc}.{field_}" if loc else field_
    if err["type"] == "extra_forbidden":
        key = err["loc"][-1]
        known = _known_at(err["loc"][:-1])
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        msg = f"unknown key (neither slicelm nor production-stack knows it){hint}"
    elif err["type"] == "missing":
        msg = "required"
    return f"{loc}: {msg}"


def _known_at(loc: tuple) -> list[str]:
    levels = {
        (): (StackSpec, known_keys.TOP_LEVEL),
        ("servingEngineSpec",): (ServingEngineSpec, known_keys.SERVING_ENGINE),
        ("servingEngineSpec", "modelSpec", 0): (ModelSpec, known_keys.MODEL_SPEC),
        ("servingEngineSpec", "modelSpec", 0, "vllmConfig"): (VLLMConfig, known_keys.VLLM_CONFIG),
        ("routerSpec",): (RouterSpec, known_keys.ROUTER_SPEC),
        ("slicelm",): (SlicelmSpec, {}),
        ("slicelm", "elastic"): (ElasticSpec, {}),
        ("slicelm", "idleSleep"): (IdleSleepSpec, {}),
    }
    key = tuple(0 if isinstance(p, int) else p for p in loc)
    model, table = levels.get(key, (None, {}))
    return [*(model.model_fields if model else []), *table]


def parse_stack(raw: Any, source: str | None = None) -> StackSpec:
    """Validates already-parsed YAML (a dict)."""
    if not isinstance(raw, dict):
        raise StackSpecError([f"{source or 'stack'}: the file must be a YAML mapping with servingEngineSpec"])
    data, warnings = _strip_known(raw)
    try:
        spec = StackSpec.model_validate(data)
    except ValidationError as e:
        raise StackSpecError([_message(err, data) for err in e.errors()]) from None
    problems = [p for i, m in enumerate(spec.servingEngineSpec.modelSpec) if m.vllmConfig
                for p in check_extra_args(m.vllmConfig.extraArgs, f"servingEngineSpec.modelSpec[{i}]")]
    if problems:
        raise StackSpecError(problems)
    warnings += _semantic_warnings(spec)
    return spec.model_copy(update={"warnings": warnings, "source": source})


def load_stack(path: str | Path) -> StackSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise StackSpecError([f"{path}: cannot read the stack file ({e.strerror})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise StackSpecError([f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)})"]) from None
    return parse_stack(raw, str(path.resolve()))


# ------------------------------------------------------------------------------------------------- schema
def export_schema() -> dict:
    """JSON schema of the stack file (the Helm chart's values.schema.json): our fields plus the
    production-stack keys slicelm accepts and ignores (described as such)."""
    schema = StackSpec.model_json_schema(mode="validation")
    schema["title"] = "slicelm stack (production-stack Helm values)"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    for internal in ("warnings", "source"):  # set by load_stack, never by the file
        schema["properties"].pop(internal, None)
    defs = schema["$defs"]
    levels = {"StackSpec": (schema, known_keys.TOP_LEVEL), "ServingEngineSpec": (defs["ServingEngineSpec"],
              known_keys.SERVING_ENGINE), "ModelSpec": (defs["ModelSpec"], known_keys.MODEL_SPEC),
              "VLLMConfig": (defs["VLLMConfig"], known_keys.VLLM_CONFIG),
              "RouterSpec": (defs["RouterSpec"], known_keys.ROUTER_SPEC)}
    for node, table in levels.values():
        for key, reason in sorted(table.items()):
            node["properties"][key] = {"description": f"production-stack key; ignored by slicelm up: {reason}"}
    return schema
