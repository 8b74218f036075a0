"""Quantized linear layers: checkpoint formats (AWQ, GPTQ, compressed-tensors, FP8) behind one linear-method
interface (``base.LinearMethod``), chosen per layer from the model's ``QuantConfig``."""

from __future__ import annotations

from slicelm.layers.quantization.base import LinearMethod
from slicelm.layers.quantization.config import (
    KV_CACHE_DTYPES,
    VLLM_QUANTIZATION_NAMES,
    Fp8Scheme,
    IntWeightScheme,
    QuantConfig,
    QuantizationError,
)
from slicelm.layers.quantization.parsers import parse_quant_config

__all__ = ["KV_CACHE_DTYPES", "VLLM_QUANTIZATION_NAMES", "LinearMethod", "QuantConfig", "QuantizationError",
           "get_linear_method", "parse_quant_config"]


def get_linear_method(quant_config: QuantConfig | None, prefix: str) -> LinearMethod:
    """The method for the linear at ``prefix``: unquantized without a config or where the config skips it."""
    from slicelm.layers.quantization.unquantized import UnquantizedLinearMethod

    if quant_config is None or quant_config.skips(prefix):
        return UnquantizedLinearMethod()
    scheme = quant_config.scheme
    if isinstance(scheme, Fp8Scheme):
        from slicelm.layers.quantization.fp8 import Fp8LinearMethod

        names = "ct" if quant_config.method == "compressed-tensors" else "fp8"
        return Fp8LinearMethod(scheme, names)
    assert isinstance(scheme, IntWeightScheme)
    if quant_config.method == "awq":
        from slicelm.layers.quantization.awq import AWQLinearMethod

        return AWQLinearMethod(scheme)
    if quant_config.method == "gptq":
        from slicelm.layers.quantization.gptq import GPTQLinearMethod

        return GPTQLinearMethod(scheme, v2_zeros=quant_config.gptq_v2_zeros)
    from slicelm.layers.quantization.compressed_tensors import CompressedTensorsIntMethod

    return CompressedTensorsIntMethod(scheme)
