"""How many bytes a replica's weights take, quantized or not, without torch: from ``config.json`` and the
safetensors headers (8-byte length + JSON of dtype / shape / offsets per tensor), or estimated from the
config's shape when the directory has no weights (``--load-format dummy``). ``slicelm plan`` and ``ps`` show it
so a slice can be sized for a 4-bit model (a 7B AWQ model is ~4 GiB, not ~14)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 1 << 30
# checkpoint tensors that belong to quantized linears (AWQ / GPTQ / compressed-tensors / FP8)
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_zero_point",
                   "weight_shape", "weight_g_idx", "weight_scale_inv", "input_scale")


@dataclass(frozen=True)
class WeightSummary:
    total_bytes: int
    quantized_bytes: int  # packed / fp8 weights with their scales and zero points
    quantization: str | None  # e.g. "awq 4-bit g128"; None: unquantized
    estimated: bool  # from the config's shape (no weight files)

    def describe(self) -> str:
        what = self.quantization or "16-bit"
        return f"{self.total_bytes / GiB:.2f} GiB {what}{' (est.)' if self.estimated else ''}"

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.total_bytes, "quantized_bytes": self.quantized_bytes,
                "quantization": self.quantization, "estimated": self.estimated}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _quant_config(model_dir: Path, config: dict[str, Any], quantization: str | None) -> dict[str, Any] | None:
    raw = config.get("quantization_config")
    for name in ("quant_config.json", "quantize_config.json"):
        if not raw and (model_dir / name).is_file():
            raw = _read_json(model_dir / name)
    if not raw and quantization == "fp8":
        return {"quant_method": "fp8", "online": True}
    return raw or None


def _bits_and_group(raw: dict[str, Any]) -> tuple[int, int]:
    method = str(raw.get("quant_method") or ("awq" if "w_bit" in raw else "gptq")).lower()
    if method == "fp8":
        return 8, 0
    if method == "compressed-tensors":
        group = next(iter((raw.get("config_groups") or {}).values()), {})
        w = group.get("weights") or {}
        return int(w.get("num_bits", 8)), int(w.get("group_size") or 0)
    return int(raw.get("bits", raw.get("w_bit", 4))), int(raw.get("group_size", raw.get("q_group_size", 128)))


def _label(raw: dict[str, Any] | None) -> str | None:
    if raw is None:
        return None
    bits, group = _bits_and_group(raw)
    method = str(raw.get("quant_method") or ("awq" if "w_bit" in raw else "gptq")).lower()
    return f"{method} {bits}-bit" + (f" g{group}" if group > 0 else "")


def _header_bytes(file: Path) -> tuple[int, int]:
    """(all tensor bytes, bytes of quantized-linear tensors) of one safetensors file."""
    with file.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = quant = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        size = info["data_offsets"][1] - info["data_offsets"][0]
        total += size
        if name.rsplit(".", 1)[-1] in _QUANT_SUFFIXES or info.get("dtype") in ("F8_E4M3", "F8_E5M2"):
            quant += size
    return total, quant


def _estimate(config: dict[str, Any], raw: dict[str, Any] | None) -> tuple[int, int]:
    """(total, quantized) bytes of a Llama-family decoder of this shape."""
    h, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    inter, vocab = int(config["intermediate_size"]), int(config["vocab_size"])
    linear = layers * (h * (heads + 2 * kv_heads) * head_dim + heads * head_dim * h + 3 * h * inter)
    rest = vocab * h * (1 if config.get("tie_word_embeddings") else 2) * 2 + layers * 2 * h * 2 + h * 2
    if raw is None:
        return linear * 2 + rest, 0
    bits, group = _bits_and_group(raw)
    quant = linear * bits // 8
    if group > 0:  # a 16-bit scale and a packed zero point per group
        quant += linear // group * (2 + bits / 8)
    return int(quant) + rest, int(quant)


def weight_summary(model: str, quantization: str | None = None) -> WeightSummary | None:
    """The weights of a local HF model directory, or None where it is not one (a hub id, a bundled name,
    a .gguf file, unreadable files)."""
    path = Path(model).expanduser()
    config = _read_json(path / "config.json") if path.is_dir() else None
    if config is None:
        return None
    raw = _quant_config(path, config, quantization)
    files = sorted(path.glob("*.safetensors"))
    try:
        if files:
            sizes = [_header_bytes(f) for f in files]
            return WeightSummary(sum(t for t, _ in sizes), sum(q for _, q in sizes), _label(raw), False)
        total, quant = _estimate(config, raw)
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return WeightSummary(total, quant, _label(raw), True)


def flag_value(args: list[str], flag: str) -> str | None:
    """``--flag value`` or ``--flag=value`` in a command line (the last one wins), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value
