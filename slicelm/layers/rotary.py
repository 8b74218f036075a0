"""Rotary position embedding (neox / Hugging Face Llama ``rotate_half`` layout) with rope scaling.

Rope parameters are read from a HF config dict in either layout:
  * transformers 5: ``rope_parameters = {"rope_type": ..., "rope_theta": ..., <scaling keys>}``
  * older configs: top-level ``rope_theta`` plus ``rope_scaling = {"rope_type"/"type": ..., ...}``
  * per layer type (Gemma 3): ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``
Supported ``rope_type``: ``default`` (no scaling), ``linear``, ``llama3``, ``yarn``, ``longrope`` (alias
``su``, Phi-3: the short factors below ``original_max_position_embeddings``, the long ones from there on,
as vLLM does).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slicelm.layers.fused import fused_ops_for

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "su")


def rope_parameters(config: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """Merge old-style (``rope_theta`` + ``rope_scaling``) and new-style (``rope_parameters``) keys;
    per-layer-type layouts give ``layer_type``'s entry."""
    params: dict[str, Any] = {}
    scaling = config.get("rope_scaling") or {}
    new = config.get("rope_parameters") or {}
    for source in (scaling, new):
        if not isinstance(source, dict):
            raise ValueError(f"rope_scaling/rope_parameters must be a dict, got {source!r}")
        params.update({k: v for k, v in source.items() if v is not None})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])  # per-layer-type layout
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    params.setdefault("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if rope_type in ("longrope", "su"):
        params.setdefault("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    return params


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any], max_position: int) -> torch.Tensor:
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = float(params.get("original_max_position_embeddings") or max_position)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(params: dict[str, Any], dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    base = float(params["rope_theta"])
    orig = params.get("original_max_position_embeddings")
    if orig is None:
        raise ValueError("rope_parameters.original_max_position_embeddings is required for yarn")
    factor = params.get("factor") or max_position / orig
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (
        1.0 / pos_freqs
    ) * extrapolation_factor
    return inv_freq, float(attention_factor)


def _longrope_inv_freqs(
    params: dict[str, Any], dim: int, max_position: int
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(short inv_freq, long inv_freq, attention factor, original context length) of LongRoPE."""
    orig = params.get("original_max_position_embeddings")
    if orig is None:
        raise ValueError("original_max_position_embeddings is required for longrope")
    orig = int(orig)
    factor = params.get("factor") or max_position / orig
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    base = float(params["rope_theta"])
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    freqs = []
    for key in ("short_factor", "long_factor"):
        ext = torch.tensor(params[key], dtype=torch.float32)
        if ext.numel() != dim // 2:
            raise ValueError(f"rope {key} has {ext.numel()} entries, expected {dim // 2}")
        freqs.append(1.0 / (ext * base**exponents))
    return freqs[0], freqs[1], float(attention_factor), orig


def compute_inv_freq(
    params: dict[str, Any], rotary_dim: int, max_position: int
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] float32, attention scaling of cos/sin) for merged rope params."""
    rope_type = params["rope_type"]
    base = float(params["rope_theta"])
    if rope_type == "default":
        return _default_inv_freq(base, rotary_dim), 1.0
    if rope_type == "linear":
        return _default_inv_freq(base, rotary_dim) / float(params["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_default_inv_freq(base, rotary_dim), params, max_position), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(params, rotary_dim, max_position)
    supported = ", ".join(SUPPORTED_ROPE_TYPES)
    raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported (supported: {supported})")


class RotaryEmbedding(nn.Module):
    """Applies neox-style rotary embedding to the first ``rotary_dim`` dims of every head."""

    def __init__(
        self, head_dim: int, rotary_dim: int, max_position: int, inv_freq: torch.Tensor, scaling: float = 1.0,
        long_inv_freq: torch.Tensor | None = None, long_from: int = 0,
    ) -> None:
        """``long_inv_freq``: positions from ``long_from`` on use these frequencies instead (LongRoPE)."""
        super().__init__()
        assert rotary_dim <= head_dim and rotary_dim % 2 == 0, (head_dim, rotary_dim)
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        if long_inv_freq is not None and long_from < max_position:
            freqs[long_from:] = torch.outer(t[long_from:], long_inv_freq.float())
        cache = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)  # [P, rotary_dim]
        # Follows .to(dtype) like the rest of the model (HF also casts cos/sin to the activation dtype).
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._last: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], -1, self.head_dim)
        half, rot = self.rotary_dim // 2, self.rotary_dim
        x1, x2 = x[..., :half], x[..., half:rot]
        out = torch.empty_like(x)
        o1, o2 = out[..., :half], out[..., half:rot]
        torch.mul(x1, cos, out=o1)
        o1.addcmul_(x2, sin, value=-1.0)  # x1 cos - x2 sin
        torch.mul(x2, cos, out=o2)
        o2.addcmul_(x1, sin)  # x2 cos + x1 sin
        if rot < self.head_dim:
            out[..., rot:] = x[..., rot:]
        return out.view(shape)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, rotary_dim // 2] of ``positions``; on the CPU the last result is kept, since every
        layer of a step asks for the same positions tensor."""
        if positions.is_cuda:  # no memo there: a CUDA graph must compute cos/sin inside itself
            cos_sin = self.cos_sin_cache[positions].to(dtype)
            cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
            return cos, sin
        last = self._last
        if last is not None and last[0] is positions and last[1] == dtype:
            return last[2], last[3]
        cos_sin = self.cos_sin_cache[positions].to(dtype)
        cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
        self._last = (positions, dtype, cos, sin)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; query [T, H*D] or [T, H, D]; key likewise. Returns the rotated tensors
        (on CUDA rotated in place by one fused kernel; on the CPU new tensors)."""
        ops = fused_ops_for(query)
        if ops is not None and ops.rope_supported(self.head_dim, self.rotary_dim):
            ops.apply_rope_(positions, query, key, self.cos_sin_cache, self.head_dim)
            return query, key
        cos, sin = self._cos_sin(positions, query.dtype)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def rotate(self, positions: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """The reference (CPU) path on one tensor of heads [T, N*D] (queries and keys side by side)."""
        cos, sin = self._cos_sin(positions, heads.dtype)
        return self._rotate(heads, cos, sin)


def get_rope(
    head_dim: int, max_position: int, config: dict[str, Any], layer_type: str = "full_attention"
) -> RotaryEmbedding:
    """Rotary embedding for a HF config dict (rope params in any layout, see module doc)."""
    params = rope_parameters(config, layer_type)
    rotary_dim = int(head_dim * float(params["partial_rotary_factor"]))
    if params["rope_type"] in ("longrope", "su"):
        short, long, scaling, orig = _longrope_inv_freqs(params, rotary_dim, max_position)
        return RotaryEmbedding(head_dim, rotary_dim, max_position, short, scaling, long, orig)
    inv_freq, scaling = compute_inv_freq(params, rotary_dim, max_position)
    return RotaryEmbedding(head_dim, rotary_dim, max_position, inv_freq, scaling)
