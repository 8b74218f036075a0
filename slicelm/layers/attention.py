"""Attention: the pure-torch reference backend, the ``Attention`` layer and backend selection.

``TorchAttentionBackend`` runs on any device and is the oracle the fast backends are tested
against: it stores the new keys/values into the paged cache, then for every sequence gathers its
whole context ``[0, seq_len)`` through its block table and computes causal (GQA) attention for
that sequence's query rows in float32 (optionally within a sliding window and with soft-capped
logits, Gemma 2 / Mistral style).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.layers.attention_metadata import AttentionBackend, AttentionMetadata

# Upper bound on the float32 score elements [heads, q_rows, seq_len] materialised at once.
_MAX_SCORE_ELEMENTS = 1 << 27


FP8_KV_MAX = 448.0  # float8_e4m3fn's largest finite value


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``x / scale`` in the cache's dtype (fp8 e4m3: saturating, as the Triton kernels convert)."""
    if cache_dtype == torch.float8_e4m3fn:
        return (x.float() / scale).clamp(-FP8_KV_MAX, FP8_KV_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def store_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Write ``key``/``value`` [T, KH, D] into the flat slots of ``kv_cache``; negative slots are skipped.
    An fp8 cache holds ``key / kv_scales[0]`` and ``value / kv_scales[1]``."""
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:  # padding rows (profiling, graphs)
        valid = slot_mapping >= 0
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    if kv_cache.dtype == torch.float8_e4m3fn:  # (no fp8 index_copy_ on the CPU)
        flat[0][slot_mapping] = to_cache(key, kv_cache.dtype, kv_scales[0])
        flat[1][slot_mapping] = to_cache(value, kv_cache.dtype, kv_scales[1])
        return
    flat.index_copy_(1, slot_mapping, torch.stack((key, value)).to(kv_cache.dtype))


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, KH, D] of one sequence, read through its block table (one gather)."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    kv = kv_cache.index_select(1, block_table[:num_blocks].long())  # [2, blocks, block_size, KH, D]
    kv = kv.flatten(1, 2)[:, :seq_len]
    return kv[0], kv[1]


def decode_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode row: query [1, H, D] against its whole context key/value [S, KH, D] (no mask), float32, in
    one fused ``scaled_dot_product_attention`` (grouped heads): the CPU's batch-1 decode path. One parallel
    region per layer instead of three (bmm, softmax, bmm) matters most on shared, oversubscribed cores."""
    q = query.float().transpose(0, 1).unsqueeze(0)  # [1, H, 1, D]
    k = key.float().transpose(0, 1).unsqueeze(0)  # [1, KH, S, D]
    v = value.float().transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)  # [1, H, 1, D]
    return out[0].transpose(0, 1)


class TorchAttentionBackend:
    """Reference paged attention in plain torch (one Python iteration per sequence)."""

    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        _, num_heads, head_dim = query.shape
        num_kv_heads = key.shape[1]
        assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
        assert kv_cache.shape[-2:] == (num_kv_heads, head_dim), (kv_cache.shape, key.shape)
        store_kv(key, value, kv_cache, meta.slot_mapping, kv_scales)
        if meta.num_seqs == 1 and meta.num_tokens == query.shape[0] == 1 and soft_cap is None \
                and kv_cache.dtype != torch.float8_e4m3fn \
                and (sliding_window is None or meta.seq_lens_cpu[0] <= sliding_window):  # batch-1 decode
            k, v = gather_kv(kv_cache, meta.block_tables[0], meta.seq_lens_cpu[0])
            return decode_attend(query, k, v, scale).to(query.dtype)
        group = num_heads // num_kv_heads
        out = torch.empty_like(query)
        for i in range(meta.num_seqs):
            q_start, q_end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
            q_len, seq_len = q_end - q_start, meta.seq_lens_cpu[i]
            if q_len == 0:
                continue
            assert q_len <= seq_len, (i, q_len, seq_len)
            k, v = gather_kv(kv_cache, meta.block_tables[i], seq_len)
            # [KH, S, D] float32, shared by the `group` query heads of each KV head.
            kf = k.float().transpose(0, 1) * kv_scales[0]
            vf = v.float().transpose(0, 1) * kv_scales[1]
            kv_pos = torch.arange(seq_len, device=query.device)
            rows = max(1, _MAX_SCORE_ELEMENTS // (num_heads * seq_len))
            for r0 in range(0, q_len, rows):
                r1 = min(q_len, r0 + rows)
                # [T', H, D] -> [KH, group * T', D]
                q = query[q_start + r0 : q_start + r1].float()
                q = q.view(r1 - r0, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
                q = q.reshape(num_kv_heads, group * (r1 - r0), head_dim)
                scores = torch.bmm(q, kf.transpose(1, 2)) * scale  # [KH, group*T', S]
                if soft_cap is not None:
                    scores = torch.tanh(scores / soft_cap) * soft_cap
                q_pos = seq_len - q_len + torch.arange(r0, r1, device=query.device)
                mask = kv_pos[None, :] > q_pos[:, None]
                if sliding_window is not None:
                    mask |= kv_pos[None, :] <= q_pos[:, None] - sliding_window
                mask = mask.repeat(group, 1)  # [group*T', S]
                scores.masked_fill_(mask[None], float("-inf"))
                o = torch.bmm(torch.softmax(scores, dim=-1), vf)  # [KH, group*T', D]
                o = o.view(num_kv_heads, group, r1 - r0, head_dim).permute(2, 0, 1, 3)
                out[q_start + r0 : q_start + r1] = o.reshape(r1 - r0, num_heads, head_dim).to(query.dtype)
        return out


def get_attention_backend(device: torch.device | str, name: str = "auto", flash_prefill: bool = False,
                          decode_splits: int | None = None) -> AttentionBackend:
    """``name="auto"``: Triton on CUDA when importable, else torch. ``flash_prefill`` and ``decode_splits``
    configure the Triton backend (``--attention-flash-prefill``, ``--attention-decode-splits``)."""
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"attention_backend must be auto, torch or triton; got {name!r}")
    cuda = torch.device(device).type == "cuda"
    if name == "torch" or (name == "auto" and not cuda):
        if flash_prefill or decode_splits is not None:
            raise ValueError("attention_flash_prefill / attention_decode_splits apply to the Triton backend only")
        return TorchAttentionBackend()
    if not cuda:
        raise ValueError("attention_backend 'triton' needs a CUDA device")
    try:
        from slicelm.layers.triton.backend import TritonAttentionBackend
    except ImportError:
        if name == "triton":
            raise
        return TorchAttentionBackend()
    return TritonAttentionBackend(use_flash_prefill=flash_prefill, decode_num_splits=decode_splits)


class Attention(nn.Module):
    """Paged attention layer: reshapes q/k/v to heads and calls the backend (with the layer's
    sliding window and logit soft-cap, when it has them).

    With ``backend=None`` the backend is chosen from the device of the first input.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int | None = None,
        backend: AttentionBackend | None = None,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        if soft_cap is not None and soft_cap <= 0:
            raise ValueError(f"soft_cap must be > 0, got {soft_cap}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.sliding_window = sliding_window
        self.soft_cap = soft_cap
        self.kv_scales = (1.0, 1.0)  # fp8 KV cache: K and V are stored divided by these (checkpoint's or 1.0)

    def set_kv_scale(self, which: str, value: float) -> None:
        """``which`` "k" or "v": the checkpoint's KV-cache scale (used only with an fp8 cache)."""
        if not value > 0:
            raise ValueError(f"KV-cache {which}_scale must be > 0, got {value}")
        self.kv_scales = (value, self.kv_scales[1]) if which == "k" else (self.kv_scales[0], value)

    @property
    def unit_kv_scales(self) -> bool:
        return self.kv_scales == (1.0, 1.0)

    @property
    def takes_stored_kv(self) -> bool:
        """Whether the backend can be called with k = v = None, the step's keys/values being in the
        cache already (written by a fused kernel before attention)."""
        return bool(getattr(self.backend, "takes_stored_kv", False))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, H*D] or [T, H, D]; k, v: [T, KH*D] or [T, KH, D], or both None when the backend
        ``takes_stored_kv`` and they sit in ``kv_cache`` already. Output has q's rank."""
        if self.backend is None:
            self.backend = get_attention_backend(q.device)
        flat = q.dim() == 2
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        if k is None or v is None:
            assert k is None and v is None and self.takes_stored_kv, "k/v may be omitted only together"
        else:
            k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
            v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        # scaled fp8 caches only: backends without fp8 support never see the argument
        scaled = {"kv_scales": self.kv_scales} if kv_cache.dtype == torch.float8_e4m3fn and not self.unit_kv_scales \
            else {}
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale,
                                   sliding_window=self.sliding_window, soft_cap=self.soft_cap, **scaled)
        return out.reshape(num_tokens, self.num_heads * self.head_dim) if flat else out
