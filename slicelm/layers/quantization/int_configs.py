"""Launch parameters of the int4 / int8 kernels (``int_kernels.py``): the defaults (``gemv_config``,
``gemm_config``) and ``TUNED`` — filled, on the first call on a GPU, from ``configs/<GPU name>.json`` when
``benchmarks/quant_sweep.py`` wrote one for that GPU model (as vLLM ships fused-MoE configs per device), and by
hand (entries set by hand win)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import triton

# (kind, bits, group, N, K) -> launch parameters; kind "gemv": (BLOCK_N, BLOCK_KW, SPLIT_K, warps, stages),
# kind "gemm<BLOCK_M>": (BLOCK_N, BLOCK_K, warps, stages, SPLIT_K, SWAP_AB), or (0, ROWS, 0, 0) where dequantize +
# cuBLAS was faster, in slabs of ROWS weight rows (0: the default slab).
TUNED: dict[tuple[str, int, int, int, int], tuple[int, ...]] = {}
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_file(device_name: str) -> Path:
    """Where ``benchmarks/quant_sweep.py`` saves the tuned launch parameters of one GPU model."""
    return CONFIG_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def config_key(key: tuple[str, int, int, int, int]) -> str:
    return ",".join(map(str, key))


@functools.cache
def load_device_configs(device_name: str) -> int:
    """Adds the saved configs of ``device_name`` to ``TUNED`` (entries set by hand win); returns how many."""
    path = config_file(device_name)
    if not path.is_file():
        return 0
    table = json.loads(path.read_text())
    for text, cfg in table.items():
        kind, *dims = text.split(",")
        key = (kind, *map(int, dims))
        assert len(key) == 5 and all(isinstance(v, int) for v in cfg), (path, text, cfg)
        TUNED.setdefault(key, tuple(cfg))  # type: ignore[arg-type]
    return len(table)


def gemv_config(bits: int, group: int, n: int, k: int, num_sms: int) -> tuple[int, int, int, int, int]:
    """``(BLOCK_N, BLOCK_KW, SPLIT_K, num_warps, num_stages)`` for M = 1.

    32 words per row per step (16-byte loads, 4 threads a row) and 128 rows: each thread holds 8 rows, so the
    per-x work (bf16 -> f32, sums) is shared by 8 rows — the inner loop is ~3.1 instructions per 4-bit weight
    on sm_90 (compiled and counted), under the issue rate that reading at full bandwidth needs. Split K until
    there are >= 3 programs per SM (each split keeps >= 1 step): the o/down projections of a 7B model have
    only 32 tiles of 128 rows.
    """
    tuned = TUNED.get(("gemv", bits, group, n, k))
    if tuned is not None:
        return tuned  # type: ignore[return-value]
    block_kw = 32
    while 0 < group < k and block_kw * (32 // bits) % group:  # steps hold whole groups (per-channel: any)
        block_kw *= 2
    block_n = 128 if n >= 2048 else 64 if n >= 512 else 16
    tiles = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_kw * (32 // bits))
    split = 1
    while tiles * split < 3 * num_sms and steps // (split * 2) >= 1 and split < 16:
        split *= 2
    split = triton.cdiv(steps, triton.cdiv(steps, split))  # no empty split
    return block_n, block_kw, split, 4, 3


def gemm_config(bits: int, group: int, m: int, n: int, k: int,
                num_sms: int) -> tuple[int, int, int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K, SWAP_AB)`` for 2 <= M <= GEMM_MAX_M;
    ``BLOCK_N == 0`` where the per-device sweep found dequantize + cuBLAS faster for this M bucket and shape
    (``BLOCK_K`` is then its slab's weight rows, 0 for the default). Untuned: K is split until there are two
    programs per SM (each slice keeping >= 4 steps of BLOCK_K)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128 if m <= 128 else 256
    tuned = TUNED.get((f"gemm{block_m}", bits, group, n, k))
    if tuned is not None:  # entries saved before split-K / swap have 4 / 5 values
        return (block_m, *tuned, *(1, 0)[len(tuned) - 4:])  # type: ignore[return-value]
    group = k if group == -1 else group
    block_k = 128 if group >= 128 else max(group, 64)
    block_n = 64 if block_m <= 64 or block_m == 256 else 128
    warps = 8 if block_m >= 128 else 4  # 128 x 128 or 256 x 64 float32 accumulators over 256 threads
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    split = 1
    while tiles * split < 2 * num_sms and steps // (split * 2) >= 4 and split < 8:
        split *= 2
    return block_m, block_n, block_k, warps, 3, split, 0
