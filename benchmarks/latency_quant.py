"""B-AWQ: batch-1 decode latency (TPOT) of a Llama-3.1-8B shape in AWQ 4-bit g128 against its byte floor, and
the bf16 model's TPOT, in one run (workload B: 128-token prompt, 256 new tokens, random weights).

    python benchmarks/latency_quant.py            # H200: ~2 min (two 8B engines, one per process, graphs captured)
    python benchmarks/latency_quant.py --smoke    # CPU, tiny shape: checks the script, writes a cpu result

Floor = bytes a decode step must read ÷ the device-to-device copy rate measured in the same run. For AWQ:
the checkpoint's packed weights + zeros + scales (``qweight`` int4, ``qzeros`` int4, ``scales`` fp16 per 128
inputs) + every unquantized tensor (embeddings, lm_head, norms), as workload B counts the bf16 model's bytes.
The floor of the bytes actually resident (zeros kept as uint8) is reported beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AWQ_G128, SHAPES, environment, measure_copy_bandwidth, run_child, save_result, write_config_dir
from latency import decode_parser, decode_runs, profile_graph_replay, time_graph_replay


def checkpoint_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the AWQ checkpoint's tensors, bytes resident on the device) of ``model``."""
    from slicelm.layers.linear import Linear

    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    stored = 0
    counted: set[int] = set()
    for module in model.modules():
        if isinstance(module, Linear) and module.method.quantized:
            n, k = module.out_features, module.in_features
            groups = module.w_scales.shape[1]
            stored += n * k // 2 + groups * n // 2 + groups * n * 2  # qweight, qzeros (int4), scales (fp16)
            counted |= {id(p) for p in module.parameters(recurse=False)}
    stored += sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in counted)
    return stored, resident


def measure(args: argparse.Namespace, root: str, quant: dict | None, bandwidth: float | None) -> dict:
    from slicelm.config import EngineArgs
    from slicelm.engine.engine import LLMEngine

    device = "cpu" if args.smoke else "auto"
    engine = LLMEngine(EngineArgs(model=write_config_dir(args.shape, root, quant), load_format="dummy",
                                  skip_tokenizer_init=True, max_num_seqs=8, max_model_len=4096, device=device,
                                  dtype="bfloat16", gpu_memory_utilization=0.4))
    stored, resident = checkpoint_bytes(engine.worker.model)
    runs = decode_runs(engine, args.prompt_len, args.new_tokens, args.repeats)
    tpot = statistics.median(r["tpot_ms_mean"] for r in runs)
    out = {"tpot_ms": tpot, "runs": runs, "weight_bytes": stored, "resident_weight_bytes": resident,
           "graph_replay_ms": time_graph_replay(engine) if not args.smoke else None}
    if bandwidth:
        out["floor_tpot_ms"] = stored / bandwidth * 1e3
        out["ratio_to_floor"] = tpot / out["floor_tpot_ms"]
        out["resident_floor_tpot_ms"] = resident / bandwidth * 1e3
    if args.profile and quant and not args.smoke:
        out["replay_kernels"] = profile_graph_replay(engine, f"latency_awq_{args.shape}", environment())
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = decode_parser(__doc__)
    ap.add_argument("--profile", action="store_true", help="also save the kernel table of the AWQ graph replay")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, few tokens: checks the script")
    ap.add_argument("--child", choices=["bf16", "awq"], help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one engine in this process (see common.run_child)
        with tempfile.TemporaryDirectory() as root:
            out = measure(args, root, AWQ_G128 if args.child == "awq" else None, args.bandwidth)
        Path(args.child_out).write_text(json.dumps(out))
        return
    if args.smoke:
        args.shape, args.new_tokens, args.repeats, args.prompt_len = "tiny-llama", 8, 1, 16
    env = environment()
    bandwidth = None if args.smoke else measure_copy_bandwidth()
    argv = ["--shape", args.shape, "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
            "--prompt-len", str(args.prompt_len), *(["--profile"] if args.profile else []),
            *(["--smoke"] if args.smoke else ["--bandwidth", str(bandwidth)])]
    bf16 = run_child(__file__, [*argv, "--child", "bf16"])
    awq = run_child(__file__, [*argv, "--child", "awq"])
    result = {
        **env,
        "workload": {"name": "B-AWQ (batch-1 decode latency, AWQ 4-bit g128 vs bf16)", "shape": args.shape,
                     "model_config": SHAPES[args.shape], "quantization_config": AWQ_G128,
                     "weights": "random (load_format=dummy), activations bf16", "prompt_tokens": args.prompt_len,
                     "new_tokens": args.new_tokens, "batch_size": 1},
        "copy_bandwidth_bytes_per_s": bandwidth,
        "awq": awq, "bf16": bf16,
        "tpot_ms": awq["tpot_ms"], "floor_tpot_ms": awq.get("floor_tpot_ms"),
        "ratio_to_floor": awq.get("ratio_to_floor"), "speedup_vs_bf16": bf16["tpot_ms"] / awq["tpot_ms"],
    }
    save_result(f"latency_awq_{args.shape}", result)
    print(f"\n{env['device']}: AWQ TPOT {awq['tpot_ms']:.2f} ms (floor {awq.get('floor_tpot_ms') or 0:.2f} ms, "
          f"{awq.get('ratio_to_floor') or 0:.2f}x), bf16 TPOT {bf16['tpot_ms']:.2f} ms "
          f"({result['speedup_vs_bf16']:.2f}x faster)")


if __name__ == "__main__":
    main()
