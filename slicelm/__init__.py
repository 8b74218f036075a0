"""slicelm: serve many language models on shared GPUs behind an OpenAI-compatible API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "EngineArgs", "PoolingParams", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from slicelm.config import EngineArgs
    from slicelm.entrypoints.llm import LLM
    from slicelm.pooling_params import PoolingParams
    from slicelm.sampling_params import SamplingParams

_LAZY = {
    "LLM": "slicelm.entrypoints.llm",
    "EngineArgs": "slicelm.config",
    "SamplingParams": "slicelm.sampling_params",
    "PoolingParams": "slicelm.pooling_params",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slicelm' has no attribute {name!r}")
