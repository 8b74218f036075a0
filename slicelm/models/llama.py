"""Llama-family decoder: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (qk-norm), Phi-3 — one implementation,
also the skeleton of the MoE decoders (``moe.py``) and Gemma (``gemma.py``).

Differences between the families are flags derived from the HF config dict (``LlamaArgs``).
q/k/v and gate/up projections are fused (``qkv_proj``, ``gate_up_proj``); ``load_weights`` maps the
HF checkpoint names onto them (Phi-3 checkpoints hold them fused already). Layers may have a sliding
window (Mistral, Phi-3, Qwen2/3 ``use_sliding_window``); one rotary table is shared by all layers.

Tensor parallelism (``--tensor-parallel-size``): the projections are column/row-parallel, the embedding and
LM head vocabulary-parallel (``layers/parallel_linear.py``, ``layers/vocab_parallel.py``); each rank holds its
query / KV heads (``num_heads`` and ``num_kv_heads`` are this rank's) and loads only its part of each tensor
(a fused checkpoint tensor, Phi-3's ``qkv_proj`` / ``gate_up_proj``, is cut per shard).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slicelm.distributed.parallel_state import get_tp_group
from slicelm.layers.activation import SiluAndMul
from slicelm.layers.attention import Attention
from slicelm.layers.attention_metadata import AttentionBackend, AttentionMetadata
from slicelm.layers.fused import fused_ops_for
from slicelm.layers.norm import RMSNorm
from slicelm.layers.parallel_linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from slicelm.layers.quantization import QuantConfig
from slicelm.layers.rotary import RotaryEmbedding, get_rope
from slicelm.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding, vocab_parallel_logits
from slicelm.models.loading import (
    STACKED,
    Target,
    TensorSource,
    checkpoint_parameters,
    expand_fused,
    kv_scale_target,
    layer_target,
    load_all,
)

_ARCH_TO_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
_FAMILIES = tuple(_ARCH_TO_FAMILY.values())


def required(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"config is missing required field {key!r}")
    return config[key]


def layer_sliding_windows(config: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window (None: full attention) as transformers applies it."""
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if window is None or family == "llama":
        return (None,) * num_layers
    if layer_types:
        if len(layer_types) != num_layers:
            raise ValueError(f"config layer_types has {len(layer_types)} entries for {num_layers} layers")
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        if not config.get("use_sliding_window", False):
            return (None,) * num_layers
        first = int(config.get("max_window_layers") or 0) if family != "qwen3_moe" else 0
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers  # mistral, mixtral, phi3


@dataclass
class LlamaArgs:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlamaArgs:
        family = config.get("model_type")
        if family not in _FAMILIES:
            archs = config.get("architectures") or []
            family = next((_ARCH_TO_FAMILY[a] for a in archs if a in _ARCH_TO_FAMILY), None)
        if family is None:
            raise ValueError(
                f"config model_type {config.get('model_type')!r} / architectures "
                f"{config.get('architectures')!r} is not a Llama-family model"
            )
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"config hidden_act {hidden_act!r} is not supported (only 'silu')")
        num_heads = int(required(config, "num_attention_heads"))
        hidden_size = int(required(config, "hidden_size"))
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"config num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        attention_bias = bool(config.get("attention_bias", False))
        qwen3 = family in ("qwen3", "qwen3_moe")
        num_layers = int(required(config, "num_hidden_layers"))
        return cls(
            family=family,
            vocab_size=int(required(config, "vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(required(config, "intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(config.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else attention_bias and family in ("llama", "qwen3", "qwen3_moe"),
            o_bias=attention_bias and (family == "llama" or qwen3),
            mlp_bias=bool(config.get("mlp_bias", False)) and family == "llama",
            qk_norm=qwen3,
            sliding_windows=layer_sliding_windows(config, family, num_layers),
        )


class LlamaAttention(nn.Module):
    """Fused qkv projection, optional per-head q/k norm, rotary, paged attention, output projection.
    ``scale`` / ``soft_cap`` / ``norm`` default to Llama's; Gemma passes its own. ``prefix`` is the module's
    name in the model (``model.layers.3.self_attn``): what a ``quant_config`` matches its linears by."""

    def __init__(self, args: LlamaArgs, rope: RotaryEmbedding, backend: AttentionBackend | None,
                 sliding_window: int | None, scale: float | None = None, soft_cap: float | None = None,
                 norm: Callable[[int, float], nn.Module] = RMSNorm, quant_config: QuantConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads,
                                          bias=args.qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        # this rank's heads
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = self.num_heads * args.head_dim
        self.kv_size = self.num_kv_heads * args.head_dim
        self.o_proj = RowParallelLinear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = rope
        self.q_norm = norm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = norm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.fusable_norm = norm is RMSNorm  # the fused CUDA prep kernel computes RMSNorm's formula
        self.attn = Attention(self.num_heads, args.head_dim, args.head_dim**-0.5 if scale is None else scale,
                              self.num_kv_heads, backend, sliding_window=sliding_window, soft_cap=soft_cap)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        ops = fused_ops_for(qkv)
        if ops is not None and self.fusable_norm and self.attn.takes_stored_kv and self.attn.unit_kv_scales \
                and self.rotary_emb.rotary_dim == self.head_dim \
                and ops.qkv_prep_supported(self.head_dim, self.rotary_emb.rotary_dim):
            return self.o_proj(self._attend_fused(ops, positions, qkv, kv_cache, meta))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
            q, k = self.rotary_emb(positions, q, k)
        elif qkv.is_cuda:
            q, k = self.rotary_emb(positions, q, k)
        else:  # CPU: queries and keys sit side by side in qkv, rotate them in one go
            q, k = self.rotary_emb.rotate(positions, qkv[:, : self.q_size + self.kv_size]).split(
                [self.q_size, self.kv_size], dim=-1)
        out = self.attn(q, k, v.reshape(num_tokens, self.num_kv_heads, self.head_dim), kv_cache, meta)
        return self.o_proj(out.reshape(num_tokens, self.q_size))

    def _attend_fused(self, ops, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
        """CUDA: one kernel does qk-norm, rotary and the KV store; attention then reads k/v from the cache."""
        norm = self.q_norm is not None and self.k_norm is not None
        q = ops.qkv_norm_rope_store(
            qkv, positions, self.rotary_emb.cos_sin_cache,
            self.q_norm.weight if norm else None, self.k_norm.weight if norm else None,
            self.q_norm.eps if norm else 0.0, kv_cache, meta.slot_mapping,
            self.num_heads, self.num_kv_heads, self.head_dim,
        )
        return self.attn(q, None, None, kv_cache, meta).reshape(qkv.shape[0], self.q_size)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 act_fn: nn.Module | None = None, quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        inter = intermediate_size
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [inter, inter], bias=bias, quant_config=quant_config,
                                                 prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, hidden_size, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = act_fn or SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, attn: LlamaAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The decoder LM. Subclasses change the parts through ``make_args`` / ``make_mlp`` / ``make_model``
    and checkpoint names through ``locate_weight`` / ``expected_weights``. With a ``quant_config`` the
    linears of attention and MLP hold the checkpoint's quantized tensors (``layers/quantization``)."""

    supports_tensor_parallel = True

    def __init__(self, config: dict[str, Any], attn_backend: AttentionBackend | None = None,
                 quant_config: QuantConfig | None = None) -> None:
        super().__init__()
        args = self.make_args(config)
        self.args = args
        self.quant_config = quant_config
        self.tp = get_tp_group()
        self.num_layers = args.num_layers
        self.head_dim = args.head_dim
        self.vocab_size = args.vocab_size
        self.hidden_size = args.hidden_size
        self.model = self.make_model(args, config, attn_backend)
        attn = self.model.layers[0].self_attn
        self.num_heads, self.num_kv_heads = attn.num_heads, attn.num_kv_heads  # this rank's
        self.lm_head = None if args.tie_word_embeddings else ParallelLMHead(args.vocab_size, args.hidden_size)
        for name, module in self.named_modules():  # parallel layers name themselves in errors
            if hasattr(module, "prefix"):
                module.prefix = name

    @classmethod
    def make_args(cls, config: dict[str, Any]) -> LlamaArgs:
        return LlamaArgs.from_config(config)

    def make_mlp(self, args: LlamaArgs, config: dict[str, Any], layer_idx: int) -> nn.Module:
        return LlamaMLP(args.hidden_size, args.intermediate_size, args.mlp_bias, quant_config=self.quant_config,
                        prefix=f"model.layers.{layer_idx}.mlp")

    def make_model(self, args: LlamaArgs, config: dict[str, Any], backend: AttentionBackend | None) -> nn.Module:
        rope = get_rope(args.head_dim, args.max_position_embeddings, config)  # one table for every layer
        layers = (
            LlamaDecoderLayer(args, LlamaAttention(args, rope, backend, args.sliding_windows[i],
                                                   quant_config=self.quant_config,
                                                   prefix=f"model.layers.{i}.self_attn"),
                              self.make_mlp(args, config, i))
            for i in range(args.num_layers)
        )
        return LlamaModel(args, layers)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of one layer's paged KV cache (this rank's KV heads)."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_meta)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the whole vocabulary in the model's dtype (the sampler upcasts where it needs
        float32); written into ``out`` when given (a CUDA graph's static buffer). With tensor parallelism
        every rank gets them (an all-gather of the vocabulary slices)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return vocab_parallel_logits(hidden, weight, self.vocab_size, self.tp, out)

    def expected_weights(self) -> set[str]:
        """Canonical checkpoint names this model needs (fused parameters expanded to their parts)."""
        return {n for name in checkpoint_parameters(self) for n in expand_fused(name)}

    def locate_weight(self, name: str, params: dict[str, nn.Parameter]) -> Target | None:
        """Where checkpoint tensor ``name`` goes (None: not a weight of this model, e.g. a tied copy).
        Linears, embeddings and fp8 KV-cache scales place their tensors themselves (``Target.load``)."""
        if name == "lm_head.weight" and self.lm_head is None:
            return None  # tied: the checkpoint may still carry a copy of the embedding
        target = kv_scale_target(self, name) or layer_target(self, name)
        if target is not None:
            return target
        parts = name.split(".")
        stacked = STACKED.get(parts[-2]) if len(parts) >= 2 else None
        if stacked is not None:
            fused = ".".join([*parts[:-2], stacked[0]])
            raise ValueError(f"unexpected weight {name!r} (no layer {fused!r})")
        if name not in params:
            raise ValueError(f"unexpected weight {name!r} for {type(self).__name__}")
        return Target(params[name].data, set(expand_fused(name)))

    def checkpoint_name(self, canonical: str) -> str:
        """How this family's checkpoints spell a canonical name (for error messages)."""
        return canonical

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, TensorSource]]) -> set[str]:
        """Copies HF-named tensors (whole or lazy) into the (fused) parameters, a parallel layer taking only this
        rank's part; returns the canonical names loaded."""
        params = dict(self.named_parameters())
        return load_all(weights, lambda name: self.locate_weight(name, params), self.expected_weights(),
                        self.checkpoint_name)
