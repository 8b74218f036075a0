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
* larger M (prefill chunks) — ``_dequant_kernel`` writes W, ``DEQUANT_SCRATCH_BYTES`` of rows at a time, to one
  shared scratch in x's dtype and cuBLAS multiplies each slab into its columns of the output (what vLLM does past
  256 tokens, without a full-weight temporary): the dequantization is then a small fraction of the matmul.

Launch parameters: ``int_configs.py`` (defaults, and tuned tables per GPU model).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from slicelm.layers.quantization.int_configs import gemm_config, gemv_config, load_device_configs

GEMM_MAX_M = 256
ONE_BITS = 0x3F800000  # float32 bits of 1.0, passed at run time (see _field)
_DTYPES = (torch.float16, torch.bfloat16)

@triton.jit
def _field(v, P: tl.constexpr, BITS: tl.constexpr, ONE):
    """The BITS-bit field of ``v`` at bit P (8 <= P <= 23 - BITS) as the float ``1 + q * 2**(P - 23)``, exactly:
    the field becomes mantissa bits of 1.0 (``ONE`` holds 1.0's bits; a runtime value, so that and + or is one
    LOP3 instruction)."""
    return ((v & (((1 << BITS) - 1) << P)) | ONE).to(tl.float32, bitcast=True)


@triton.jit
def _planes(w, BITS: tl.constexpr, ONE):
    """uint32 words [R, C] -> float32 [R, C, 32 // BITS]: value j of each word as ``1 + q_j * 2**(P_j - 23)``
    with ``P_j`` from ``_exponents``. Each value is used at bit 8, 12 or 16 (2 shifts per word for 8 values, no
    integer->float conversions), high enough in the mantissa that ``f - 1`` keeps ~2**-15 relative precision."""
    if BITS == 4:
        lo = w << 12  # values 0, 1 at bits 12, 16
        hi = w >> 12  # values 5, 6, 7 at bits 8, 12, 16
        v0 = _field(lo, 12, 4, ONE)
        v1 = _field(lo, 16, 4, ONE)
        v2 = _field(w, 8, 4, ONE)
        v3 = _field(w, 12, 4, ONE)
        v4 = _field(w, 16, 4, ONE)
        v5 = _field(hi, 8, 4, ONE)
        v6 = _field(hi, 12, 4, ONE)
        v7 = _field(hi, 16, 4, ONE)
        # join's new axis is the minor one: this tree puts value j at position j
        out = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        out = tl.reshape(out, (w.shape[0], w.shape[1], 8))
    else:
        v0 = _field(w << 12, 12, 8, ONE)
        v1 = _field(w << 4, 12, 8, ONE)
        v2 = _field(w >> 4, 12, 8, ONE)
        v3 = _field(w >> 12, 12, 8, ONE)
        out = tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (w.shape[0], w.shape[1], 4))
    return out


@triton.jit
def _exponents(offs_j, BITS: tl.constexpr):
    """``23 - P_j`` for each value position j of ``_planes``: ``(f_j - 1) * 2**(23 - P_j) = q_j``."""
    if BITS == 4:  # P = 12, 16, 8, 12, 16, 8, 12, 16
        e = tl.where((offs_j == 2) | (offs_j == 5), 15, tl.where((offs_j == 1) | (offs_j == 4) | (offs_j == 7), 7, 11))
    else:
        e = offs_j * 0 + 11
    return e


@triton.jit
def _scaled_x(x, e):
    """float32 ``x * 2**e`` (``e`` [PACK] broadcast over x's last axis): bf16 -> f32 and the power of two in one
    integer multiply-add on the bits (exact for any finite x of an activation's range)."""
    if x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) * 65536 + (e[None, :] << 23).to(tl.uint32)
        xs = bits.to(tl.float32, bitcast=True)
    else:
        xs = x.to(tl.float32) * tl.exp2(e[None, :].to(tl.float32))
    return xs


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
    e = _exponents(offs_j, BITS)
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
        xs = _scaled_x(x, e)  # x_j * 2**(23 - P_j): f_j * xs_j = xs_j + q_j * x_j
        part = tl.sum(_planes(w.to(tl.uint32, bitcast=True), BITS, ONE) * xs[None, :, :], axis=2)
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


@triton.jit
def _load_tile(WQ, S, Z, rows, k0, k_end, stride_w, stride_s, BITS: tl.constexpr, GROUP: tl.constexpr,
               HAS_ZP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The packed words, scales and zero points of W[rows, k0:k0+BLOCK_K] (nothing read at or past ``k_end``)."""
    PACK: tl.constexpr = 32 // BITS
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    kw = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    w = tl.load(WQ + rows[:, None] * stride_w + kw[None, :], mask=(kw < k_end // PACK)[None, :], other=0)
    offs_g = k0 + tl.arange(0, BLOCK_K // SUB) * SUB
    g_ok = (offs_g < k_end)[None, :]
    s = tl.load(S + rows[:, None] * stride_s + (offs_g // GROUP)[None, :], mask=g_ok, other=0.0)
    if HAS_ZP:
        z = tl.load(Z + rows[:, None] * stride_s + (offs_g // GROUP)[None, :], mask=g_ok, other=0)
    else:
        z = s  # unused
    return w, s, z


@triton.jit
def _dequant_words(w, s, z, ONE, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_load_tile``'s words as float32 W [BLOCK_N, BLOCK_K]."""
    PACK: tl.constexpr = 32 // BITS
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    f = _planes(w.to(tl.uint32, bitcast=True), BITS, ONE)
    q = (f - 1.0) * tl.exp2(_exponents(tl.arange(0, PACK), BITS).to(tl.float32))[None, None, :]
    q = tl.reshape(q, (BLOCK_N, BLOCK_K // SUB, SUB))
    if HAS_ZP:
        w_f = (q - z.to(tl.float32)[:, :, None]) * s.to(tl.float32)[:, :, None]
    else:
        w_f = (q - (1 << (BITS - 1)) * 1.0) * s.to(tl.float32)[:, :, None]
    return tl.reshape(w_f, (BLOCK_N, BLOCK_K))


@triton.jit
def _dequant_tile(WQ, S, Z, rows, k0, K, stride_w, stride_s, ONE, BITS: tl.constexpr, GROUP: tl.constexpr,
                  HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rows, k0:k0+BLOCK_K] as float32 [BLOCK_N, BLOCK_K] (zero outside K)."""
    w, s, z = _load_tile(WQ, S, Z, rows, k0, K, stride_w, stride_s, BITS, GROUP, HAS_ZP, BLOCK_K)
    return _dequant_words(w, s, z, ONE, BITS, GROUP, HAS_ZP, BLOCK_N, BLOCK_K)


@triton.jit
def gemm_tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's output rows / columns (and the weight rows read, clamped into N), K offsets, row mask."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, tl.minimum(offs_n, N - 1).to(tl.int64), tl.arange(0, BLOCK_K), offs_m < M


@triton.jit
def store_gemm_tile(OUT, acc, B, rows, offs_m, offs_n, m_mask, N, stride_om, HAS_BIAS: tl.constexpr):
    """``acc (+ bias)`` into ``OUT`` in its dtype."""
    if HAS_BIAS:
        acc += tl.load(B + rows).to(tl.float32)[None, :]
    tl.store(OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=m_mask[:, None] & (offs_n < N)[None, :])


@triton.jit
def x_tile(X, offs_m, m_mask, offs_k, K, stride_xm):
    """Rows ``offs_m`` (masked by ``m_mask``), columns ``offs_k`` (< K) of the activations (zeros outside)."""
    return tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                   mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)


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
    w, s, z = _load_tile(WQ, S, Z, rows, k_lo, k_end, stride_w, stride_s, BITS, GROUP, HAS_ZP, BLOCK_K)
    for k0 in range(k_lo, k_end, BLOCK_K):
        x = x_tile(X, offs_m, m_mask, k0 + offs_k, K, stride_xm)
        # the next tile's words are requested before this one is converted (the pipeliner only stages loads that
        # feed a dot directly), so their latency hides behind this step's work
        w_next, s_next, z_next = _load_tile(WQ, S, Z, rows, k0 + BLOCK_K, k_end, stride_w, stride_s, BITS, GROUP,
                                            HAS_ZP, BLOCK_K)
        wt = _dequant_words(w, s, z, ONE, BITS, GROUP, HAS_ZP, BLOCK_N, BLOCK_K).to(x.dtype)
        if SWAP_AB:  # W as the dot's first operand: straight from registers into the MMA, N fills its 64 rows
            acc_t = tl.dot(wt, tl.trans(x), acc_t)
        else:
            acc = tl.dot(x, tl.trans(wt), acc)
        w, s, z = w_next, s_next, z_next
    if SWAP_AB:
        acc = tl.trans(acc_t)
    if SPLIT_K == 1:
        store_gemm_tile(OUT, acc, B, rows, offs_m, offs_n, m_mask, N, stride_om, HAS_BIAS)
    else:  # as the GEMV: partial tiles to the workspace, the last slice of the tile sums them in slice order
        ok = m_mask[:, None] & (offs_n < N)[None, :]  # int32 offsets: M * N * SPLIT_K is bounded by the host
        tl.store(WS + tl.program_id(2) * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=ok)
        tl.debug_barrier()
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        ticket = tl.atomic_add(LOCK + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # SUB_M rows at a time: a whole second tile would not fit in registers
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


@triton.jit(do_not_specialize=["ONE"])
def _dequant_kernel(WQ, S, Z, OUT, N, K, stride_w, stride_s, stride_o, ONE, BITS: tl.constexpr, GROUP: tl.constexpr,
                    HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w = _dequant_tile(WQ, S, Z, rows, k0, K, stride_w, stride_s, ONE, BITS, GROUP, HAS_ZP, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(OUT + rows[:, None] * stride_o + offs_k[None, :], w.to(OUT.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


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


@torch.no_grad()  # out= products refuse arguments that require grad (a layer's bias Parameter outside inference mode)
def dequant_matmul(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   k: int, bias: torch.Tensor | None, out: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """``out = x @ W.T + bias`` for large M, ``rows`` weight rows at a time (default: ``DEQUANT_SCRATCH_BYTES`` of
    them) dequantized into one scratch per device and dtype (allocated once, on the first large step: the memory
    profile's) — no full-size weight temporary, so no transient allocation in the step beyond ``out`` itself.
    Slabs small enough to stay in L2 are read by cuBLAS from there; ``quant_sweep.py`` picks the size per bucket."""
    n = w_q.shape[0]
    if rows is None:
        rows = DEQUANT_SCRATCH_BYTES // (k * x.element_size())
    rows = min(n, max(32, rows // 32 * 32))
    scratch = _scratch(x.device, x.dtype, rows * k)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = scratch[: (n1 - n0) * k].view(n1 - n0, k)
        _dequantize_into(w, w_q[n0:n1], scales[n0:n1], zeros[n0:n1] if zeros is not None else None, bits, k)
        if bias is None:
            torch.mm(x, w.t(), out=out[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], x, w.t(), out=out[:, n0:n1])
    return out


# the dequantized weight rows of one large-M matmul step live here (bf16: 8192 rows of K = 4096 per step)
DEQUANT_SCRATCH_BYTES = 64 << 20
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """One flat buffer per (device, dtype), grown (never shrunk) to ``numel``."""
    t = _SCRATCH.get((device, dtype))
    if t is None or t.numel() < numel:
        _SCRATCH.pop((device, dtype), None)
        t = torch.empty(max(numel, DEQUANT_SCRATCH_BYTES // dtype.itemsize), dtype=dtype, device=device)
        _SCRATCH[(device, dtype)] = t
    return t


def _dequantize_into(out: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, k: int) -> None:
    n = w_q.shape[0]
    group = k // scales.shape[1]
    block_k = max(min(group, 256), 32 // bits * 8)
    zp = zeros if zeros is not None else scales
    _dequant_kernel[(triton.cdiv(n, 32), triton.cdiv(k, block_k))](
        w_q, scales, zp, out, n, k, w_q.stride(0), scales.stride(0), out.stride(0), ONE_BITS, BITS=bits, GROUP=group,
        HAS_ZP=zeros is not None, BLOCK_N=32, BLOCK_K=block_k, num_warps=4)


def dequantize_weight(w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, k: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` (one kernel)."""
    out = torch.empty((w_q.shape[0], k), dtype=dtype, device=w_q.device)
    _dequantize_into(out, w_q, scales, zeros, bits, k)
    return out
