"""Llama-family decoder: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (qk-norm) — one implementation.

Differences between the families are flags derived from the HF config dict (``LlamaArgs``).
q/k/v and gate/up projections are fused (``qkv_proj``, ``gate_up_proj``); ``load_weights`` maps the
HF checkpoint names onto them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.layers.activation import SiluAndMul
from slicelm.layers.attention import Attention
from slicelm.layers.attention_metadata import AttentionBackend, AttentionMetadata
from slicelm.layers.fused import fused_ops_for
from slicelm.layers.linear import Linear
from slicelm.layers.norm import RMSNorm
from slicelm.layers.rotary import get_rope

_ARCH_TO_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Checkpoint entries that are derived buffers, not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def _required(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ValueError(f"config is missing required field {key!r}")
    return config[key]


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
        num_heads = int(_required(config, "num_attention_heads"))
        hidden_size = int(_required(config, "hidden_size"))
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"config num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=int(_required(config, "vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(_required(config, "intermediate_size")),
            num_layers=int(_required(config, "num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(config.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else attention_bias and family != "mistral",
            o_bias=attention_bias and family in ("llama", "qwen3"),
            mlp_bias=bool(config.get("mlp_bias", False)) and family == "llama",
            qk_norm=family == "qwen3",
        )


def _check_sliding_window(config: dict[str, Any], args: LlamaArgs) -> None:
    """Sliding-window attention is not implemented: refuse configs where it would change results."""
    window = config.get("sliding_window")
    if window is None:
        return
    if args.family in ("qwen2", "qwen3"):
        layer_types = config.get("layer_types") or []
        if not config.get("use_sliding_window", False) and "sliding_attention" not in layer_types:
            return
    max_model_len = int(config.get("max_model_len") or args.max_position_embeddings)
    if int(window) < max_model_len:
        raise ValueError(
            f"config sliding_window={window} < max_model_len={max_model_len}: sliding-window attention "
            "is not supported; cap max_model_len (config['max_model_len']) at the window"
        )


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, config: dict[str, Any], backend: AttentionBackend | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.qkv_proj = Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = Linear(self.q_size, args.hidden_size, bias=args.o_bias)
        self.rotary_emb = get_rope(args.head_dim, args.max_position_embeddings, config)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.attn = Attention(args.num_heads, args.head_dim, args.head_dim**-0.5, args.num_kv_heads, backend)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        ops = fused_ops_for(qkv)
        if ops is not None and self.attn.takes_stored_kv and self.rotary_emb.rotary_dim == self.head_dim \
                and ops.qkv_prep_supported(self.head_dim, self.rotary_emb.rotary_dim):
            return self.o_proj(self._attend_fused(ops, positions, qkv, kv_cache, meta))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
        q, k = self.rotary_emb(positions, q, k)
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
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, config: dict[str, Any], backend: AttentionBackend | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, config, backend)
        self.mlp = LlamaMLP(args)
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
    def __init__(self, args: LlamaArgs, config: dict[str, Any], backend: AttentionBackend | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, config, backend) for _ in range(args.num_layers))
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


# HF sub-module name -> (fused parameter module, shard id)
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: dict[str, Any], attn_backend: AttentionBackend | None = None) -> None:
        super().__init__()
        args = LlamaArgs.from_config(config)
        _check_sliding_window(config, args)
        self.args = args
        self.num_layers = args.num_layers
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.vocab_size = args.vocab_size
        self.hidden_size = args.hidden_size
        self.model = LlamaModel(args, config, attn_backend)
        self.lm_head = (
            None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        )

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of one layer's paged KV cache."""
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
        """Logits in the model's dtype (the sampler upcasts where it needs float32); written into
        ``out`` when given (a CUDA graph's static buffer: no copy)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if out is not None:
            return torch.mm(hidden, weight.t(), out=out)
        return F.linear(hidden, weight)

    def _shard_slice(self, fused: str, shard: str | int) -> tuple[int, int]:
        if fused == "gate_up_proj":
            size = self.args.intermediate_size
            return int(shard) * size, size
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        return {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[str(shard)]

    def _expected_names(self) -> set[str]:
        """HF checkpoint names this model needs (fused parameters expanded to their shards)."""
        names = set()
        for name, _ in self.named_parameters():
            for hf_sub, (fused, _shard) in _STACKED.items():
                if f".{fused}." in name:
                    names.add(name.replace(f".{fused}.", f".{hf_sub}."))
            if not any(f".{fused}." in name for fused, _ in _STACKED.values()):
                names.add(name)
        return names

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into the (fused) parameters; returns the HF names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the checkpoint may still carry a copy of the embedding
            parts = name.split(".")
            stacked = _STACKED.get(parts[-2]) if len(parts) >= 2 else None
            if stacked is not None:
                fused, shard = stacked
                param_name = ".".join([*parts[:-2], fused, parts[-1]])
                param = params.get(param_name)
                if param is None:
                    raise ValueError(f"unexpected weight {name!r} (no parameter {param_name!r})")
                start, size = self._shard_slice(fused, shard)
                target = param.narrow(0, start, size)
            else:
                param = params.get(name)
                if param is None:
                    raise ValueError(f"unexpected weight {name!r} for {type(self).__name__}")
                target = param
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
            loaded.add(name)
        missing = self._expected_names() - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)}")
        return loaded
