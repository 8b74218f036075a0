"""Time the Triton paged attention kernels on CUDA; write benchmarks/results/kernels_<device>.json.

Decode: batch 1..256 x context 512..8192 for the Qwen3-0.6B (8 KV / 16 q heads, D 128) and
Llama-8B (8 KV / 32 q heads, D 128) shapes in bf16, block size 16, shuffled block tables. Figure:
median time (triton.testing.do_bench), KV bytes read / time, and that over the device-to-device
copy bandwidth (bytes read + written) measured first. Inputs rotate among several KV caches when
one would fit in L2. Prefill: a few fresh-prefill batches, TFLOP/s of the unified kernel (and of
torch's varlen flash attention when present). Runs in about a minute on an H100/H200.

    python benchmarks/kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, save_result

from slicelm.layers.triton.backend import _find_varlen_attn
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few points only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name(dev)
    copy_bw = copy_bandwidth(dev)
    print(f"{device_name}: {_num_sms(dev)} SMs, device copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    decode = bench_decode(dev, copy_bw, args.quick)
    prefill = bench_prefill(dev, args.quick)
    result = {
        **environment(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "workload": {"decode": {"shapes": SHAPES, "batches": BATCHES, "contexts": CONTEXTS, "block_size": BLOCK,
                                "dtype": str(DTYPE), "quick": args.quick},
                     "prefill": "fresh prefill, 8192 tokens per batch, seq 512/2048/8192"},
        "figures": {"copy_bandwidth_Bps": copy_bw, "decode": decode, "prefill": prefill},
    }
    save_result("kernels", result)


if __name__ == "__main__":
    main()
