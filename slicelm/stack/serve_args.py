"""One modelSpec -> the ``slicelm serve`` command line of a replica, as production-stack's chart renders
``vllm serve <modelURL> …`` from ``vllmConfig`` (helm/templates/deployment-vllm-multi.yaml).

Every ``vllmConfig`` key reaches a flag here or is refused / reported ignored in ``spec.py``:
dtype → ``--dtype``, maxModelLen → ``--max-model-len``, maxNumSeqs → ``--max-num-seqs``,
enablePrefixCaching → ``--[no-]enable-prefix-caching`` (off when vllmConfig is given without it, as
the chart does), runner → ``--runner``, convert embed/classify → ``--task embed/score``,
gpuMemoryUtilization → ``--gpu-memory-utilization`` on a whole card, or scales the slice's absolute
budget (``--gpu-memory-budget``) as it scales HAMi's visible memory, tensorParallelSize (or a
``requestGPU`` above 1) → ``--tensor-parallel-size``, extraArgs are appended (checked against serve's
flags); the modelSpec's enableTool / toolCallParser become ``--enable-auto-tool-choice`` /
``--tool-call-parser``. The served model name is ``modelURL`` (what ``vllm serve <modelURL>`` serves) unless
extraArgs give ``--served-model-name``.
"""

from __future__ import annotations

import sys

from slicelm.stack.spec import ModelSpec


def served_model_names(model: ModelSpec) -> list[str]:
    extra = model.vllmConfig.extraArgs if model.vllmConfig else []
    for i, arg in enumerate(extra):
        if arg == "--served-model-name":
            names = []
            for a in extra[i + 1:]:
                if a.startswith("--"):
                    break
                names.append(a)
            return names
        if arg.startswith("--served-model-name="):
            return [arg.split("=", 1)[1]]
    return [model.modelURL]


def _vllm_config_flags(model: ModelSpec, budget_mib: int | None) -> list[str]:
    vc = model.vllmConfig
    if vc is None:
        return [] if budget_mib is None else ["--gpu-memory-budget", f"{budget_mib}MiB"]
    flags: list[str] = []
    flags += ["--enable-prefix-caching"] if vc.enablePrefixCaching else ["--no-enable-prefix-caching"]
    if vc.maxModelLen is not None:
        flags += ["--max-model-len", str(vc.maxModelLen)]
    if vc.dtype is not None:
        flags += ["--dtype", vc.dtype]
    if vc.maxNumSeqs is not None:
        flags += ["--max-num-seqs", str(vc.maxNumSeqs)]
    if budget_mib is not None:  # the slice is the budget; the utilization scales it as it scales HAMi's view
        util = vc.gpuMemoryUtilization if vc.gpuMemoryUtilization is not None else 1.0
        flags += ["--gpu-memory-budget", f"{int(budget_mib * util)}MiB"]
    elif vc.gpuMemoryUtilization is not None:
        flags += ["--gpu-memory-utilization", str(vc.gpuMemoryUtilization)]
    if vc.runner is not None:
        flags += ["--runner", vc.runner]
    if vc.convert in ("embed", "classify"):
        flags += ["--task", "embed" if vc.convert == "embed" else "score"]
    return flags


def serve_command(model: ModelSpec, host: str, port: int, device: str, budget_mib: int | None) -> list[str]:
    """argv of one replica. ``device`` is ``cpu`` or ``cuda``; ``budget_mib`` the memory slice (None: whole
    card or CPU)."""
    cmd = [sys.executable, "-m", "slicelm.entrypoints.cli", "serve", model.modelURL,
           "--host", host, "--port", str(port), "--device", device]
    extra = model.vllmConfig.extraArgs if model.vllmConfig else []
    if not any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in extra):
        cmd += ["--served-model-name", model.modelURL]
    if model.tensor_parallel_size() > 1:
        cmd += ["--tensor-parallel-size", str(model.tensor_parallel_size())]
    cmd += _vllm_config_flags(model, budget_mib if device != "cpu" else None)
    if model.chatTemplate:
        cmd += ["--chat-template", model.chatTemplate]
    if model.enableTool:  # production-stack's chart: enableTool / toolCallParser -> vLLM's tool flags
        cmd += ["--enable-auto-tool-choice"]
    if model.toolCallParser:
        cmd += ["--tool-call-parser", model.toolCallParser]
    return cmd + list(extra)


def model_env(spec_env: list, model: ModelSpec, api_key: str | None) -> dict[str, str]:
    """``hf_token`` (a string) as HF_TOKEN, then ``servingEngineSpec.env`` and the modelSpec's ``env`` (k8s EnvVar
    lists, later ones win, as in a pod), and the API key."""
    env = {"HF_TOKEN": model.hf_token} if isinstance(model.hf_token, str) and model.hf_token else {}
    env.update({e.name: e.value for e in [*spec_env, *model.env]})
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env
