"""Launch-parameter sweep of the int4 / int8 Triton kernels (``slicelm/layers/quantization/int_kernels.py``) on
this GPU, at the projection shapes of the benchmark models; prints a table, saves the best configs to
slicelm/layers/quantization/configs/<GPU name>.json (loaded by the kernels on that GPU model from then on: commit
it) and the whole sweep to benchmarks/results/quant_sweep_<device>.json.

    python benchmarks/quant_sweep.py             # H200: ~90 s (≈40 kernel variants compile; graph-timed)
    python benchmarks/quant_sweep.py --full      # a wider grid (~4 min)
    python benchmarks/quant_sweep.py --no-gemv   # only the GEMM buckets, each also against dequantize + cuBLAS (~3 min)
    python benchmarks/quant_sweep.py --smoke     # CPU, Triton interpreter, tiny shapes: checks the script

GEMV (M = 1): time of one call from a CUDA graph of 20 calls, bytes read (packed weights + scales + zeros) per
second, as a fraction of the device-to-device copy rate of the same run. GEMM (M = 16 .. 256): time against
cuBLAS bf16 at the same M and against dequantize + cuBLAS (what runs past GEMM_MAX_M) with slabs of 8 to 64 MiB of
dequantized rows (small ones stay in L2 for cuBLAS to read); a bucket where the latter wins records its best slab.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {  # (N, K) of qkv, o, gate_up, down
    "llama-3.1-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "qwen2.5-7b": [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)],
}


def _graph_time_us(fn, iters: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / iters)
    return best


def _time_us(fn, smoke: bool) -> float:
    if smoke:
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return _graph_time_us(fn)


def _weights(n: int, k: int, bits: int, group: int, device: str):
    import torch

    from slicelm.layers.quantization.int_weights import pack_rows

    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device)
    scales = (torch.rand(n, k // group, device=device) * 2e-3 + 5e-4).half()
    zeros = torch.randint(0, 1 << bits, (n, k // group), dtype=torch.uint8, device=device)
    return pack_rows(q, bits), scales, zeros


def gemv_grid(full: bool, smoke: bool) -> list[tuple[int, int, int, int, int]]:
    if smoke:
        return [(16, 16, 1, 4, 1), (16, 16, 2, 4, 1)]
    bns, bkws, splits = ((32, 64, 128), (16, 32, 64), (1, 2, 4, 8, 16)) if full else ((64, 128), (32, 64),
                                                                                      (1, 2, 4, 8, 16))
    warps, stages = ((4, 8), (2, 3, 4)) if full else ((4,), (2, 3))
    return list(itertools.product(bns, bkws, splits, warps, stages))


def gemm_grid(full: bool, smoke: bool) -> list[tuple[int, ...]]:
    """(BLOCK_N, BLOCK_K, warps, stages, SPLIT_K, SWAP_AB) of the fused GEMM (the quick grid: 8 warps unless W is
    the first operand, where one warpgroup per 64 rows of N can be enough)."""
    if smoke:
        return [(32, 64, 4, 1, 1, 0), (32, 64, 4, 1, 2, 1)]
    if full:
        return list(itertools.product((32, 64, 128, 256), (64, 128), (4, 8), (2, 3, 4), (1, 2, 4, 8, 16), (0, 1)))
    return [*itertools.product((64, 128), (64, 128), (8,), (3,), (1, 2, 4, 8), (0,)),
            *itertools.product((64, 128), (64, 128), (4, 8), (3,), (1, 2, 4, 8), (1,))]


def sweep_gemv(shapes, bits, group, args, device, bandwidth) -> tuple[list[dict], dict]:
    import torch

    from slicelm.layers.quantization import int_kernels

    rows, tuned = [], {}
    for n, k in shapes:
        w_q, scales, zeros = _weights(n, k, bits, group, device)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        nbytes = w_q.numel() * 4 + scales.numel() * 2 + zeros.numel()
        default = int_kernels.gemv_config(bits, group, n, k, int_kernels._num_sms(x.device))
        best = None
        for cfg in dict.fromkeys([default, *gemv_grid(args.full, args.smoke)]):
            if (cfg[1] * (32 // bits)) % group:
                continue
            try:
                us = _time_us(functools.partial(int_kernels.int_linear, x, w_q, scales, zeros, bits, k, None, cfg),
                              args.smoke)
            except Exception as e:  # a config that does not compile / fit (shared memory, registers)
                print(f"  gemv {n}x{k} {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            row = {"kind": "gemv", "n": n, "k": k, "config": list(cfg), "us": us, "default": cfg == default,
                   "gb_per_s": nbytes / us / 1e3,
                   "fraction_of_copy_rate": nbytes / (us * 1e-6) / bandwidth if bandwidth else None}
            rows.append(row)
            if best is None or us < best["us"]:
                best = row
        if best is not None:
            tuned[("gemv", bits, group, n, k)] = tuple(best["config"])
            dflt = next(r for r in rows if r["n"] == n and r["k"] == k and r["default"])
            print(f"gemv {n:>6}x{k:<6} best {best['config']} {best['us']:8.1f} us "
                  f"{best['gb_per_s']:7.0f} GB/s ({100 * (best['fraction_of_copy_rate'] or 0):5.1f}% of copy); "
                  f"default {dflt['config']} {dflt['us']:8.1f} us", flush=True)
    return rows, tuned


SLAB_MIB = (8, 16, 32, 64)  # dequantize + cuBLAS slab sizes tried per bucket (H200's L2: 50 MiB; 64 = the default)


def _dequant_matmul(x, w_q, scales, zeros, bits: int, k: int, rows: int):
    """What ``int_linear`` runs for a dequantize bucket: W dequantized ``rows`` rows at a time into the shared
    scratch, cuBLAS per slab."""
    import torch

    from slicelm.layers.quantization import int_dequant

    out = torch.empty((x.shape[0], w_q.shape[0]), dtype=x.dtype, device=x.device)
    return int_dequant.dequant_matmul(x, w_q, scales, zeros, bits, k, None, out, rows=rows)


def _time_dequant(x, w_q, scales, zeros, bits: int, k: int, smoke: bool) -> dict[int, float]:
    """Dequantize + cuBLAS time per slab row count (distinct counts of ``SLAB_MIB``, 32-row multiples)."""
    n = w_q.shape[0]
    counts = sorted({min(n, max(32, (mib << 20) // (k * x.element_size()) // 32 * 32))
                     for mib in ((1,) if smoke else SLAB_MIB)})
    return {rows: _time_us(functools.partial(_dequant_matmul, x, w_q, scales, zeros, bits, k, rows), smoke)
            for rows in counts}


def sweep_gemm(shapes, bits, group, args, device) -> tuple[list[dict], dict]:
    import torch

    from slicelm.layers.quantization import int_dequant, int_kernels

    rows, tuned = [], {}
    ms = (16,) if args.smoke else (16, 64, 128, 256)
    for (n, k), m in itertools.product(shapes, ms):
        w_q, scales, zeros = _weights(n, k, bits, group, device)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16 if not args.smoke else torch.float16)
        w16 = int_dequant.dequantize_weight(w_q, scales, zeros, bits, k, x.dtype)
        num_sms = int_kernels._num_sms(x.device)
        by_rows = _time_dequant(x, w_q, scales, zeros, bits, k, args.smoke)
        slab = min(by_rows, key=by_rows.get)
        ref = {"cublas_16bit_us": _time_us(functools.partial(torch.nn.functional.linear, x, w16), args.smoke),
               "dequant_cublas_us": by_rows[slab], "dequant_slab_rows": slab,
               "dequant_cublas_us_by_slab_rows": {str(r): us for r, us in by_rows.items()}}
        best = None
        for bn, bk, nw, ns, split, swap in gemm_grid(args.full, args.smoke):
            if bk % min(group, bk) or (group > bk and group % bk):
                continue
            if split * m * n * 4 > int_kernels.SPLIT_K_WORKSPACE_BYTES:  # int_linear would shrink the split
                continue
            cfg = (int_kernels.gemm_config(bits, group, m, n, k, num_sms)[0], bn, bk, nw, ns, split, swap)
            try:
                us = _time_us(functools.partial(int_kernels.int_linear, x, w_q, scales, zeros, bits, k, None, cfg),
                              args.smoke)
            except Exception as e:
                print(f"  gemm {m}x{n}x{k} {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            row = {"kind": "gemm", "m": m, "n": n, "k": k, "config": list(cfg), "us": us, **ref}
            rows.append(row)
            if best is None or us < best["us"]:
                best = row
        if best is not None:
            key = (f"gemm{best['config'][0]}", bits, group, n, k)
            # (0, ROWS, 0, 0): this M bucket runs dequantize + cuBLAS in slabs of ROWS weight rows, faster here than
            # the best fused tile
            dequant = ref["dequant_cublas_us"] < best["us"]
            tuned[key] = (0, slab, 0, 0) if dequant else tuple(best["config"][1:])
            print(f"gemm M={m:<4} {n:>6}x{k:<6} best {best['config']} {best['us']:8.1f} us; cuBLAS 16-bit "
                  f"{ref['cublas_16bit_us']:8.1f} us, dequant+cuBLAS {ref['dequant_cublas_us']:8.1f} us "
                  f"(slabs of {slab} rows) -> {'dequant+cuBLAS' if dequant else 'fused'}", flush=True)
    return rows, tuned


def save_device_configs(tuned: dict, device_name: str) -> None:
    """Merges the best configs into ``int_configs.config_file(<this GPU>)``, which the kernels load on their
    first call on a GPU of that name (commit the file to keep it)."""
    from slicelm.layers.quantization import int_configs

    path = int_configs.config_file(device_name)
    table = json.loads(path.read_text()) if path.is_file() else {}
    table.update({int_configs.config_key(key): list(cfg) for key, cfg in tuned.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    print(f"saved {len(tuned)} tuned configs to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-3.1-8b", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--full", action="store_true", help="the wider grid")
    ap.add_argument("--no-gemm", action="store_true", help="only the M=1 GEMV")
    ap.add_argument("--no-gemv", action="store_true", help="only the fused GEMM (2 <= M <= 256)")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from utils_triton import patch_interpreter

        patch_interpreter()
    from common import environment, measure_copy_bandwidth, save_result

    env = environment()
    device = "cpu" if args.smoke else "cuda"
    bandwidth = None if args.smoke else measure_copy_bandwidth()
    shapes = [(96, 512), (64, 256)] if args.smoke else [s for name in args.shapes.split(",") for s in SHAPES[name]]
    gemv_rows, tuned = ([], {}) if args.no_gemv else sweep_gemv(shapes, args.bits, args.group, args, device,
                                                                  bandwidth)
    gemm_rows: list[dict] = []
    if not args.no_gemm:
        gemm_rows, gemm_tuned = sweep_gemm(shapes, args.bits, args.group, args, device)
        tuned.update(gemm_tuned)
    if not args.smoke:
        save_device_configs(tuned, env["device"])
    part = "_gemm" if args.no_gemv else "_gemv" if args.no_gemm else ""
    save_result("quant_sweep" + part, {**env, "workload": {"shapes": shapes, "bits": args.bits, "group": args.group,
                                                    "grid": "full" if args.full else "quick"},
                                "copy_bandwidth_bytes_per_s": bandwidth, "gemv": gemv_rows, "gemm": gemm_rows,
                                "tuned": {repr(k): list(v) for k, v in tuned.items()}})


if __name__ == "__main__":
    main()
