"""Which quantization a checkpoint uses: parsed once from its config into a ``QuantConfig``.

The method comes from ``config.json``'s ``quantization_config`` (the loader merges a separate
``quant_config.json`` / ``quantize_config.json`` into it) and from ``--quantization`` (vLLM's names). A
mismatch between the two, an unknown method, an unsupported bit width or scheme is a ``QuantizationError``
naming it, raised before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class QuantizationError(ValueError):
    """The checkpoint's quantization (or ``--quantization``) cannot be served; the message names why."""


# vLLM's --quantization names -> our method; the *_marlin names pick a kernel in vLLM, not a format.
METHOD_ALIASES = {
    "awq": "awq", "awq_marlin": "awq", "gptq": "gptq", "gptq_marlin": "gptq",
    "compressed-tensors": "compressed-tensors", "compressed_tensors": "compressed-tensors", "fp8": "fp8",
}
VLLM_QUANTIZATION_NAMES = ("awq", "awq_marlin", "gptq", "gptq_marlin", "compressed-tensors", "fp8")
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


@dataclass(frozen=True)
class IntWeightScheme:
    """Integer weight-only quantization (AWQ, GPTQ, compressed-tensors W4A16/W8A16)."""

    bits: int  # 4 or 8
    group_size: int  # -1: one group per output channel (the whole input dim)
    symmetric: bool  # zero point fixed at 2**(bits-1)
    act_order: bool = False  # GPTQ desc_act / compressed-tensors actorder: g_idx permutes the input dim

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizationError(f"{self.bits}-bit weights are not supported (4 or 8)")
        if self.group_size != -1 and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise QuantizationError(f"group_size {self.group_size} is not supported (-1 or a power of two >= 16)")


@dataclass(frozen=True)
class Fp8Scheme:
    """FP8 e4m3 weights: per-tensor / per-channel scales (W8A8 with dynamic or static activation scales),
    or 2-D block scales (``weight_block_size``, weight-only dequant here)."""

    weight_strategy: str  # "tensor" | "channel" | "block"
    block_size: tuple[int, int] | None = None
    activation: str = "dynamic"  # "dynamic" (per token) | "static" (checkpoint input_scale)
    online: bool = False  # --quantization fp8 on a 16-bit checkpoint: quantize at load


@dataclass
class QuantConfig:
    method: str  # "awq" | "gptq" | "compressed-tensors" | "fp8"
    scheme: IntWeightScheme | Fp8Scheme
    modules_to_not_convert: list[str] = field(default_factory=list)
    gptq_v2_zeros: bool = False  # checkpoint_format gptq_v2 stores the zero itself (v1 stores zero - 1)
    scheme_name: str = ""  # compressed-tensors: "int" / "float"; what `plan` and logs print

    def skips(self, prefix: str) -> bool:
        """Whether the linear at ``prefix`` (model-side name, e.g. ``model.layers.0.mlp.down_proj``) stays
        unquantized; fused layers are matched through the checkpoint names of their shards."""
        names = _checkpoint_names(prefix)
        return any(ignored and any(_matches(ignored, n) for n in names) for ignored in self.modules_to_not_convert)

    def describe(self) -> str:
        s = self.scheme
        if isinstance(s, IntWeightScheme):
            g = "channel" if s.group_size == -1 else f"g{s.group_size}"
            return f"{self.method} w{s.bits}a16 {g}{' act-order' if s.act_order else ''}"
        if s.weight_strategy == "block":
            return f"{self.method} fp8 block {list(s.block_size or ())} (weight-only)"
        return f"{self.method} fp8 w8a8 per-{s.weight_strategy}{' (online)' if s.online else ''}"


_FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _checkpoint_names(prefix: str) -> list[str]:
    parent, _, leaf = prefix.rpartition(".")
    shards = _FUSED_SHARDS.get(leaf)
    if shards is None:
        return [prefix]
    return [f"{parent}.{s}" if parent else s for s in shards]


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        import re

        return re.fullmatch(pattern[3:], name) is not None or re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or ("." + pattern + ".") in ("." + name + ".")
