"""BERT and XLM-RoBERTa encoders (one implementation), embedding and sequence-classification heads.

Inputs are packed variable-length batches without padding (like vLLM's encoder-only path):
``input_ids`` / ``positions`` / ``token_type_ids`` are [T]; sequence i owns tokens
``cu_seqlens[i]:cu_seqlens[i+1]``; ``positions`` are 0-based per sequence (XLM-R's ``padding_idx + 1``
offset is added here). Attention is bidirectional within each sequence: flash varlen attention on CUDA
(fp16/bf16), else SDPA on a padded [B, max_seqlen] view with a key-padding mask.

``max_position_embeddings`` on the model is the number of *usable* positions (config value minus XLM-R's
offset, e.g. 514 - 2 = 512): the engine must cap prompts at it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slicelm.layers.pooler import PoolingConfig, num_labels_of, pool, resolve_classifier_activation

_ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def _is_roberta(config: dict) -> bool:
    archs = config.get("architectures") or []
    return config.get("model_type") in _ROBERTA_TYPES or any("Roberta" in a for a in archs)


def _padded_index(cu_seqlens: Tensor, num_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """(seq_idx [T], offset [T], lens [B]) for scattering packed tokens into a [B, max_seqlen] grid."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    seq_idx = torch.repeat_interleave(
        torch.arange(lens.numel(), device=cu.device), lens, output_size=num_tokens
    )
    offset = torch.arange(num_tokens, device=cu.device) - cu[seq_idx]
    return seq_idx, offset, lens


class BertEmbeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        h = config["hidden_size"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], h)
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], h)
        self.token_type_embeddings = nn.Embedding(config.get("type_vocab_size", 2), h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.get("layer_norm_eps", 1e-12))
        pad = config.get("pad_token_id")
        self.position_offset = (1 if pad is None else pad) + 1 if _is_roberta(config) else 0

    def forward(self, input_ids: Tensor, positions: Tensor, token_type_ids: Tensor | None) -> Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertAttention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        h = config["hidden_size"]
        self.num_heads = config["num_attention_heads"]
        self.head_dim = h // self.num_heads
        assert self.head_dim * self.num_heads == h, (h, self.num_heads)
        self.qkv_proj = nn.Linear(h, 3 * h)  # HF query/key/value fused on load
        self.o_proj = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h, eps=config.get("layer_norm_eps", 1e-12))

    def forward(
        self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, pad_idx: tuple[Tensor, ...] | None
    ) -> Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        out = _varlen_attention(q, k, v, cu_seqlens, max_seqlen, pad_idx)
        return self.norm(x + self.o_proj(out.reshape(T, -1)))


_FLASH_OK: bool | None = None  # None = untried; False after a failure (then SDPA forever)


def _varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, pad_idx: tuple[Tensor, ...] | None
) -> Tensor:
    """q, k, v [T, H, D] -> [T, H, D], full (non-causal) attention within each sequence."""
    global _FLASH_OK
    T, H, D = q.shape
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _FLASH_OK is not False:
        try:
            from torch.nn.attention.varlen import varlen_attn

            cu = cu_seqlens.to(torch.int32)
            out = varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)
            _FLASH_OK = True
            return out
        except Exception:  # no flash kernel for this GPU / build: fall back
            if _FLASH_OK:
                raise
            _FLASH_OK = False
    B = cu_seqlens.shape[0] - 1
    if B * max_seqlen == T:  # all sequences have the same length: no padding, no mask
        qb, kb, vb = (t.view(B, max_seqlen, H, D).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(T, H, D)
    assert pad_idx is not None
    seq_idx, offset, lens = pad_idx

    def to_padded(t: Tensor) -> Tensor:
        p = t.new_zeros(B, max_seqlen, H, D)
        p[seq_idx, offset] = t
        return p.transpose(1, 2)  # [B, H, L, D]

    mask = torch.arange(max_seqlen, device=q.device)[None, :] < lens[:, None]  # [B, L] keys to attend
    out = F.scaled_dot_product_attention(
        to_padded(q), to_padded(k), to_padded(v), attn_mask=mask[:, None, None]
    )
    return out.transpose(1, 2)[seq_idx, offset]


class BertLayer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        h, inter = config["hidden_size"], config["intermediate_size"]
        act = config.get("hidden_act", "gelu")
        if act not in _ACTS:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: {sorted(_ACTS)}")
        self.act = _ACTS[act]
        self.attn = BertAttention(config)
        self.up_proj = nn.Linear(h, inter)
        self.down_proj = nn.Linear(inter, h)
        self.norm = nn.LayerNorm(h, eps=config.get("layer_norm_eps", 1e-12))

    def forward(
        self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, pad_idx: tuple[Tensor, ...] | None
    ) -> Tensor:
        x = self.attn(x, cu_seqlens, max_seqlen, pad_idx)
        return self.norm(x + self.down_proj(self.act(self.up_proj(x))))


class BertEncoder(nn.Module):
    """Embeddings + post-LN transformer layers; shared by both heads."""

    def __init__(self, config: dict):
        super().__init__()
        pos_type = config.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config["num_hidden_layers"]))

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        token_type_ids: Tensor | None,
        cu_seqlens: Tensor,
        max_seqlen: int,
    ) -> Tensor:
        x = self.embeddings(input_ids, positions, token_type_ids)
        B = cu_seqlens.shape[0] - 1
        pad_idx = None if B * max_seqlen == x.shape[0] else _padded_index(cu_seqlens, x.shape[0])
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen, pad_idx)
        return x


# HF name (after stripping bert./roberta.) -> (our name, qkv shard index or None)
_LAYER_MAP: dict[str, tuple[str, int | None]] = {
    "attention.self.query": ("attn.qkv_proj", 0),
    "attention.self.key": ("attn.qkv_proj", 1),
    "attention.self.value": ("attn.qkv_proj", 2),
    "attention.output.dense": ("attn.o_proj", None),
    "attention.output.LayerNorm": ("attn.norm", None),
    "intermediate.dense": ("up_proj", None),
    "output.dense": ("down_proj", None),
    "output.LayerNorm": ("norm", None),
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")
_IGNORED_SUFFIXES = ("position_ids", "token_type_ids")
_IGNORED_PREFIXES = ("cls.predictions.", "cls.seq_relationship.", "lm_head.")


class _BertBase(nn.Module):
    is_pooling_model = True
    _head_prefixes: tuple[str, ...] = ()  # HF names of head weights (kept as-is)
    _ignored_prefixes: tuple[str, ...] = _IGNORED_PREFIXES

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.is_roberta = _is_roberta(config)
        self.model = BertEncoder(config)
        self.hidden_size: int = config["hidden_size"]
        self.vocab_size: int = config["vocab_size"]
        self.max_position_embeddings: int = (
            config["max_position_embeddings"] - self.model.embeddings.position_offset
        )

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        token_type_ids: Tensor | None,
        cu_seqlens: Tensor,
        max_seqlen: int,
    ) -> Tensor:
        """input_ids, positions (0-based per sequence), token_type_ids: int64 [T]; cu_seqlens int32 [B+1]
        -> hidden [T, hidden]."""
        return self.model(input_ids, positions, token_type_ids, cu_seqlens, max_seqlen)

    def _map_name(self, name: str) -> tuple[str, int | None] | None:
        """HF name -> (our parameter name, qkv shard) or None to ignore; raises KeyError when unknown."""
        for prefix in ("bert.", "roberta."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if name.endswith(_IGNORED_SUFFIXES) or name.startswith(self._ignored_prefixes):
            return None
        name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
        if name.startswith("embeddings."):
            return "model." + name, None
        if name.startswith(self._head_prefixes):
            return name, None
        m = _LAYER_RE.match(name)
        if m is not None and m.group(2) in _LAYER_MAP:
            ours, shard = _LAYER_MAP[m.group(2)]
            return f"model.layers.{m.group(1)}.{ours}.{m.group(3)}", shard
        raise KeyError(name)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """HF names, with or without the ``bert.`` / ``roberta.`` prefix. Returns our loaded parameter names;
        ValueError naming unexpected or missing weights."""
        params = dict(self.named_parameters())
        loaded_shards: dict[str, set[int | None]] = {}
        unexpected: list[str] = []
        for hf_name, tensor in weights:
            try:
                mapped = self._map_name(hf_name)
            except KeyError:
                unexpected.append(hf_name)
                continue
            if mapped is None:
                continue
            name, shard = mapped
            param = params.get(name)
            if param is None:
                unexpected.append(hf_name)
                continue
            dst = param.data if shard is None else param.data.chunk(3, dim=0)[shard]
            if dst.shape != tensor.shape:
                raise ValueError(
                    f"weight {hf_name!r}: shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            loaded_shards.setdefault(name, set()).add(shard)
        if unexpected:
            raise ValueError(f"unexpected weights: {sorted(unexpected)}")
        missing = [
            n for n in params if n not in loaded_shards or ("qkv_proj" in n and loaded_shards[n] != {0, 1, 2})
        ]
        if missing:
            raise ValueError(f"missing weights: {sorted(missing)}")
        return set(loaded_shards)


class BertEmbeddingModel(_BertBase):
    """``BertModel`` / ``XLMRobertaModel`` checkpoints as embedding models (the HF pooler layer is unused)."""

    _ignored_prefixes = (*_IGNORED_PREFIXES, "pooler.")

    def __init__(self, config: dict, pooling: PoolingConfig | None = None):
        super().__init__(config)
        self.pooling = pooling if pooling is not None else PoolingConfig()

    def pool(self, hidden: Tensor, cu_seqlens: Tensor, normalize: bool | None = None) -> Tensor:
        """hidden [T, H] -> float32 [B, H] per ``self.pooling``; ``normalize`` overrides its normalize."""
        return pool(hidden, cu_seqlens, self.pooling, normalize=normalize)

    def embed(
        self,
        input_ids: Tensor,
        positions: Tensor,
        token_type_ids: Tensor | None,
        cu_seqlens: Tensor,
        max_seqlen: int,
    ) -> Tensor:
        return self.pool(self(input_ids, positions, token_type_ids, cu_seqlens, max_seqlen), cu_seqlens)


class BertForSequenceClassification(_BertBase):
    """Cross-encoders / classifiers. BERT: pooler (dense + tanh on CLS) -> ``classifier``;
    XLM-R: RobertaClassificationHead (``classifier.dense`` + tanh -> ``classifier.out_proj``) on CLS."""

    def __init__(self, config: dict, pooling: PoolingConfig | None = None):
        super().__init__(config)
        h = config["hidden_size"]
        self.num_labels = num_labels_of(config)
        if self.is_roberta:
            self._head_prefixes = ("classifier.",)
            self._ignored_prefixes = (*_IGNORED_PREFIXES, "pooler.")  # HF builds XLM-R heads without a pooler
            self.classifier = nn.ModuleDict(
                {"dense": nn.Linear(h, h), "out_proj": nn.Linear(h, self.num_labels)}
            )
        else:
            self._head_prefixes = ("pooler.", "classifier.")
            self.pooler = nn.ModuleDict({"dense": nn.Linear(h, h)})
            self.classifier = nn.Linear(h, self.num_labels)
        self._activations = {t: resolve_classifier_activation(config, t) for t in ("score", "classify")}

    def pool(self, hidden: Tensor, cu_seqlens: Tensor) -> Tensor:
        """hidden [T, H] -> raw logits float32 [B, num_labels] (from each sequence's first token)."""
        cls = hidden[cu_seqlens[:-1].long()]
        if self.is_roberta:
            logits = self.classifier["out_proj"](torch.tanh(self.classifier["dense"](cls)))
        else:
            logits = self.classifier(torch.tanh(self.pooler["dense"](cls)))
        return logits.float()

    compute_logits = pool

    def apply_activation(self, logits: Tensor, task: str = "score") -> Tensor:
        """ "score" (cross-encoder, vLLM / sentence-transformers config) or "classify" activation."""
        if task not in self._activations:
            raise ValueError(f"task must be 'score' or 'classify', got {task!r}")
        return self._activations[task](logits)

    def logits(
        self,
        input_ids: Tensor,
        positions: Tensor,
        token_type_ids: Tensor | None,
        cu_seqlens: Tensor,
        max_seqlen: int,
    ) -> Tensor:
        return self.pool(self(input_ids, positions, token_type_ids, cu_seqlens, max_seqlen), cu_seqlens)

    def score(
        self,
        input_ids: Tensor,
        positions: Tensor,
        token_type_ids: Tensor | None,
        cu_seqlens: Tensor,
        max_seqlen: int,
    ) -> Tensor:
        """Activated scores [B, num_labels] (num_labels == 1: sigmoid relevance in [0, 1])."""
        return self.apply_activation(
            self.logits(input_ids, positions, token_type_ids, cu_seqlens, max_seqlen)
        )
