"""Keys production-stack's Helm chart knows that ``slicelm up`` does not use on one machine.

They are accepted (so one file drives both the chart and ``slicelm up``) and reported as ignored,
each with the reason. Taken from production-stack's helm/values.yaml, values.schema.json and
templates (vllm-project/production-stack a6c01db). Keys nobody knows are errors.
"""

from __future__ import annotations

_K8S = "Kubernetes object settings; no cluster here"
_IMAGE = "container image; slicelm runs its own server"
_STORAGE = "volume settings; on one machine models come from a path or the Hub cache (HF_HOME, --download-dir)"

TOP_LEVEL: dict[str, str] = {
    "cacheserverSpec": "LMCache server is not part of slicelm",
    "engineStrategy": _K8S,
    "routerStrategy": _K8S,
    "extraObjects": _K8S,
    "image": "the Helm chart's container image (repository, tag, pullPolicy); slicelm up runs local processes",
    "grafanaDashboards": _K8S,
    "kube-prometheus-stack": _K8S,
    "prometheus-adapter": _K8S,
    "loraAdapters": "LoRA adapters are not supported",
    "loraController": "LoRA adapters are not supported",
    "sharedPvcStorage": _STORAGE,
}

SERVING_ENGINE: dict[str, str] = {
    "configs": _K8S,
    "containerPort": "ports are assigned per replica by slicelm up",
    "servicePort": "ports are assigned per replica by slicelm up",
    "containerSecurityContext": _K8S,
    "securityContext": _K8S,
    "extraPorts": _K8S,
    "imagePullPolicy": _IMAGE,
    "labels": _K8S,
    "livenessProbe": "slicelm up probes /health itself",
    "readinessProbe": "slicelm up probes /health itself",
    "startupProbe": "slicelm up probes /health itself (slicelm.startupTimeout)",
    "runtimeClassName": _K8S,
    "schedulerName": _K8S,
    "serviceMonitor": _K8S,
    "sidecar": _K8S,
    "strategy": _K8S,
    "tolerations": _K8S,
}

MODEL_SPEC: dict[str, str] = {
    "repository": _IMAGE,
    "tag": _IMAGE,
    "imagePullSecret": _IMAGE,
    "requestCPU": "CPU and host memory are not reserved on one machine",
    "requestMemory": "CPU and host memory are not reserved on one machine",
    "limitCPU": "CPU and host memory are not reserved on one machine",
    "limitMemory": "CPU and host memory are not reserved on one machine",
    "resources": "use requestGPU / requestGPUMem / requestGPUCores",
    "annotations": _K8S,
    "labels": _K8S,
    "podLabels": _K8S,
    "affinity": _K8S,
    "nodeName": _K8S,
    "nodeSelectorTerms": _K8S,
    "tolerations": _K8S,
    "tolerationsPolicy": _K8S,
    "priorityClassName": _K8S,
    "runtimeClassName": _K8S,
    "serviceAccountName": _K8S,
    "serviceAnnotations": _K8S,
    "pdb": _K8S,
    "keda": "autoscaling is not supported; replicaCount is fixed",
    "raySpec": "multi-node serving is not supported",
    "initContainer": _K8S,
    "shmSize": _K8S,
    "extraVolumes": _STORAGE,
    "extraVolumeMounts": _STORAGE,
    "pvcStorage": _STORAGE,
    "pvcAccessMode": _STORAGE,
    "pvcAnnotations": _STORAGE,
    "pvcLabels": _STORAGE,
    "pvcMatchLabels": _STORAGE,
    "pvcExistingClaimName": _STORAGE,
    "storageClass": _STORAGE,
    "envFromSecret": "Kubernetes secrets are not available; use env with values",
    "modelRevision": "give the revision as vllmConfig.extraArgs --revision",
    "lmcacheConfig": "LMCache is not part of slicelm",
    "chatTemplateConfigMap": _K8S,
}

VLLM_CONFIG: dict[str, str] = {
    "maxLoras": "LoRA adapters are not supported",
    "v0": "slicelm has one engine (vLLM v1's design)",
    "v1": "slicelm has one engine (vLLM v1's design)",
    "prometheusMultiprocDir": "each replica serves its own /metrics",
    "pipelineParallelSize": "pipeline parallelism is not supported",
}

ROUTER_SPEC: dict[str, str] = {
    "repository": _IMAGE,
    "tag": _IMAGE,
    "imagePullPolicy": _IMAGE,
    "imagePullSecrets": _IMAGE,
    "replicaCount": "one router process on one machine",
    "autoscaling": "one router process on one machine",
    "pdb": _K8S,
    "affinity": _K8S,
    "nodeSelectorTerms": _K8S,
    "nodePort": _K8S,
    "servicePort": _K8S,
    "serviceType": _K8S,
    "serviceAnnotations": _K8S,
    "serviceAccountName": _K8S,
    "serviceMonitor": _K8S,
    "securityContext": _K8S,
    "containerSecurityContext": _K8S,
    "priorityClassName": _K8S,
    "strategy": _K8S,
    "labels": _K8S,
    "podAnnotations": _K8S,
    "resources": _K8S,
    "extraPorts": _K8S,
    "extraVolumes": _K8S,
    "extraVolumeMounts": _K8S,
    "ingress": _K8S,
    "route": _K8S,
    "livenessProbe": _K8S,
    "readinessProbe": _K8S,
    "startupProbe": _K8S,
    "env": _K8S,
    "hf_token": _K8S,
    "vllmApiKey": _K8S,
    "k8sServiceDiscoveryType": "slicelm up discovers its own replicas",
    "staticBackends": "slicelm up discovers its own replicas",
    "staticModels": "slicelm up discovers its own replicas",
    "lmcacheConfig": "LMCache is not part of slicelm",
    "lmcacheControllerPort": "LMCache is not part of slicelm",
    "lmcacheControllerReplyPort": "LMCache is not part of slicelm",
    "lmcacheControllerHeartbeatPort": "LMCache is not part of slicelm",
    "otel": "OpenTelemetry export is not supported",
    "rootPath": "the router serves at /",
}

# The pod annotations slicelm reads; any other annotation is reported as ignored.
POD_ANNOTATIONS = (
    "nvidia.com/use-gputype",
    "nvidia.com/nouse-gputype",
    "nvidia.com/use-gpuuuid",
    "nvidia.com/nouse-gpuuuid",
    "nvidia.com/numa-bind",
    "hami.io/gpu-scheduler-policy",
    "hami.io/device-scoring-weights",
)
