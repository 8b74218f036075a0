"""What every benchmark shares: environment facts, the workloads, model shapes, result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Real shapes, random weights (load_format="dummy").
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
    "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960, "torch_dtype": "bfloat16", "attention_bias": False,
}
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
    "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
    "vocab_size": 32768, "tie_word_embeddings": False, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 32768, "sliding_window": None, "torch_dtype": "float16",
}
QWEN2_5_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
    "tie_word_embeddings": False, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "sliding_window": 131072, "use_sliding_window": False, "torch_dtype": "float16",
}
QWEN2_5_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
    "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}
LLAMA_3_2_3B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 3072, "num_hidden_layers": 28,
    "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192,
    "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 9728,
    "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960, "torch_dtype": "bfloat16", "attention_bias": False,
}
TINY_LLAMA = {  # CPU smoke runs of the benchmark scripts
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 10240,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
}
LLAMA_3_1_70B = {**LLAMA_3_1_8B, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                 "intermediate_size": 28672}
SHAPES = {"qwen3-0.6b": QWEN3_0_6B, "llama-3.1-8b": LLAMA_3_1_8B, "llama-3.1-70b": LLAMA_3_1_70B,
          "mistral-7b-v0.3": MISTRAL_7B_V03, "qwen2.5-7b": QWEN2_5_7B, "tiny-llama": TINY_LLAMA,
          "qwen2.5-1.5b": QWEN2_5_1_5B, "llama-3.2-3b": LLAMA_3_2_3B, "qwen3-4b": QWEN3_4B}
# quantization_config of what AutoAWQ writes for 4-bit g128 (the seed's solidrust / Qwen AWQ releases)
AWQ_G128 = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def write_config_dir(shape: str, root: str | Path, quantization_config: dict | None = None) -> str:
    """A model directory holding only config.json (weights come from load_format='dummy'); with
    ``quantization_config`` the random weights are created in that checkpoint format."""
    path = Path(root) / (shape if quantization_config is None else f"{shape}-{quantization_config['quant_method']}")
    path.mkdir(parents=True, exist_ok=True)
    config = {**SHAPES[shape], **({"quantization_config": quantization_config} if quantization_config else {})}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return str(path)


def workload_a(num_requests: int = 256) -> list[tuple[list[int], int]]:
    """nano-vllm's table workload: (prompt token ids, output length) pairs drawn with Random(0)."""
    rng = random.Random(0)
    reqs = []
    for _ in range(num_requests):
        prompt = [rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
        reqs.append((prompt, rng.randint(100, 1024)))
    return reqs


def git_commit() -> str:
    """SLICELM_COMMIT when set (a GPU machine's copy of the tree may carry a stale .git), else git's HEAD."""
    if os.environ.get("SLICELM_COMMIT"):
        return os.environ["SLICELM_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SLICELM_COMMIT", "unknown")


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        try:
            out = subprocess.check_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                          text=True)
            env["driver"] = out.strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = "unknown"
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores)"
    return env


def measure_copy_bandwidth(num_bytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read + written (benchmarks.md's convention)."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del src, dst
    torch.cuda.empty_cache()
    return 2 * num_bytes / times[len(times) // 2]


def device_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def save_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{device_slug(result.get('device', 'cpu'))}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    out_dir = os.environ.get("OUT")
    if out_dir:  # the GPU machine sends back only what lands under $OUT
        (Path(out_dir) / path.name).write_text(path.read_text())
    print(f"saved {path}")
    return path


def run_child(script: str, argv: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run ``script argv --child-out FILE`` in a fresh process and return the JSON it wrote there: one engine per
    process, so each engine measured in a run starts on an empty GPU whatever the previous one left behind."""
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, script, *argv, "--child-out", f.name], check=True, timeout=timeout)
        return json.loads(Path(f.name).read_text())
