"""Gemma 2 and Gemma 3 (text) on the Llama skeleton's attention and MLP.

What differs from Llama: RMSNorm scales by ``1 + weight`` (``GemmaRMSNorm``), four norms per layer
(before and after attention and MLP, residual added after the post-norms), embeddings scaled by
``sqrt(hidden_size)`` in the model dtype, GeGLU (tanh GELU), attention scale
``query_pre_attn_scalar ** -0.5``, sliding-window layers alternating with global ones
(``layer_types``: Gemma 2 every other layer, Gemma 3 five of six), Gemma 2's tanh soft-capping of
attention logits and final logits, Gemma 3's qk-norm and its two rope tables (local base 10k without
scaling on sliding layers; the global base, possibly linearly scaled, on global ones).
``Gemma3ForConditionalGeneration`` checkpoints load their text part (``text_config``; vision tensors
are skipped). Tensor parallelism as in Llama (the soft-cap applies to the gathered logits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slicelm.layers.activation import GeluAndMul
from slicelm.layers.attention_metadata import AttentionBackend, AttentionMetadata
from slicelm.layers.norm import GemmaRMSNorm
from slicelm.layers.quantization import QuantConfig
from slicelm.layers.rotary import RotaryEmbedding, get_rope
from slicelm.layers.vocab_parallel import VocabParallelEmbedding
from slicelm.models.llama import LlamaArgs, LlamaAttention, LlamaForCausalLM, LlamaMLP, required
from slicelm.models.loading import Target

# Gemma3TextConfig's defaults for what a multimodal config's text_config may leave out
_GEMMA3_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
                    "query_pre_attn_scalar": 256, "sliding_window": 4096, "max_position_embeddings": 131072,
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's config: Gemma 3's (``text_config`` of a multimodal one, with its defaults) or Gemma 2's."""
    if isinstance(config.get("text_config"), dict):
        return {**_GEMMA3_DEFAULTS, **config["text_config"], "model_type": "gemma3_text"}
    archs = config.get("architectures") or []
    if config.get("model_type") in ("gemma3", "gemma3_text") or any(a.startswith("Gemma3") for a in archs):
        return {**_GEMMA3_DEFAULTS, **config, "model_type": "gemma3_text"}
    return config


def layer_types(config: dict[str, Any], gemma3: bool, num_layers: int) -> list[str]:
    types = config.get("layer_types")
    if types:
        return list(types)
    pattern = int(config.get("sliding_window_pattern") or (6 if gemma3 else 2))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]


def rope_config(config: dict[str, Any], layer_type: str, gemma3: bool) -> dict[str, Any]:
    """A config dict whose rope keys describe ``layer_type``'s table (old- and new-style Gemma 3 configs)."""
    params = config.get("rope_parameters") or {}
    if not gemma3 or isinstance(params.get(layer_type), dict):
        return config
    if layer_type == "sliding_attention":
        theta = float(config.get("rope_local_base_freq") or 10_000.0)
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {k: v for k, v in config.items() if k != "rope_parameters"}


def gemma_args(config: dict[str, Any]) -> LlamaArgs:
    family = "gemma3" if config.get("model_type") == "gemma3_text" else "gemma2"
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"config hidden_activation {act!r} is not supported (Gemma: 'gelu_pytorch_tanh')")
    if config.get("use_bidirectional_attention"):
        raise ValueError("config use_bidirectional_attention=True (an embedding Gemma) is not supported")
    num_layers = int(required(config, "num_hidden_layers"))
    types = layer_types(config, family == "gemma3", num_layers)
    window = config.get("sliding_window")
    num_heads = int(required(config, "num_attention_heads"))
    bias = bool(config.get("attention_bias", False))
    return LlamaArgs(
        family=family, vocab_size=int(required(config, "vocab_size")), hidden_size=int(required(config, "hidden_size")),
        intermediate_size=int(required(config, "intermediate_size")), num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads), head_dim=int(config.get("head_dim") or 256),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings") or 8192), tie_word_embeddings=True,
        qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=family == "gemma3",
        sliding_windows=tuple(int(window) if t == "sliding_attention" and window else None for t in types),
    )


class GemmaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, attn: LlamaAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        h, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, meta)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class GemmaModel(nn.Module):
    def __init__(self, args: LlamaArgs, layers: list[GemmaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.embed_scale = args.hidden_size**0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)  # rounded like transformers
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(positions, hidden, kv_cache, meta)
        return self.norm(hidden)


class GemmaForCausalLM(LlamaForCausalLM):
    """``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` and ``Gemma3ForConditionalGeneration`` (text only)."""

    def __init__(self, config: dict[str, Any], attn_backend: AttentionBackend | None = None,
                 quant_config: QuantConfig | None = None) -> None:
        text = text_config(config)
        super().__init__(text, attn_backend, quant_config)
        self.final_soft_cap = text.get("final_logit_softcapping")

    @classmethod
    def make_args(cls, config: dict[str, Any]) -> LlamaArgs:
        return gemma_args(config)

    def make_model(self, args: LlamaArgs, config: dict[str, Any], backend: AttentionBackend | None) -> nn.Module:
        gemma3 = args.family == "gemma3"
        types = layer_types(config, gemma3, args.num_layers)
        ropes: dict[str, RotaryEmbedding] = {}
        for t in dict.fromkeys(types):  # one table per layer type
            ropes[t] = get_rope(args.head_dim, args.max_position_embeddings, rope_config(config, t, gemma3), t)
        scale = float(config.get("query_pre_attn_scalar") or args.head_dim) ** -0.5
        soft_cap = config.get("attn_logit_softcapping")
        layers = [
            GemmaDecoderLayer(
                args,
                LlamaAttention(args, ropes[t], backend, args.sliding_windows[i], scale=scale, soft_cap=soft_cap,
                               norm=GemmaRMSNorm, quant_config=self.quant_config,
                               prefix=f"model.layers.{i}.self_attn"),
                LlamaMLP(args.hidden_size, args.intermediate_size, act_fn=GeluAndMul(),
                         quant_config=self.quant_config, prefix=f"model.layers.{i}.mlp"),
            )
            for i, t in enumerate(types)
        ]
        return GemmaModel(args, layers)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().compute_logits(hidden, out)
        if self.final_soft_cap:
            cap = float(self.final_soft_cap)
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits

    def locate_weight(self, name: str, params: dict[str, nn.Parameter]) -> Target | None:
        if name.startswith(_VISION_PREFIXES):
            return None
        for old, new in _TEXT_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        return super().locate_weight(name, params)
