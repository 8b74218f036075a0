"""Triton paged attention over the KV cache layout of ``attention_metadata.py``.

Two entry points, both reading K/V through ``block_tables`` from
``kv_cache[2, num_blocks, block_size, Hkv, D]`` and writing into a caller-given ``out`` [T, Hq, D]:

* ``paged_decode_attention``: one query token per sequence. One program per (sequence, KV head,
  split) loads all ``Hq / Hkv`` query heads of its group as the rows of one ``tl.dot`` so each K/V
  tile is read once per group. With ``num_splits > 1`` ("flash decoding") each sequence's context
  is cut into ``num_splits`` equal tile ranges, computed *inside the kernel from seq_lens*, and a
  second kernel merges the partial (max, sum, acc) triples. Nothing here depends on data values on
  the host, so the launch is CUDA-graph capturable; ``max_seq_len`` only steers the split count
  (a graph captured with a large bound stays correct for any shorter or longer context).
* ``unified_attention``: any number of new tokens per sequence (prefill, chunked prefill, prefix
  hits, decode rows in one mixed batch). Programs tile BLOCK_Q query tokens x the G heads of a KV
  group (BLOCK_M = BLOCK_Q * G rows) against BLOCK_N keys, causal with offset seq_len - q_len;
  each program finds its sequence by binary search over query_start_loc (vLLM's scheme).

Both take an optional sliding window (a query at position p sees keys in ``(p - window, p]``; tiles
wholly outside it are skipped) and an optional tanh soft-cap of the scaled logits
(``cap * tanh(s / cap)``, Gemma 2). Both are static per layer, so graphs stay capturable.

Softmax in base 2 with fp32 running max / sum / accumulator; fp32 inputs use IEEE fp32 dots.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)
MAX_SPLITS = 64
MIN_TOKENS_PER_SPLIT = 256


@triton.jit
def _soft_cap(s, cap):
    """``cap * tanh(s / cap)`` (inf-safe). Logits are in base 2 here, so is ``cap``: the same function."""
    return cap * (1.0 - 2.0 / (tl.exp2(2.0 * LOG2E_C * s / cap) + 1.0))


# Block-table width changes from step to step: left unspecialized (Triton would otherwise compile a
# new variant the first time a width is 1 or a multiple of 16, mid-run).
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, window, softcap,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_c_blk, stride_c_tok, stride_c_h, stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_row
    if q_len <= 0:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    first_key = 0
    if USE_WINDOW:  # the query sits at seq_len - 1 and sees keys in (seq_len - 1 - window, seq_len - 1]
        first_key = tl.maximum(seq_len - window, 0)
    first_tile = first_key // BLOCK_N
    tiles_per_split = tl.cdiv(num_tiles - first_tile, NUM_SPLITS)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q_off = q_row.to(tl.int64) * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        pos = tile * BLOCK_N + offs_n
        n_mask = pos < seq_len
        if USE_WINDOW:
            n_mask = n_mask & (pos >= first_key)
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = blk * stride_c_blk + (pos % BLOCK_SIZE) * stride_c_tok + kvh * stride_c_h
        k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0).to(q.dtype)  # fp8 cache: upcast
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if USE_SOFTCAP:
            s = _soft_cap(s, softcap)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_off = q_row.to(tl.int64) * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :]
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        row = (seq * NUM_HEADS + heads).to(tl.int64) * NUM_SPLITS + split
        tl.store(part_m_ptr + row, m_i, mask=g_mask)
        tl.store(part_l_ptr + row, l_i, mask=g_mask)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, query_start_loc_ptr,
    stride_o_t, stride_o_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_row <= 0:
        return
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row = (seq * NUM_HEADS + head).to(tl.int64) * NUM_SPLITS + offs_s
    m = tl.load(part_m_ptr + row)
    l_s = tl.load(part_l_ptr + row)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l_s, 0)
    acc = tl.load(part_out_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :])
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    o_off = q_row.to(tl.int64) * stride_o_t + head * stride_o_h + offs_d
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _find_seq(query_start_loc_ptr, target, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i with query_start_loc[i] // BLOCK_Q + i <= target (q-block start of sequence i)."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _unified_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, window, softcap, num_seqs,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_c_blk, stride_c_tok, stride_c_h, stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    tok = q_block * BLOCK_Q + offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    m_mask = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    d_mask = offs_d < HEAD_DIM
    q_off = (q_start + tok).to(tl.int64)[:, None] * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = ctx_len + tok

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_end = ctx_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len)  # keys past this are masked for all rows
    kv_lo = 0
    if USE_WINDOW:  # keys before the block's first query position - window + 1 are masked for all rows
        kv_lo = tl.maximum(ctx_len + q_block * BLOCK_Q - window + 1, 0) // BLOCK_N * BLOCK_N
    for start in range(kv_lo, kv_end, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < kv_end
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = blk * stride_c_blk + (pos % BLOCK_SIZE) * stride_c_tok + kvh * stride_c_h
        k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0).to(q.dtype)  # fp8 cache: upcast
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if USE_SOFTCAP:
            s = _soft_cap(s, softcap)
        visible = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = (q_start + tok).to(tl.int64)[:, None] * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :]
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16  # CPU tensors only reach here under TRITON_INTERPRET=1


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Static split count (a power of two): fill ~2 waves of SMs, but keep >= 256 tokens per split."""
    base = max(num_seqs * num_kv_heads, 1)
    want = triton.next_power_of_2(triton.cdiv(2 * num_sms, base))
    by_len = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, 1 << (by_len.bit_length() - 1), MAX_SPLITS))


def _check(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache: expected [2, blocks, block_size, Hkv, D], got {tuple(kv_cache.shape)}")
    _, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"kv_cache: head_dim {kv_cache.shape[4]} != query head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"query: num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    if out.shape != query.shape or query.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("out/query: need equal shapes [T, Hq, D] with unit stride on head_dim")
    if kv_cache[0].stride(-1) != 1:
        raise ValueError("kv_cache: head_dim must have unit stride")
    return num_heads, num_kv_heads, head_dim, kv_cache.shape[2]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(
    out: torch.Tensor,  # [T, Hq, D], written at row query_start_loc[i] of each sequence
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]; each sequence has 0 or 1 query rows
    num_seqs: int,
    max_seq_len: int,  # upper bound used only to pick the split count
    scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    num_heads, num_kv_heads, head_dim, block_size = _check(out, query, kv_cache)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    if num_splits is None:
        span = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, span, _num_sms(query.device))
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits: must be a power of two >= 1, got {num_splits}")
    d_pad = triton.next_power_of_2(head_dim)
    # Unsplit launches (many sequences: one program per sequence and KV head) stream long tile
    # ranges: 128-key tiles, 3 stages measured fastest on an H200 (kernels.py --only decode_sweep).
    wide = num_splits == 1 and d_pad <= 128 and query.element_size() <= 2
    if block_n is None:
        block_n = 128 if wide else 64 if d_pad <= 128 and query.element_size() <= 2 else 32
    if num_stages is None:
        num_stages = 3 if wide else 2
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if num_splits > 1:
        f32 = {"dtype": torch.float32, "device": out.device}
        part_out = torch.empty((num_seqs, num_heads, num_splits, d_pad), **f32)
        part_m = torch.empty((num_seqs, num_heads, num_splits), **f32)
        part_l = torch.empty_like(part_m)
    else:
        part_out = part_m = part_l = out  # unused
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, part_out, part_m, part_l,
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, sliding_window or 0, (soft_cap or 0.0) * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, DOT_PRECISION=_precision(query.dtype),
        USE_WINDOW=sliding_window is not None, USE_SOFTCAP=soft_cap is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_m, part_l, query_start_loc, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, NUM_SPLITS=num_splits,
            num_warps=4 if d_pad * num_splits >= 4096 else 1,
        )
    return out


def unified_attention(
    out: torch.Tensor,  # [T, Hq, D]
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    num_seqs: int,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    num_heads, num_kv_heads, head_dim, block_size = _check(out, query, kv_cache)
    num_tokens = query.shape[0]
    if num_seqs == 0 or num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    d_pad = triton.next_power_of_2(head_dim)
    small = query.element_size() <= 2
    if block_m is None:
        block_m = 64 if small and d_pad <= 128 else 32
    if block_n is None:
        block_n = 64 if small and d_pad <= 128 else 32
    if num_stages is None:
        num_stages = 3 if small and d_pad <= 128 else 2
    block_m = max(block_m, 16, triton.next_power_of_2(group))
    block_q = block_m // group
    num_q_blocks = num_tokens // block_q + num_seqs  # upper bound on sum_i cdiv(q_len_i, block_q)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _unified_kernel[(num_q_blocks, num_kv_heads)](
        out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, sliding_window or 0, (soft_cap or 0.0) * LOG2E, num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, DOT_PRECISION=_precision(query.dtype),
        USE_WINDOW=sliding_window is not None, USE_SOFTCAP=soft_cap is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
