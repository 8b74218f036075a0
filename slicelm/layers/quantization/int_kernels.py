"""Triton kernels for int4 / int8 weight-only linears (AWQ, GPTQ, compressed-tensors), on the internal layout
of ``int_weights.py``: ``w_q [N, K / pack]`` int32 (values sequential along K), ``w_scales / w_zeros [N, groups]``.

* ``M == 1`` (batch-1 decode) — ``_gemv_kernel``: bound by reading the packed weight. A program owns
  ``BLOCK_N`` rows and streams ``BLOCK_KW`` words per row per step (coalesced 16-byte loads). Values become
  float32 without integer->float conversion instructions (``(v | 0x4B000000)`` read as a float is
  ``2**23 + v``), are multiplied by x in registers and summed per word, then per group:
  ``acc += s * (sum_k q x - z * sum_k x)`` — the zero point and scale cost one operation per group, not per
  weight. ``SPLIT_K > 1`` cuts K into slices whose partial sums go to a float32 workspace; the last slice of
  an N tile to finish (an atomic ticket per tile, reset by that program) adds them up in slice order, so one
  launch, deterministic, and CUDA-graph safe.
* ``2 <= M <= GEMM_MAX_M`` — ``_gemm_kernel``: the weight tile is dequantized inside the K loop to x's dtype
  and multiplied on tensor cores (``tl.dot``). A 4096-wide projection has only 32 to 64 output tiles: split K
  (as the GEMV, same deterministic tickets) so that the SMs are busy instead of each tile walking all of K.
* larger M (prefill chunks), and M buckets the sweep found faster so — dequantize + cuBLAS (``int_dequant.py``).

Shared Triton pieces (bit tricks, weight tiles): ``int_tiles.py``. Launch parameters: ``int_configs.py``
(defaults, and tuned tables per GPU model).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from slicelm.layers.quantization.int_configs import gemm_config, gemv_config, load_device_configs
from slicelm.layers.quantization.int_dequant import dequant_matmul
from slicelm.layers.quantization.int_tiles import (
    ONE_BITS,
    dequant_words,
    exponents,
    gemm_tile_offsets,
    load_tile,
    planes,
    scaled_x,
    store_gemm_tile,
    x_tile,
)

GEMM_MAX_M = 256
_DTYPES = (torch.float16, torch.bfloat16)

@triton.jit(do_not_specialize=["N", "K", "ONE"])
def _gemv_kernel(X, WQ, S, Z, B, OUT, WS, LOCK, N, K, stride_w, stride_s, ONE,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_KW * PACK
    VEC: tl.constexpr = 4  # words per 16-byte load: partial sums are taken per 4-word chunk (in one thread)
    CHUNKS: tl.constexpr = BLOCK_KW // VEC
    ONE_GROUP: tl.constexpr = GROUP == 0  # per-channel scales (the host passes GROUP=0)
    tl.static_assert(ONE_GROUP or BLOCK_K % GROUP == 0)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamp instead of masking the loads
    offs_w = tl.arange(0, BLOCK_KW)
    offs_j = tl.arange(0, PACK)
    offs_c = tl.arange(0, CHUNKS)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    e = exponents(offs_j, BITS)
    acc = tl.zeros((BLOCK_N, CHUNKS), tl.float32)
    w_ptrs = WQ + rows[:, None] * stride_w + (k_lo // PACK + offs_w)[None, :]
    x_ptrs = X + k_lo + offs_w[:, None] * PACK + offs_j[None, :]
    if ONE_GROUP:
        s_off = rows[:, None] * stride_s + offs_c[None, :] * 0
    else:
        s_off = rows[:, None] * stride_s + (k_lo // GROUP + offs_c * (VEC * PACK) // GROUP)[None, :]
    s_ptrs = S + s_off
    z_ptrs = Z + s_off
    s = tl.zeros((BLOCK_N, CHUNKS), tl.float32)
    if HAS_ZP:
        z = tl.zeros((BLOCK_N, CHUNKS), tl.float32)
    else:
        z = (1 << (BITS - 1)) * 1.0
    if ONE_GROUP:  # loaded once (row offsets only: valid even for an empty split)
        s = tl.load(s_ptrs).to(tl.float32)
        if HAS_ZP:
            z = tl.load(z_ptrs).to(tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)  # [BLOCK_KW, PACK]
        else:
            kw = k0 // PACK + offs_w
            w = tl.load(w_ptrs, mask=(kw < K // PACK)[None, :], other=0)
            x = tl.load(x_ptrs, mask=(kw < K // PACK)[:, None], other=0.0)
        xs = scaled_x(x, e)  # x_j * 2**(23 - P_j): f_j * xs_j = xs_j + q_j * x_j
        part = tl.sum(planes(w.to(tl.uint32, bitcast=True), BITS, ONE) * xs[None, :, :], axis=2)
        part = tl.sum(tl.reshape(part, (BLOCK_N, CHUNKS, VEC)), axis=2)  # per 4-word chunk (one thread's)
        sum_xs = tl.sum(tl.reshape(tl.sum(xs, axis=1), (CHUNKS, VEC)), axis=1)
        sum_x = tl.sum(tl.reshape(tl.sum(x.to(tl.float32), axis=1), (CHUNKS, VEC)), axis=1)
        if not ONE_GROUP:
            if EVEN_K:
                s = tl.load(s_ptrs).to(tl.float32)
                if HAS_ZP:
                    z = tl.load(z_ptrs).to(tl.float32)
            else:
                c_ok = (k0 + offs_c * (VEC * PACK) < K)[None, :]
                s = tl.load(s_ptrs, mask=c_ok, other=0.0).to(tl.float32)
                if HAS_ZP:
                    z = tl.load(z_ptrs, mask=c_ok, other=0).to(tl.float32)
            s_ptrs += BLOCK_K // GROUP
            if HAS_ZP:
                z_ptrs += BLOCK_K // GROUP
        # sum_k (q - z) x = sum f * xs - sum xs - z * sum x
        acc += (part - sum_xs[None, :] - z * sum_x[None, :]) * s
        w_ptrs += BLOCK_KW
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    n_mask = offs_n < N
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(B + rows).to(tl.float32)
        tl.store(OUT + offs_n, y.to(OUT.dtype.element_ty), mask=n_mask)
    else:
        tl.store(WS + pid_k * N + offs_n, y, mask=n_mask)
        tl.debug_barrier()
        ticket = tl.atomic_add(LOCK + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # the last slice of this tile: sum the slices in order
            total = tl.zeros((BLOCK_N,), tl.float32)
            for i in range(SPLIT_K):
                total += tl.load(WS + i * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(B + rows).to(tl.float32)
            tl.store(OUT + offs_n, total.to(OUT.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(LOCK + pid_n, 0)


@triton.jit(do_not_specialize=["M", "N", "K", "ONE"])
def _gemm_kernel(X, WQ, S, Z, B, OUT, WS, LOCK, M, N, K, stride_xm, stride_om, stride_w, stride_s, ONE,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 SWAP_AB: tl.constexpr):
    offs_m, offs_n, rows, offs_k, m_mask = gemm_tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_lo + k_per_split, K)
    if SWAP_AB:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    w, s, z = load_tile(WQ, S, Z, rows, k_lo, k_end, stride_w, stride_s, BITS, GROUP, HAS_ZP, BLOCK_K)
    for k0 in range(k_lo, k_end, BLOCK_K):
        x = x_tile(X, offs_m, m_mask, k0 + offs_k, K, stride_xm)
        # the next tile's words are requested before this one is converted (the pipeliner only stages loads that
        # feed a dot directly), so their latency hides behind this step's work
        w_next, s_next, z_next = load_tile(WQ, S, Z, rows, k0 + BLOCK_K, k_end, stride_w, stride_s, BITS, GROUP,
                                            HAS_ZP, BLOCK_K)
        wt = dequant_words(w, s, z, ONE, BITS, GROUP, HAS_ZP, BLOCK_N, BLOCK_K).to(x.dtype)
        if SWAP_AB:  # W as the dot's first operand: straight from registers into the MMA, N fills its 64 rows
            acc_t = tl.dot(wt, tl.trans(x), acc_t)
        else:
            acc = tl.dot(x, tl.trans(wt), acc)
        w, s, z = w_next, s_next, z_next
    if SWAP_AB:
        acc = tl.trans(acc_t)
    if SPLIT_K == 1:
        store_gemm_tile(OUT, acc, B, rows, offs_m, offs_n, m_mask, N, stride_om, HAS_BIAS)
    else:
        _reduce_split_k(OUT, WS, LOCK, B, acc, rows, offs_m, offs_n, m_mask, M, N, stride_om, HAS_BIAS, BLOCK_M,
                        BLOCK_N, SPLIT_K)


@triton.jit
def _reduce_split_k(OUT, WS, LOCK, B, acc, rows, offs_m, offs_n, m_mask, M, N, stride_om, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """As the GEMV: this slice's partial tile to the workspace; the last slice of the tile to finish sums them in
    slice order (SUB_M rows at a time: a second whole tile would not fit in registers) and resets its ticket."""
    ok = m_mask[:, None] & (offs_n < N)[None, :]  # int32 offsets: M * N * SPLIT_K is bounded by the host
    tl.store(WS + tl.program_id(2) * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=ok)
    tl.debug_barrier()
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    ticket = tl.atomic_add(LOCK + tile, 1, sem="acq_rel")
    if ticket == SPLIT_K - 1:
        SUB_M: tl.constexpr = 16 if BLOCK_M > 16 else BLOCK_M
        for j in range(0, BLOCK_M, SUB_M):
            sub_m = tl.program_id(0) * BLOCK_M + j + tl.arange(0, SUB_M)
            sub_ok = (sub_m < M)[:, None] & (offs_n < N)[None, :]
            total = tl.zeros((SUB_M, BLOCK_N), tl.float32)
            for i in range(SPLIT_K):
                total += tl.load(WS + i * M * N + sub_m[:, None] * N + offs_n[None, :], mask=sub_ok, other=0.0,
                                 cache_modifier=".cg")
            store_gemm_tile(OUT, total, B, rows, sub_m, offs_n, sub_m < M, N, stride_om, HAS_BIAS)
        tl.atomic_xchg(LOCK + tile, 0)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        load_device_configs(torch.cuda.get_device_name(device))
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16  # CPU tensors only reach here under TRITON_INTERPRET=1


def supported(x: torch.Tensor) -> bool:
    return x.dtype in _DTYPES and x.dim() == 2 and not (torch.is_grad_enabled() and x.requires_grad)


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tickets for split-K (each finishing tile resets its own to 0); grown, never shrunk."""
    t = _LOCKS.get(device)
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _LOCKS[device] = t
    return t


def int_linear(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               k: int, bias: torch.Tensor | None, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T + bias`` for the packed ``w_q [N, K/pack]``: GEMV, fused GEMM or dequant + cuBLAS."""
    m, n = x.shape[0], w_q.shape[0]
    group = k // scales.shape[1]
    num_sms = _num_sms(x.device)  # (on a GPU: its saved configs are in TUNED from here on)
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    zp = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    common = {"BITS": bits, "GROUP": group, "HAS_ZP": zeros is not None, "HAS_BIAS": bias is not None}
    if m == 1:
        bn, bkw, split, nw, ns = config or gemv_config(bits, group, n, k, num_sms)
        tiles = triton.cdiv(n, bn)
        ws = torch.empty((split, n), dtype=torch.float32, device=x.device) if split > 1 else out
        lock = _locks(x.device, tiles) if split > 1 else out
        block_k = bkw * (32 // bits)
        if group != k and block_k % group:
            raise ValueError(f"gemv config {config}: BLOCK_KW * pack = {block_k} must be a multiple of group {group}")
        even = k % (block_k * split) == 0
        gemv_common = {**common, "GROUP": 0 if group == k else group}
        _gemv_kernel[(tiles, split)](x, w_q, scales, zp, b, out, ws, lock, n, k, w_q.stride(0), scales.stride(0),
                                     ONE_BITS, EVEN_K=even, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=split, num_warps=nw,
                                     num_stages=ns, **gemv_common)
        return out
    if m > GEMM_MAX_M:
        return dequant_matmul(x, w_q, scales, zeros, bits, k, bias, out)
    bm, bn, bk, nw, ns, split, swap = _gemm_launch(config, bits, group, m, n, k, num_sms)
    if bn:  # bn == 0: a tuned bucket where dequantize + cuBLAS is faster
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
        ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
        lock = _locks(x.device, grid[0] * grid[1]) if split > 1 else out
        _gemm_kernel[grid](x, w_q, scales, zp, b, out, ws, lock, m, n, k, x.stride(0), out.stride(0), w_q.stride(0),
                           scales.stride(0), ONE_BITS, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                           SWAP_AB=bool(swap), num_warps=nw, num_stages=ns, **common)
        return out
    return dequant_matmul(x, w_q, scales, zeros, bits, k, bias, out, rows=bk or None)  # a tuned bucket's slab rows


def _gemm_launch(config: tuple[int, ...] | None, bits: int, group: int, m: int, n: int, k: int,
                 num_sms: int) -> tuple[int, int, int, int, int, int, int]:
    """The fused GEMM's ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K, SWAP_AB)`` (``config`` may leave out
    the last two: no split, no swap); the split shrinks until its float32 workspace fits
    ``SPLIT_K_WORKSPACE_BYTES``."""
    bm, bn, bk, nw, ns, split, swap = (*config, *(1, 0)[len(config) - 5:]) if config else \
        gemm_config(bits, group, m, n, k, num_sms)
    while split > 1 and split * m * n * 4 > SPLIT_K_WORKSPACE_BYTES:
        split //= 2
    return bm, bn, bk, nw, ns, split, swap


SPLIT_K_WORKSPACE_BYTES = 32 << 20  # the fused GEMM's split-K partial tiles (float32), per call at most
