"""``TritonAttentionBackend``: the CUDA fast path of the ``AttentionBackend`` protocol.

Per layer and step: ``store_kv_cache`` writes the new K/V rows at ``meta.slot_mapping``, then
decode-only batches (``meta.max_query_len == 1``) run the GQA split-KV paged decode kernel and all
other batches run the unified paged kernel (prefill, chunked prefill, prefix hits and decode rows
together); both take a layer's sliding window and logit soft-cap. Optionally, plain (no window, no
soft-cap) prefills without cached prefix go to torch's varlen flash attention.

CUDA graphs: the decode path reads only tensors (query_start_loc, seq_lens, block_tables,
slot_mapping) plus the static ints ``meta.num_seqs`` and ``meta.max_seq_len``; the only
allocations are the output and split buffers, sized by those static ints. Each kernel loops up to
the sequence's own ``seq_lens[i]``, so a graph captured with a padded ``max_seq_len`` (or with
``max_seq_len_bound`` given here) replays correctly for any context length. Padded graph slots
should be sequences with ``seq_lens == 0`` or zero query rows (their outputs are zeros / unwritten).
"""

from __future__ import annotations

import inspect

import torch

from slicelm.layers.attention_metadata import AttentionMetadata
from slicelm.layers.triton.kv_store import store_kv_cache
from slicelm.layers.triton.paged_attention import paged_decode_attention, unified_attention


def _find_varlen_attn():  # torch >= 2.10 ships torch.nn.attention.varlen.varlen_attn (flash)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    if "scale" not in params:  # the first release (2.10) had no scale argument
        return None, {}
    # causal flag changed between releases: is_causal=True, later window_size=(-1, 0)
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, {**causal, "enable_gqa": "enable_gqa" in params}


class TritonAttentionBackend:
    """Triton paged attention. ``use_flash_prefill``: send prefix-free prefills to torch's varlen
    flash attention when available (else the Triton unified kernel, always correct on its own).
    ``max_seq_len_bound``: pick the decode split count from this bound instead of
    ``meta.max_seq_len`` (useful when capturing CUDA graphs once for all context lengths)."""

    name = "triton"

    def __init__(
        self,
        use_flash_prefill: bool = False,
        max_seq_len_bound: int | None = None,
        decode_num_splits: int | None = None,
    ) -> None:
        # The model may write K/V itself (fused qk-norm + rotary + store) and pass key = value = None;
        # not with flash prefill, which reads the new keys/values from their tensors.
        self.takes_stored_kv = not use_flash_prefill
        # Every path reads device tensors only (no host metadata), so CUDA graphs may capture mixed
        # prefill/decode steps; flash prefill inspects the host-side query lengths.
        self.captures_mixed_batches = not use_flash_prefill
        self.max_seq_len_bound = max_seq_len_bound
        self.decode_num_splits = decode_num_splits
        self._varlen_attn, self._varlen_opts = _find_varlen_attn() if use_flash_prefill else (None, {})

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]; None: stored already
        value: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]; None: stored already
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        """An fp8 cache holds K / kv_scales[0] and V / kv_scales[1]: the kernels read it as q's dtype, K's scale
        folds into the softmax scale and V's multiplies the output (attention is linear in V)."""
        out = self._forward(query, key, value, kv_cache, meta, scale * kv_scales[0], sliding_window, soft_cap,
                            kv_scales)
        return out if kv_scales[1] == 1.0 else out.mul_(kv_scales[1])

    def _forward(self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
                 kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, sliding_window: int | None,
                 soft_cap: float | None, kv_scales: tuple[float, float]) -> torch.Tensor:
        if query.dim() != 3 or (key is not None and key.dim() != 3):
            shapes = f"{tuple(query.shape)}, {None if key is None else tuple(key.shape)}"
            raise ValueError(f"query/key: expected 3-D [T, H, D], got {shapes}")
        if query.stride(-1) != 1:
            query = query.contiguous()
        if key is not None and value is not None:
            if kv_scales != (1.0, 1.0):
                key, value = key / kv_scales[0], value / kv_scales[1]
            store_kv_cache(key, value, kv_cache, meta.slot_mapping)
        elif not self.takes_stored_kv:
            raise ValueError("key/value: required with flash prefill (the kernel reads them, not the cache)")
        out = torch.empty_like(query)
        if meta.is_decode_only:
            max_seq_len = self.max_seq_len_bound or meta.max_seq_len
            return paged_decode_attention(
                out, query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                meta.num_seqs, max_seq_len, scale, num_splits=self.decode_num_splits,
                sliding_window=sliding_window, soft_cap=soft_cap,
            )
        plain = sliding_window is None and soft_cap is None
        if self._varlen_attn is not None and key is not None and plain and self._is_fresh_prefill(meta):
            return self._flash_prefill(query, key, value, meta, scale)
        return unified_attention(
            out, query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.num_seqs, scale, sliding_window=sliding_window, soft_cap=soft_cap,
        )

    @staticmethod
    def _is_fresh_prefill(meta: AttentionMetadata) -> bool:
        qsl = meta.query_start_loc_cpu
        return all(qsl[i + 1] - qsl[i] == s for i, s in enumerate(meta.seq_lens_cpu[: meta.num_seqs]))

    def _flash_prefill(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        n = meta.query_start_loc_cpu[meta.num_seqs]
        q, k, v = query[:n], key[:n], value[:n]
        group = q.shape[1] // k.shape[1]
        kwargs = {k_: v_ for k_, v_ in self._varlen_opts.items() if k_ != "enable_gqa"}
        if group > 1:
            if self._varlen_opts["enable_gqa"]:
                kwargs["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        cu = meta.query_start_loc[: meta.num_seqs + 1]
        o = self._varlen_attn(q, k, v, cu, cu, meta.max_query_len, meta.max_query_len, scale=scale, **kwargs)
        if n == query.shape[0]:
            return o
        out = torch.zeros_like(query)
        out[:n] = o
        return out
