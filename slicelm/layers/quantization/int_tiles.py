"""The Triton building blocks the int4 / int8 kernels share (``int_kernels.py``, ``int_dequant.py``; the tile
helpers also serve ``fp8_kernels.py``): packed words -> float32 values by bit operations, a weight tile's load and
dequantization, and the activation / output tiles of a GEMM.

Values become float32 without integer->float conversion instructions: a BITS-bit field placed in the mantissa of
1.0 (``(v & mask) | ONE`` read as a float is ``1 + q * 2**(P - 23)``); the zero point and scale are applied per
group.
"""

from __future__ import annotations

import triton
import triton.language as tl

ONE_BITS = 0x3F800000  # float32 bits of 1.0, passed at run time (see field)


@triton.jit
def field(v, P: tl.constexpr, BITS: tl.constexpr, ONE):
    """The BITS-bit field of ``v`` at bit P (8 <= P <= 23 - BITS) as the float ``1 + q * 2**(P - 23)``, exactly:
    the field becomes mantissa bits of 1.0 (``ONE`` holds 1.0's bits; a runtime value, so that and + or is one
    LOP3 instruction)."""
    return ((v & (((1 << BITS) - 1) << P)) | ONE).to(tl.float32, bitcast=True)


@triton.jit
def planes(w, BITS: tl.constexpr, ONE):
    """uint32 words [R, C] -> float32 [R, C, 32 // BITS]: value j of each word as ``1 + q_j * 2**(P_j - 23)``
    with ``P_j`` from ``exponents``. Each value is used at bit 8, 12 or 16 (2 shifts per word for 8 values, no
    integer->float conversions), high enough in the mantissa that ``f - 1`` keeps ~2**-15 relative precision."""
    if BITS == 4:
        lo = w << 12  # values 0, 1 at bits 12, 16
        hi = w >> 12  # values 5, 6, 7 at bits 8, 12, 16
        v0 = field(lo, 12, 4, ONE)
        v1 = field(lo, 16, 4, ONE)
        v2 = field(w, 8, 4, ONE)
        v3 = field(w, 12, 4, ONE)
        v4 = field(w, 16, 4, ONE)
        v5 = field(hi, 8, 4, ONE)
        v6 = field(hi, 12, 4, ONE)
        v7 = field(hi, 16, 4, ONE)
        # join's new axis is the minor one: this tree puts value j at position j
        out = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        out = tl.reshape(out, (w.shape[0], w.shape[1], 8))
    else:
        v0 = field(w << 12, 12, 8, ONE)
        v1 = field(w << 4, 12, 8, ONE)
        v2 = field(w >> 4, 12, 8, ONE)
        v3 = field(w >> 12, 12, 8, ONE)
        out = tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (w.shape[0], w.shape[1], 4))
    return out


@triton.jit
def exponents(offs_j, BITS: tl.constexpr):
    """``23 - P_j`` for each value position j of ``planes``: ``(f_j - 1) * 2**(23 - P_j) = q_j``."""
    if BITS == 4:  # P = 12, 16, 8, 12, 16, 8, 12, 16
        e = tl.where((offs_j == 2) | (offs_j == 5), 15, tl.where((offs_j == 1) | (offs_j == 4) | (offs_j == 7), 7, 11))
    else:
        e = offs_j * 0 + 11
    return e


@triton.jit
def scaled_x(x, e):
    """float32 ``x * 2**e`` (``e`` [PACK] broadcast over x's last axis): bf16 -> f32 and the power of two in one
    integer multiply-add on the bits (exact for any finite x of an activation's range)."""
    if x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) * 65536 + (e[None, :] << 23).to(tl.uint32)
        xs = bits.to(tl.float32, bitcast=True)
    else:
        xs = x.to(tl.float32) * tl.exp2(e[None, :].to(tl.float32))
    return xs


@triton.jit
def load_tile(WQ, S, Z, rows, k0, k_end, stride_w, stride_s, BITS: tl.constexpr, GROUP: tl.constexpr,
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
def dequant_words(w, s, z, ONE, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``load_tile``'s words as float32 W [BLOCK_N, BLOCK_K]."""
    PACK: tl.constexpr = 32 // BITS
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    f = planes(w.to(tl.uint32, bitcast=True), BITS, ONE)
    q = (f - 1.0) * tl.exp2(exponents(tl.arange(0, PACK), BITS).to(tl.float32))[None, None, :]
    q = tl.reshape(q, (BLOCK_N, BLOCK_K // SUB, SUB))
    if HAS_ZP:
        w_f = (q - z.to(tl.float32)[:, :, None]) * s.to(tl.float32)[:, :, None]
    else:
        w_f = (q - (1 << (BITS - 1)) * 1.0) * s.to(tl.float32)[:, :, None]
    return tl.reshape(w_f, (BLOCK_N, BLOCK_K))


@triton.jit
def dequant_tile(WQ, S, Z, rows, k0, K, stride_w, stride_s, ONE, BITS: tl.constexpr, GROUP: tl.constexpr,
                  HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rows, k0:k0+BLOCK_K] as float32 [BLOCK_N, BLOCK_K] (zero outside K)."""
    w, s, z = load_tile(WQ, S, Z, rows, k0, K, stride_w, stride_s, BITS, GROUP, HAS_ZP, BLOCK_K)
    return dequant_words(w, s, z, ONE, BITS, GROUP, HAS_ZP, BLOCK_N, BLOCK_K)


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
