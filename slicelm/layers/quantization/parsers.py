"""One parser per checkpoint format: its ``quantization_config`` dict -> ``QuantConfig`` (or a
``QuantizationError`` naming the unsupported field); ``parse_quant_config`` picks the parser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slicelm.layers.quantization.config import (
    METHOD_ALIASES,
    VLLM_QUANTIZATION_NAMES,
    Fp8Scheme,
    IntWeightScheme,
    QuantConfig,
    QuantizationError,
)


def _ignored(raw: dict[str, Any], *keys: str) -> list[str]:
    out: list[str] = []
    for key in keys:
        out += [str(m) for m in (raw.get(key) or [])]
    return out


def parse_awq(raw: dict[str, Any]) -> QuantConfig:
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantizationError(f"AWQ version {raw.get('version')!r} is not supported (only the GEMM layout)")
    if not raw.get("zero_point", True):
        raise QuantizationError("AWQ zero_point=false is not supported")
    bits = int(raw.get("bits", raw.get("w_bit", 4)))
    if bits != 4:
        raise QuantizationError(f"AWQ bits={bits} is not supported (4)")
    group = int(raw.get("group_size", raw.get("q_group_size", 128)))
    scheme = IntWeightScheme(bits, group, symmetric=False)
    return QuantConfig("awq", scheme, _ignored(raw, "modules_to_not_convert"))


def parse_gptq(raw: dict[str, Any]) -> QuantConfig:
    if raw.get("lm_head"):
        raise QuantizationError("GPTQ lm_head=true (a quantized lm_head) is not supported")
    if raw.get("dynamic"):
        raise QuantizationError("GPTQ 'dynamic' per-module overrides are not supported")
    fmt = str(raw.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise QuantizationError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    scheme = IntWeightScheme(int(raw.get("bits", 4)), int(raw.get("group_size", 128)),
                             symmetric=bool(raw.get("sym", True)), act_order=bool(raw.get("desc_act", False)))
    return QuantConfig("gptq", scheme, _ignored(raw, "modules_to_not_convert"), gptq_v2_zeros=fmt == "gptq_v2")


def _ct_group_scheme(name: str, group: dict[str, Any], fmt: str) -> IntWeightScheme | Fp8Scheme:
    w = group.get("weights") or {}
    acts = group.get("input_activations")
    wtype, bits, strategy = w.get("type", "int"), int(w.get("num_bits", 8)), w.get("strategy", "tensor")
    fmt = group.get("format") or fmt
    where = f"compressed-tensors config_groups.{name}"
    if wtype == "int":
        if acts:
            raise QuantizationError(f"{where}: integer activation quantization (W{bits}A8) is not supported")
        if fmt not in ("pack-quantized", "naive-quantized", "int-quantized"):
            raise QuantizationError(f"{where}: format {fmt!r} is not supported for int weights (pack-quantized)")
        if strategy not in ("group", "channel"):
            raise QuantizationError(f"{where}: weight strategy {strategy!r} is not supported (group, channel)")
        group_size = int(w.get("group_size") or -1) if strategy == "group" else -1
        act_order = w.get("actorder") in ("group", True, "dynamic")
        return IntWeightScheme(bits, group_size, symmetric=bool(w.get("symmetric", True)), act_order=act_order)
    if wtype == "float" and bits == 8:
        if fmt not in ("float-quantized", "naive-quantized"):
            raise QuantizationError(f"{where}: format {fmt!r} is not supported for fp8 weights (float-quantized)")
        if strategy not in ("tensor", "channel", "block"):
            raise QuantizationError(f"{where}: fp8 weight strategy {strategy!r} is not supported")
        block = tuple(w["block_structure"]) if strategy == "block" else None
        activation = "none"
        if acts:
            if acts.get("type", "float") != "float" or int(acts.get("num_bits", 8)) != 8:
                raise QuantizationError(f"{where}: input_activations other than fp8 are not supported")
            activation = "dynamic" if acts.get("dynamic", False) else "static"
        return Fp8Scheme(strategy, block, activation)  # type: ignore[arg-type]
    raise QuantizationError(f"{where}: {wtype} {bits}-bit weights are not supported")


def parse_compressed_tensors(raw: dict[str, Any]) -> QuantConfig:
    groups = raw.get("config_groups") or {}
    if not groups:
        raise QuantizationError("compressed-tensors quantization_config has no config_groups")
    fmt = raw.get("format") or "pack-quantized"
    schemes = {}
    for name, group in groups.items():
        targets = [str(t) for t in group.get("targets", [])]
        if not any(t == "Linear" or t.startswith("re:") for t in targets):
            raise QuantizationError(f"compressed-tensors config_groups.{name}: targets {targets} are not supported "
                                    "(Linear)")
        schemes[name] = _ct_group_scheme(name, group, fmt)
    if len(set(schemes.values())) > 1:
        raise QuantizationError(f"compressed-tensors: several different schemes ({', '.join(schemes)}) are not "
                                "supported in one model")
    scheme = next(iter(schemes.values()))
    kind = "int" if isinstance(scheme, IntWeightScheme) else "float"
    return QuantConfig("compressed-tensors", scheme, _ignored(raw, "ignore"), scheme_name=kind)


def parse_fp8(raw: dict[str, Any]) -> QuantConfig:
    fmt = str(raw.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise QuantizationError(f"fp8 fmt {fmt!r} is not supported (e4m3)")
    activation = str(raw.get("activation_scheme", "dynamic")).lower()
    if activation not in ("dynamic", "static"):
        raise QuantizationError(f"fp8 activation_scheme {activation!r} is not supported (dynamic, static)")
    block = raw.get("weight_block_size")
    if block is not None:
        if len(block) != 2:
            raise QuantizationError(f"fp8 weight_block_size {block} must be [block_n, block_k]")
        scheme = Fp8Scheme("block", (int(block[0]), int(block[1])), activation)
    else:
        scheme = Fp8Scheme("tensor", None, activation)
    return QuantConfig("fp8", scheme, _ignored(raw, "modules_to_not_convert", "ignored_layers"))


PARSERS: dict[str, Callable[[dict[str, Any]], QuantConfig]] = {
    "awq": parse_awq, "gptq": parse_gptq, "compressed-tensors": parse_compressed_tensors, "fp8": parse_fp8,
}


def _infer_method(raw: dict[str, Any]) -> str:
    """AutoAWQ's quant_config.json and AutoGPTQ's quantize_config.json may not name their method."""
    if "w_bit" in raw or "zero_point" in raw or "q_group_size" in raw:
        return "awq"
    if "desc_act" in raw or "damp_percent" in raw:
        return "gptq"
    return ""


def parse_quant_config(hf_config: dict[str, Any], quantization: str | None = None) -> QuantConfig | None:
    """The checkpoint's ``QuantConfig`` (or the online one ``quantization`` asks for), None when unquantized."""
    if quantization is not None and quantization not in METHOD_ALIASES:
        raise QuantizationError(f"--quantization {quantization!r} is not supported; supported: "
                                f"{', '.join(VLLM_QUANTIZATION_NAMES)}")
    wanted = METHOD_ALIASES.get(quantization) if quantization else None
    raw = hf_config.get("quantization_config")
    if not raw:
        if wanted is None:
            return None
        if wanted != "fp8":
            raise QuantizationError(f"--quantization {quantization}: the checkpoint is not quantized (no "
                                    "quantization_config); only fp8 quantizes a 16-bit checkpoint at load")
        return QuantConfig("fp8", Fp8Scheme("channel", online=True))
    if not isinstance(raw, dict):
        raise QuantizationError("quantization_config must be a JSON object")
    method = str(raw.get("quant_method") or wanted or _infer_method(raw)).lower().replace("_", "-")
    method = METHOD_ALIASES.get(method, METHOD_ALIASES.get(method.replace("-", "_"), method))
    if method not in ("awq", "gptq", "compressed-tensors", "fp8"):
        raise QuantizationError(f"quantization_config.quant_method {raw.get('quant_method')!r} is not supported; "
                                f"supported: awq, gptq, compressed-tensors, fp8")
    if wanted is not None and wanted != method:
        raise QuantizationError(f"--quantization {quantization} does not match the checkpoint's quant_method "
                                f"{raw.get('quant_method')!r}")
    return PARSERS[method](raw)
