"""Weight bytes for ``slicelm plan`` / ``ps`` (no torch in slicelm.stack): from safetensors headers of a real
quantized checkpoint, or estimated from a config-only directory; a 7B AWQ model fits a 10,800 MiB slice."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from utils_quant import base_model, write_awq, write_fp8

from slicelm.stack.weights import GiB, flag_value, weight_summary

MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 14336, "vocab_size": 32768, "tie_word_embeddings": False}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def test_safetensors_headers_count_quantized_bytes(tmp_path: Path) -> None:
    write_awq(base_model(), tmp_path, group=64)
    summary = weight_summary(str(tmp_path))
    assert summary is not None and not summary.estimated and summary.quantization == "awq 4-bit g64"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}  # noqa: SIM118
    assert summary.total_bytes == sum(sizes.values())
    assert summary.quantized_bytes == sum(v for k, v in sizes.items() if k.rsplit(".", 1)[1] in
                                          ("qweight", "qzeros", "scales"))
    write_fp8(base_model(), tmp_path / "fp8")
    fp8 = weight_summary(str(tmp_path / "fp8"))
    assert fp8 is not None and fp8.quantization == "fp8 8-bit" and fp8.quantized_bytes > 0


def test_estimate_from_config_shape(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**MISTRAL_7B, "quantization_config": AWQ}))
    awq = weight_summary(str(tmp_path))
    assert awq is not None and awq.estimated and 3.7 * GiB < awq.total_bytes < 4.1 * GiB
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B))
    bf16 = weight_summary(str(tmp_path))
    assert bf16 is not None and 13.0 * GiB < bf16.total_bytes < 14.0 * GiB and bf16.quantization is None
    online = weight_summary(str(tmp_path), "fp8")
    assert online is not None and online.quantization == "fp8 8-bit" and online.total_bytes < 7.5 * GiB
    assert weight_summary("org/not-local") is None
    assert flag_value(["--quantization", "fp8"], "--quantization") == "fp8"
    assert flag_value(["--quantization=awq"], "--quantization") == "awq"


def test_plan_shows_weights(tmp_path: Path) -> None:
    from test_plan_cli import gpu, plan

    model = tmp_path / "mistral-awq"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**MISTRAL_7B, "quantization_config": AWQ}))
    stack = {"servingEngineSpec": {"modelSpec": [{"name": "mistral", "modelURL": str(model), "replicaCount": 1,
                                                  "requestGPU": 1, "requestGPUMem": 10800}]}}
    r = plan(tmp_path, stack, [gpu(0)])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["weights"]["mistral"]["quantization"] == "awq 4-bit g128"
    assert out["weights"]["mistral"]["bytes"] < 10800 * 2**20 / 2
    table = plan(tmp_path, stack, [gpu(0)], fmt="table").stdout
    assert "awq" in table and "GiB" in table
