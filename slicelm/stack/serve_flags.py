"""The ``slicelm serve`` flags a stack file may pass in ``vllmConfig.extraArgs``, and the check of that list.

Plain data for ``spec.py``'s validation, apart from ``serve_args.py`` (which builds command lines from the validated
``ModelSpec``), so that neither of those two modules imports the other's importer.
"""

from __future__ import annotations

# `slicelm serve`'s flags (tests/stack/test_serve_args.py keeps this equal to the real parser's).
SERVE_FLAGS = frozenset({
    "--api-key", "--api-server-count", "--async-scheduling", "--attention-backend", "--attention-decode-splits",
    "--attention-flash-prefill", "--block-size", "--chat-template", "--device", "--disable-access-log",
    "--disable-log-stats", "--disable-uvicorn-access-log", "--dtype", "--elastic-kv", "--elastic-kv-max-bytes",
    "--elastic-kv-watermark", "--enable-chunked-prefill",
    "--enable-force-include-usage", "--enable-per-request-metrics", "--enable-prefix-caching",
    "--enable-prompt-tokens-details", "--enable-request-id-headers", "--enable-server-load-tracking",
    "--enable-sleep-mode", "--enable-tokenizer-info-endpoint", "--enforce-eager",
    "--engine-process", "--enable-auto-tool-choice", "--exclude-tools-when-tool-choice-none",
    "--structured-outputs-config", "--tool-call-parser", "--tool-parser-plugin",
    "--gpu-memory-budget", "--gpu-memory-utilization", "--green-context-sms", "--help", "--host",
    "--kv-cache-dtype",
    "--kv-cache-memory-bytes", "--load-format", "--revision", "--tokenizer-revision", "--code-revision",
    "--download-dir", "--hf-token", "--ignore-patterns", "--max-logprobs", "--max-model-len",
    "--max-num-batched-tokens", "--max-num-seqs",
    "--max-request-body-bytes", "--max-waiting-requests", "--model", "--no-async-scheduling",
    "--no-attention-flash-prefill", "--no-enable-chunked-prefill", "--no-enable-prefix-caching",
    "--no-engine-process", "--no-normalize", "--normalize", "--num-gpu-blocks-override", "--pooler-config",
    "--pooling-type", "--port", "--quantization", "--return-tokens-as-token-ids", "--root-path", "--runner",
    "--scheduling-policy", "--seed", "--served-model-name", "--show-hidden-metrics-for-version",
    "--shutdown-timeout", "--skip-tokenizer-init", "--ssl-certfile", "--ssl-keyfile", "--task",
    "--tensor-parallel-size", "--timeout-keep-alive", "--tokenizer", "--trust-request-chat-template", "--uds",
    "--uvicorn-log-level",
})
# Set by `slicelm up` per replica; a stack file cannot override them (the tensor-parallel size comes from
# requestGPU / vllmConfig.tensorParallelSize).
MANAGED_FLAGS = frozenset({"--host", "--port", "--uds", "--model", "--device", "--help", "--tensor-parallel-size",
                           "-tp"})


def check_extra_args(args: list[str], path: str) -> list[str]:
    """Problems with ``vllmConfig.extraArgs`` (unknown or managed flags), each naming the item."""
    problems = []
    for i, arg in enumerate(args):
        if not arg.startswith("--") and arg.split("=", 1)[0] != "-tp":
            continue
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            problems.append(f"{path}.vllmConfig.extraArgs[{i}]: {flag} is set by slicelm up for each replica")
        elif flag not in SERVE_FLAGS:
            problems.append(f"{path}.vllmConfig.extraArgs[{i}]: {flag} is not a slicelm serve flag")
    return problems
