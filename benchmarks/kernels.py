"""Time the Triton paged attention kernels on CUDA; write benchmarks/results/kernels_<device>.json.

Decode: batch 1..256 x context 512..8192 for the Qwen3-0.6B (8 KV / 16 q heads, D 128) and
Llama-8B (8 KV / 32 q heads, D 128) shapes in bf16, block size 16, shuffled block tables. Figure:
median time (triton.testing.do_bench), KV bytes read / time, and that over the device-to-device
copy bandwidth (bytes read + written) measured first. Inputs rotate among several KV caches when
one would fit in L2. Prefill: a few fresh-prefill batches, TFLOP/s of the unified kernel (and of
torch's varlen flash attention when present). GEMV: batch-1 bf16 ``x @ W.T`` for the Llama-3.1-8B
projection shapes, cuBLAS (F.linear) against the Triton GEMV over a sweep of launch configs, each
timed as CUDA-graph replays of 50 calls on rotating weight copies (cold L2, no launch overhead).
Runs in about two minutes on an H100/H200; one section alone (results merged into the JSON):

    python benchmarks/kernels.py [--quick] [--only decode|prefill|gemv ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_slug, environment, save_result

from slicelm.layers.triton.backend import _find_varlen_attn
from slicelm.layers.triton.gemv import default_config, gemv
from slicelm.layers.triton.paged_attention import (
    _num_sms,
    choose_num_splits,
    paged_decode_attention,
    unified_attention,
)

SHAPES = {"qwen3-0.6b": (8, 16, 128), "llama-8b": (8, 32, 128)}  # (Hkv, Hq, D)
BATCHES = [1, 4, 16, 64, 256]
CONTEXTS = [512, 2048, 8192]
BLOCK = 16
DTYPE = torch.bfloat16
L2_BYTES = 256 << 20  # rotate caches until the working set clearly exceeds L2 (50-60 MB)
SECTIONS = ("decode", "prefill", "gemv", "decode_sweep")


def copy_bandwidth(dev: torch.device) -> float:
    src = torch.randn(1 << 28, device=dev)  # 1 GiB of fp32
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def make_decode(batch: int, ctx: int, hkv: int, hq: int, d: int, dev: torch.device):
    nblk = ctx // BLOCK
    kv_bytes = 2 * batch * ctx * hkv * d * DTYPE.itemsize
    copies = max(1, min(8, -(-L2_BYTES // kv_bytes)))
    caches = [torch.randn(2, batch * nblk, BLOCK, hkv, d, device=dev, dtype=DTYPE) for _ in range(copies)]
    tables = [torch.randperm(batch * nblk, device=dev, dtype=torch.int32).view(batch, nblk) for _ in caches]
    query = torch.randn(batch, hq, d, device=dev, dtype=DTYPE)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    return caches, tables, query, seq_lens, qsl, kv_bytes


def _decode_runner(out, query, caches, tables, seq_lens, qsl, batch, ctx, scale, num_splits):
    """Closure that cycles through the KV cache copies so repeated runs do not hit L2."""
    state = {"i": 0}

    def run() -> None:
        i = state["i"] = (state["i"] + 1) % len(caches)
        paged_decode_attention(out, query, caches[i], tables[i], seq_lens, qsl, batch, ctx, scale,
                               num_splits=num_splits)

    return run


def bench_decode(dev: torch.device, copy_bw: float, quick: bool) -> list[dict]:
    rows = []
    for name, (hkv, hq, d) in SHAPES.items():
        for batch in BATCHES if not quick else [1, 64]:
            for ctx in CONTEXTS if not quick else [2048]:
                caches, tables, query, seq_lens, qsl, kv_bytes = make_decode(batch, ctx, hkv, hq, d, dev)
                out = torch.empty_like(query)
                splits = choose_num_splits(batch, hkv, ctx, _num_sms(dev))
                row = {"shape": name, "batch": batch, "context": ctx, "num_splits": splits, "kv_bytes": kv_bytes}
                for label, ns in (("auto", None), ("no_split", 1)):
                    run = _decode_runner(out, query, caches, tables, seq_lens, qsl, batch, ctx, d**-0.5, ns)
                    ms = do_bench(run, warmup=25, rep=100, return_mode="median")
                    row[f"{label}_us"] = ms * 1e3
                    row[f"{label}_GBps"] = kv_bytes / (ms * 1e-3) / 1e9
                    row[f"{label}_frac_of_copy"] = kv_bytes / (ms * 1e-3) / copy_bw
                    if label == "auto" and splits == 1:
                        break
                rows.append(row)
                print(f"decode {name:11s} b={batch:3d} ctx={ctx:5d} splits={splits:2d} "
                      f"{row['auto_us']:8.1f} us {row['auto_GBps']:7.0f} GB/s "
                      f"({row['auto_frac_of_copy']:.2f} of copy)"
                      + (f"  no-split {row['no_split_us']:8.1f} us" if "no_split_us" in row else ""))
    return rows


def bench_decode_sweep(dev: torch.device, copy_bw: float) -> list[dict]:
    """Workload A's first decode steps (256 sequences, contexts = its prompt lengths + 0..64 tokens,
    Qwen3-0.6B heads) through every launch config in a small grid; best first."""
    from common import workload_a

    lens = [len(p) + i % 64 for i, (p, _) in enumerate(workload_a(256))]
    hkv, hq, d = SHAPES["qwen3-0.6b"]
    blocks = [-(-n // BLOCK) for n in lens]
    caches = [torch.randn(2, sum(blocks) + 1, BLOCK, hkv, d, device=dev, dtype=DTYPE) for _ in range(4)]
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    perm = torch.randperm(sum(blocks)) + 1
    for i, b in enumerate(blocks):
        table[i, :b] = perm[sum(blocks[:i]): sum(blocks[: i + 1])]
    table, seq_lens = table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32, device=dev)
    query = torch.randn(len(lens), hq, d, device=dev, dtype=DTYPE)
    out = torch.empty_like(query)
    kv_bytes = 2 * sum(lens) * hkv * d * DTYPE.itemsize
    rows, state = [], {"i": 0}
    for splits in (1, 2, 4):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    def run(splits=splits, block_n=block_n, warps=warps, stages=stages) -> None:
                        i = state["i"] = (state["i"] + 1) % len(caches)
                        paged_decode_attention(out, query, caches[i], table, seq_lens, qsl, len(lens), 4096,
                                               d**-0.5, num_splits=splits, block_n=block_n, num_warps=warps,
                                               num_stages=stages)
                    ms = do_bench(run, warmup=10, rep=60, return_mode="median")
                    rows.append({"num_splits": splits, "block_n": block_n, "num_warps": warps, "num_stages": stages,
                                 "us": ms * 1e3, "frac_of_copy": kv_bytes / (ms * 1e-3) / copy_bw})
    rows.sort(key=lambda r: r["us"])
    for r in rows[:8]:
        print(f"decode sweep: {r}")
    return rows


def bench_prefill(dev: torch.device, quick: bool) -> list[dict]:
    rows = []
    varlen, opts = _find_varlen_attn()
    for name, (hkv, hq, d) in SHAPES.items():
        for seq in [512, 2048] if quick else [512, 2048, 8192]:
            batch = max(1, 8192 // seq)
            t = batch * seq
            nblk = seq // BLOCK
            cache = torch.randn(2, batch * nblk, BLOCK, hkv, d, device=dev, dtype=DTYPE)
            table = torch.randperm(batch * nblk, device=dev, dtype=torch.int32).view(batch, nblk)
            q = torch.randn(t, hq, d, device=dev, dtype=DTYPE)
            seq_lens = torch.full((batch,), seq, dtype=torch.int32, device=dev)
            qsl = torch.arange(0, t + 1, seq, dtype=torch.int32, device=dev)
            out = torch.empty_like(q)
            flops = 4 * batch * hq * d * seq * (seq + 1) / 2  # causal QK^T and PV
            args = (out, q, cache, table, seq_lens, qsl, batch, d**-0.5)
            ms = do_bench(functools.partial(unified_attention, *args), warmup=25, rep=100, return_mode="median")
            row = {"shape": name, "batch": batch, "seq_len": seq, "triton_us": ms * 1e3,
                   "triton_TFLOPs": flops / (ms * 1e-3) / 1e12}
            if varlen is not None:
                k = cache[0].reshape(-1, hkv, d)[:t]
                v = cache[1].reshape(-1, hkv, d)[:t]
                kw = {k_: v_ for k_, v_ in opts.items() if k_ != "enable_gqa"}
                if opts["enable_gqa"]:
                    kw["enable_gqa"] = True
                else:
                    k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
                run = functools.partial(varlen, q, k, v, qsl, qsl, seq, seq, scale=d**-0.5, **kw)
                fms = do_bench(run, warmup=25, rep=100, return_mode="median")
                row |= {"flash_us": fms * 1e3, "flash_TFLOPs": flops / (fms * 1e-3) / 1e12}
            rows.append(row)
            print(f"prefill {name:11s} b={batch:2d} seq={seq:5d} triton {row['triton_TFLOPs']:6.1f} TFLOP/s"
                  + (f"  flash-varlen {row['flash_TFLOPs']:6.1f} TFLOP/s" if "flash_us" in row else ""))
    return rows


GEMV_SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GEMV_CALLS = 50  # calls per CUDA graph


def gemv_configs() -> list[tuple[int, int, int, int]]:
    """~30 (block_n, block_k, num_warps, num_stages): fp32 accumulator of 8..64 registers a thread."""
    cfgs = []
    for bn in (4, 8, 16, 32):
        for bk in (128, 256, 512, 1024):
            for nw in (4, 8):
                per_thread = bn * bk // (32 * nw)
                if 8 <= per_thread <= 64 and bn * bk >= 1024:
                    cfgs.append((bn, bk, nw, 2))
    cfgs += [(8, 512, 4, ns) for ns in (1, 3, 4)]  # plain loads are not pipelined; check stages do nothing
    return cfgs


def graph_us(call, n_copies: int, reps: int = 5, rounds: int = 5) -> float:
    """Median per-call time of GEMV_CALLS calls captured in one CUDA graph (call(i) uses copy i % n)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            call(i % n_copies)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(GEMV_CALLS):
            call(i % n_copies)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * GEMV_CALLS))
    del graph
    return sorted(times)[rounds // 2]


def bench_gemv(dev: torch.device, copy_bw: float, quick: bool) -> dict:
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cfgs = gemv_configs()[::3] if quick else gemv_configs()
    rows, best = [], {}
    for name, (n, k) in GEMV_SHAPES.items():
        w_bytes = n * k * DTYPE.itemsize
        copies = max(1, min(8, -(-L2_BYTES // w_bytes)))
        ws = [torch.randn(n, k, device=dev, dtype=DTYPE) / k**0.5 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=DTYPE)
        ref = torch.nn.functional.linear(x.float(), ws[0].float())

        def gbps(us: float, w_bytes=w_bytes) -> float:
            return w_bytes / (us * 1e-6) / 1e9

        cublas = graph_us(lambda i, x=x, ws=ws: torch.nn.functional.linear(x, ws[i]), len(ws))
        default = default_config(n, k, sms)
        row = {"shape": name, "N": n, "K": k, "weight_bytes": w_bytes, "copies": len(ws), "cublas_us": cublas,
               "cublas_GBps": gbps(cublas), "default_config": default, "configs": []}
        print(f"gemv {name:8s} N={n:5d} K={k:5d} {w_bytes / 1e6:6.1f} MB  cuBLAS {cublas:6.2f} us "
              f"{gbps(cublas):6.0f} GB/s  (copy-bandwidth ideal {2 * w_bytes / copy_bw * 1e6:6.2f} us)")
        for cfg in dict.fromkeys([default, *cfgs]):
            bn, bk, nw, ns = cfg
            kw = {"block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns}
            err = ((gemv(x, ws[0], **kw).float() - ref).norm() / ref.norm()).item()
            us = graph_us(lambda i, x=x, ws=ws, kw=kw: gemv(x, ws[i], **kw), len(ws))
            row["configs"].append({"block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns, "us": us,
                                   "GBps": gbps(us), "rel_err": err, "default": cfg == default})
            print(f"    bn={bn:2d} bk={bk:4d} warps={nw} stages={ns} {us:7.2f} us {gbps(us):6.0f} GB/s "
                  f"x{cublas / us:5.2f} vs cuBLAS  err {err:.1e}{'  (default)' if cfg == default else ''}")
            assert err < 1e-2, (name, cfg, err)
        top = min(row["configs"], key=lambda c: c["us"])
        row["best"] = top
        x4 = torch.randn(4, k, device=dev, dtype=DTYPE)  # small-batch decode: is M=4 worth routing too?
        kw = {key: top[key] for key in ("block_n", "block_k", "num_warps", "num_stages")}
        row["m4_cublas_us"] = graph_us(lambda i, x4=x4, ws=ws: torch.nn.functional.linear(x4, ws[i]), len(ws))
        row["m4_gemv_us"] = graph_us(lambda i, x4=x4, ws=ws, kw=kw: gemv(x4, ws[i], **kw), len(ws))
        rows.append(row)
        best[name] = {**kw, "us": top["us"], "GBps": top["GBps"], "cublas_us": cublas, "speedup": cublas / top["us"]}
        del ws
        torch.cuda.empty_cache()
    print(f"\ngemv best per shape ({sms} SMs, bf16, M=1):")
    for row in rows:
        b = row["best"]
        d = next(c for c in row["configs"] if c["default"])
        print(f"  {row['shape']:8s} bn={b['block_n']:2d} bk={b['block_k']:4d} warps={b['num_warps']} "
              f"stages={b['num_stages']}  {b['us']:6.2f} us {b['GBps']:6.0f} GB/s | default {d['us']:6.2f} us | "
              f"cuBLAS {row['cublas_us']:6.2f} us {row['cublas_GBps']:6.0f} GB/s | "
              f"M=4: gemv {row['m4_gemv_us']:6.2f} us cuBLAS {row['m4_cublas_us']:6.2f} us")
    return {"shapes": rows, "best": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few points only")
    ap.add_argument("--only", action="append", choices=SECTIONS,
                    help="run only this section (repeatable); the others are kept from the existing JSON")
    args = ap.parse_args()
    sections = args.only or list(SECTIONS)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name(dev)
    copy_bw = copy_bandwidth(dev)
    print(f"{device_name}: {_num_sms(dev)} SMs, device copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    figures = {"copy_bandwidth_Bps": copy_bw}
    if "decode" in sections:
        figures["decode"] = bench_decode(dev, copy_bw, args.quick)
    if "prefill" in sections:
        figures["prefill"] = bench_prefill(dev, args.quick)
    if "gemv" in sections:
        figures["gemv"] = bench_gemv(dev, copy_bw, args.quick)
    if "decode_sweep" in sections:
        figures["decode_sweep"] = bench_decode_sweep(dev, copy_bw)
    result = {
        **environment(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "workload": {"decode": {"shapes": SHAPES, "batches": BATCHES, "contexts": CONTEXTS, "block_size": BLOCK,
                                "dtype": str(DTYPE), "quick": args.quick},
                     "prefill": "fresh prefill, 8192 tokens per batch, seq 512/2048/8192",
                     "gemv": {"shapes": GEMV_SHAPES, "M": 1, "dtype": str(DTYPE), "calls_per_graph": GEMV_CALLS},
                     "sections_run": sections},
        "figures": figures,
    }
    old = RESULTS / f"kernels_{device_slug(result['device'])}.json"
    if args.only and old.exists():  # keep the sections not re-run (from their earlier run)
        result["figures"] = {**json.loads(old.read_text()).get("figures", {}), **figures}
    save_result("kernels", result)


if __name__ == "__main__":
    main()
