"""Maps a Hugging Face ``architectures[0]`` name to the slicelm class that implements it."""

from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module, class). Classes are imported lazily so that importing the registry stays cheap.
_GENERATE_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("slicelm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("slicelm.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("slicelm.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("slicelm.models.llama", "LlamaForCausalLM"),
    "Phi3ForCausalLM": ("slicelm.models.llama", "LlamaForCausalLM"),
    "Qwen3MoeForCausalLM": ("slicelm.models.moe", "SparseMoeForCausalLM"),
    "MixtralForCausalLM": ("slicelm.models.moe", "SparseMoeForCausalLM"),
    "Gemma2ForCausalLM": ("slicelm.models.gemma", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("slicelm.models.gemma", "GemmaForCausalLM"),
    "Gemma3ForConditionalGeneration": ("slicelm.models.gemma", "GemmaForCausalLM"),
}
_POOLING_MODELS: dict[str, tuple[str, str]] = {
    "BertModel": ("slicelm.models.bert", "BertEmbeddingModel"),
    "XLMRobertaModel": ("slicelm.models.bert", "BertEmbeddingModel"),
    "BertForSequenceClassification": ("slicelm.models.bert", "BertForSequenceClassification"),
    "XLMRobertaForSequenceClassification": ("slicelm.models.bert", "BertForSequenceClassification"),
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture has no implementation in slicelm."""


def supported_architectures() -> list[str]:
    return sorted({*_GENERATE_MODELS, *_POOLING_MODELS})


def is_pooling_architecture(architecture: str) -> bool:
    return architecture in _POOLING_MODELS


def get_model_class(architectures: list[str] | None) -> type[nn.Module]:
    for arch in architectures or []:
        entry = _GENERATE_MODELS.get(arch) or _POOLING_MODELS.get(arch)
        if entry is not None:
            module, cls = entry
            return getattr(importlib.import_module(module), cls)
    raise UnsupportedArchitectureError(
        f"architectures {architectures!r} are not supported; supported architectures: "
        + ", ".join(supported_architectures())
    )
