"""modelSpec × replicaCount -> slicing's ``ReplicaRequest`` list (HAMi's resources and pod annotations)."""

from __future__ import annotations

from slicelm.slicing.placement import ReplicaRequest
from slicelm.stack.fields import bool_annotation, scoring_weights, split_list
from slicelm.stack.spec import ModelSpec, StackSpec


def gpu_count(model: ModelSpec) -> int:
    """Physical GPUs a replica asks for; a memory or cores request alone implies one (HAMi's default)."""
    n = model.gpu("GPU")
    if n:
        return n
    if any(model.gpu(k) is not None for k in ("GPUMem", "GPUMemPercentage", "GPUCores")):
        return 1
    return 0


def scheduler_policy(model: ModelSpec) -> str:
    """HAMi's ``hami.io/gpu-scheduler-policy`` pod annotation (its default: spread)."""
    return model.annotation("hami.io/gpu-scheduler-policy") or "spread"


def _list(model: ModelSpec, key: str) -> list[str]:
    value = model.annotation(key)
    return split_list(value) if value else []


def replica_request(model: ModelSpec, replica: int) -> ReplicaRequest:
    weights = model.annotation("hami.io/device-scoring-weights")
    numa = model.annotation("nvidia.com/numa-bind")
    return ReplicaRequest(
        model=model.name,
        replica=replica,
        num_gpus=gpu_count(model),
        memory_mib=model.gpu("GPUMem"),
        memory_percentage=model.gpu("GPUMemPercentage"),
        cores=model.gpu("GPUCores"),  # None: HAMi default (whole card -> 100)
        use_types=_list(model, "nvidia.com/use-gputype"),
        nouse_types=_list(model, "nvidia.com/nouse-gputype"),
        use_uuids=_list(model, "nvidia.com/use-gpuuuid"),
        nouse_uuids=_list(model, "nvidia.com/nouse-gpuuuid"),
        policy=scheduler_policy(model),
        numa_bind=bool_annotation("nvidia.com/numa-bind", numa) if numa else False,
        scoring_weights=scoring_weights(weights) if weights else (1.0, 1.0, 1.0),
    )


def replica_requests(spec: StackSpec) -> tuple[list[ReplicaRequest], list[tuple[str, int]]]:
    """GPU requests for models that ask for a GPU, and (model, replica) pairs of those that run on the CPU."""
    gpu, cpu = [], []
    for model in spec.models():
        for r in range(model.replicaCount):
            if gpu_count(model) and spec.slicelm.device != "cpu":
                gpu.append(replica_request(model, r))
            else:
                cpu.append((model.name, r))
    return gpu, cpu
