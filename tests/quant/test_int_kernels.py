"""The int4 / int8 Triton kernels (``layers/quantization/int_kernels.py``) on the CPU through Triton's interpreter,
against the float32 dequantization, and the Triton attention kernels reading an fp8 KV cache (scales, sliding
window, soft-cap) against the torch backend; and the real int kernels compiled for sm_90 (no GPU needed): no register
spills, and the batch-1 GEMV's inner loop within its instruction budget per weight (what lets it read 4-bit
weights at full bandwidth). As in ``tests/layers/test_gemv.py``, the interpreted tests run in a child pytest
with TRITON_INTERPRET=1 (``TRITON_INTERPRET=1 pytest <this file>`` runs them directly)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from utils_triton import keep_tests_for_this_process

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if INTERPRET:
    from utils_triton import patch_interpreter

    patch_interpreter()

from slicelm.layers.quantization import int_dequant, int_kernels  # noqa: E402
from slicelm.layers.quantization.int_weights import dequantize, pack_rows  # noqa: E402

# (bits, group, zero points, K, M, config): config None = the defaults; M=1 GEMV (split K 1 and 2), 2..256 fused
# GEMM (split K 1, 2, 4; W as the first or second operand; fp16 under the interpreter, whose dot has no bf16),
# >256 dequantize + matmul
CASES = [
    (4, 128, True, 512, 1, None), (4, 32, False, 512, 1, (16, 32, 2, 4, 1)), (4, 0, True, 384, 1, (16, 16, 1, 4, 1)),
    (8, 64, True, 512, 1, (16, 32, 4, 4, 1)), (8, 0, False, 256, 1, None), (4, 128, True, 384, 1, (64, 32, 1, 4, 1)),
    (4, 128, True, 512, 5, None), (4, 32, False, 512, 20, (32, 32, 128, 4, 1)), (8, 64, True, 512, 3, None),
    (4, 128, True, 512, 5, (16, 32, 128, 4, 1, 2)), (8, 64, True, 512, 3, (16, 32, 64, 4, 1, 4)),
    (4, 32, False, 384, 20, (32, 32, 64, 4, 1, 4)),  # split K: 3 slices of 128 and an empty one
    (4, 128, True, 512, 5, (16, 32, 128, 4, 1, 2, 1)), (8, 0, False, 256, 40, (64, 32, 64, 4, 1, 1, 1)),  # swap A/B
    (4, 128, True, 256, 200, None), (4, 64, True, 256, 200, (256, 32, 64, 8, 1, 2, 1)),  # the 256-row tile
    (4, 128, False, 384, 300, None), (8, 0, True, 256, 260, None),
]


def _weights(bits: int, group: int, zp: bool, k: int, n: int = 40):
    g = torch.Generator().manual_seed(bits * k + n + group)
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    groups = 1 if group == 0 else k // group
    scales = (torch.rand(n, groups, generator=g) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8, generator=g) if zp else None
    return pack_rows(q, bits), scales, zeros


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_int_linear_matches_dequantized(case):
    bits, group, zp, k, m, config = case
    w_q, scales, zeros = _weights(bits, group, zp, k)
    dtype = torch.bfloat16 if m == 1 or m > int_kernels.GEMM_MAX_M else torch.float16
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(w_q.shape[0], generator=g).to(dtype)
    ref = x.float() @ dequantize(w_q, scales, zeros, bits, k).T + bias.float()
    out = int_kernels.int_linear(x, w_q, scales, zeros, bits, k, bias, config)
    assert out.dtype == dtype and out.shape == ref.shape
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < (2e-3 if dtype == torch.float16 else 8e-3), err


@pytest.mark.parametrize("bias", [False, True])
def test_large_m_dequantizes_in_bounded_slabs(monkeypatch, bias):
    """M > GEMM_MAX_M: the weight is dequantized a slab of rows at a time into the shared scratch (here 3 slabs
    of 32 rows and a short one, N = 104) and each slab's matmul lands in its own output columns."""
    k, n, m = 256, 104, 300
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // 64, generator=g) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 16, (n, k // 64), dtype=torch.uint8, generator=g)
    x = torch.randn(m, k, generator=g).half()
    b = torch.randn(n, generator=g).half() if bias else None
    monkeypatch.setattr(int_dequant, "DEQUANT_SCRATCH_BYTES", 32 * k * 2)
    monkeypatch.setattr(int_dequant, "_SCRATCH", {})
    out = int_kernels.int_linear(x, pack_rows(q, 4), scales, zeros, 4, k, b)
    ref = x.float() @ dequantize(pack_rows(q, 4), scales, zeros, 4, k).T + (b.float() if bias else 0.0)
    assert (out.float() - ref).abs().max() / ref.abs().max() < 2e-3
    assert [t.numel() for t in int_dequant._SCRATCH.values()] == [32 * k]  # one bounded scratch, reused


def test_a_bucket_tuned_to_dequant_runs_dequantize_and_matmul(monkeypatch):
    """A sweep entry ``(0, ROWS, 0, 0)`` (dequantize + cuBLAS in slabs of ROWS weight rows was faster for that M bucket
    and shape) sends the fused GEMM's M range there, in slabs of ROWS rows (0: the default); other buckets keep the
    fused kernel."""
    from slicelm.layers.quantization import int_configs

    k, n = 256, 40
    w_q, scales, zeros = _weights(4, 64, True, k, n)
    monkeypatch.setattr(int_configs, "TUNED", {("gemm16", 4, 64, n, k): (0, 32, 0, 0),
                                               ("gemm64", 4, 64, n, k): (0, 0, 0, 0)})
    calls, slabs = [], []
    real, real_dequantize = int_kernels.dequant_matmul, int_dequant._dequantize_into
    monkeypatch.setattr(int_kernels, "dequant_matmul",
                        lambda *a, **kw: calls.append((a[0].shape[0], kw.get("rows"))) or real(*a, **kw))
    monkeypatch.setattr(int_dequant, "_dequantize_into",
                        lambda out, *a: slabs.append(out.shape[0]) or real_dequantize(out, *a))
    for m in (5, 20, 50):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
        ref = x.float() @ dequantize(w_q, scales, zeros, 4, k).T
        out = int_kernels.int_linear(x, w_q, scales, zeros, 4, k, None)
        assert (out.float() - ref).abs().max() / ref.abs().max() < 2e-3
    # M=5 (gemm16): slabs of 32 rows (32 + 8); M=20 (gemm32) stays fused; M=50 (gemm64): one default slab
    assert calls == [(5, 32), (50, None)] and slabs == [32, 8, 40]


def test_saved_device_configs_fill_tuned(monkeypatch, tmp_path):
    """``quant_sweep.py``'s saved table for a GPU model is what gemv_config / gemm_config return on it; entries
    set by hand in TUNED win, and another GPU model's file is not read."""
    from slicelm.layers.quantization import int_configs

    monkeypatch.setattr(int_configs, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(int_configs, "TUNED", {("gemv", 4, 128, 4096, 4096): (64, 32, 4, 4, 3)})
    int_configs.load_device_configs.cache_clear()
    path = int_configs.config_file("NVIDIA H200")
    assert path == tmp_path / "NVIDIA_H200.json"
    path.write_text('{"gemv,4,128,6144,4096": [64, 64, 4, 4, 2], "gemv,4,128,4096,4096": [128, 32, 16, 4, 3], '
                    '"gemm64,4,128,6144,4096": [128, 64, 8, 3]}')
    assert int_configs.load_device_configs("NVIDIA H100 80GB HBM3") == 0
    assert int_kernels.gemv_config(4, 128, 6144, 4096, 132) != (64, 64, 4, 4, 2)
    assert int_configs.load_device_configs("NVIDIA H200") == 3
    assert int_kernels.gemv_config(4, 128, 6144, 4096, 132) == (64, 64, 4, 4, 2)
    assert int_kernels.gemv_config(4, 128, 4096, 4096, 132) == (64, 32, 4, 4, 3)
    assert int_kernels.gemm_config(4, 128, 50, 6144, 4096, 132) == (64, 128, 64, 8, 3, 1, 0)  # saved before split-K
    int_configs.load_device_configs.cache_clear()


@pytest.mark.parametrize("m,config", [(1, (16, 16, 4, 4, 1)), (20, (32, 32, 64, 4, 1, 4))])
def test_split_k_tickets_are_reset(m, config):
    """The split-K tickets (GEMV and fused GEMM) go back to 0, so the next launch (or a CUDA-graph replay) starts
    clean, and the slices are summed in a fixed order (the same bits twice)."""
    w_q, scales, zeros = _weights(4, 64, True, 512)
    x = torch.randn(m, 512).to(torch.bfloat16 if m == 1 else torch.float16)
    a = int_kernels.int_linear(x, w_q, scales, zeros, 4, 512, None, config)
    assert int(int_kernels._LOCKS[x.device].sum()) == 0
    assert torch.equal(a, int_kernels.int_linear(x, w_q, scales, zeros, 4, 512, None, config))


def test_gemm_split_shrinks_to_its_workspace(monkeypatch):
    """Untuned shapes split K until the SMs are busy; a split whose float32 partial tiles would pass
    ``SPLIT_K_WORKSPACE_BYTES`` is halved (a tuned entry saved before split-K runs unsplit)."""
    from slicelm.layers.quantization import int_configs

    assert int_kernels.gemm_config(4, 128, 16, 4096, 4096, 132)[5] == 8  # 64 tiles: 8 slices of 4 steps
    assert int_kernels.gemm_config(4, 128, 256, 28672, 4096, 132)[5] == 1  # 448 tiles
    monkeypatch.setattr(int_configs, "TUNED", {("gemm16", 4, 128, 4096, 4096): (64, 128, 8, 3),
                                               ("gemm64", 4, 128, 4096, 4096): (64, 128, 8, 3, 2, 1)})
    assert int_kernels._gemm_launch(None, 4, 128, 16, 4096, 4096, 132) == (16, 64, 128, 8, 3, 1, 0)
    assert int_kernels._gemm_launch(None, 4, 128, 50, 4096, 4096, 132) == (64, 64, 128, 8, 3, 2, 1)
    monkeypatch.setattr(int_kernels, "SPLIT_K_WORKSPACE_BYTES", 3 * 16 * 4096 * 4)
    assert int_kernels._gemm_launch((16, 64, 128, 4, 3, 8), 4, 128, 16, 4096, 4096, 132)[5] == 2


@pytest.mark.parametrize("m", [1, 20, 300])
def test_fp8_block_linear_matches_dequantized(m):
    from slicelm.layers.quantization.fp8 import dequantize_blocks
    from slicelm.layers.quantization.fp8_kernels import fp8_block_linear

    g = torch.Generator().manual_seed(m)
    w = (torch.randn(200, 384, generator=g) * 100).to(torch.float8_e4m3fn)  # N not a multiple of the block
    scale = torch.rand(2, 3, generator=g) * 1e-3 + 1e-4
    x = torch.randn(m, 384, generator=g).half()
    bias = torch.randn(200, generator=g).half()
    ref = x.float() @ dequantize_blocks(w, scale, (128, 128)).T + bias.float()
    out = fp8_block_linear(x, w, scale, (128, 128), bias)
    assert (out.float() - ref).abs().max() / ref.abs().max() < 2e-3


@pytest.mark.parametrize(("window", "soft_cap"), [(None, None), (8, 30.0)])
def test_triton_attention_reads_scaled_fp8_cache_like_torch(window, soft_cap):
    """The cache is written by the torch backend (the interpreter's own fp8 rounding is not the GPU's), then
    both backends read it: prefill/chunk rows (unified kernel) and decode rows (split-KV kernel)."""
    from utils_paged import PagedBatch, make_kv_caches

    from slicelm.layers.attention import TorchAttentionBackend
    from slicelm.layers.triton.backend import TritonAttentionBackend

    kh, group, d, bs = 2, 2, 32, 16
    torch.manual_seed(0)
    batch = PagedBatch([41, 24], bs, first_block=1, shuffle_seed=0, device=torch.device("cpu"))
    cache = make_kv_caches(1, batch.num_blocks, bs, kh, d, torch.float8_e4m3fn, torch.device("cpu"))[0]
    opts = {"sliding_window": window, "soft_cap": soft_cap, "kv_scales": (0.5, 2.0)}
    for step in (batch.step([[0] * 30, [0] * 20]), batch.step([[0] * 10, [0] * 3]), batch.decode([0, 0])):
        t = step.meta.num_tokens
        q, k, v = torch.randn(t, kh * group, d), torch.randn(t, kh, d), torch.randn(t, kh, d)
        ref = TorchAttentionBackend().forward(q, k, v, cache, step.meta, d**-0.5, **opts)
        out = TritonAttentionBackend().forward(q, None, None, cache, step.meta, d**-0.5, **opts)
        assert (out - ref).norm() / ref.norm() < 1e-4, step.meta.is_decode_only


def test_interpreter_subprocess():
    from utils_triton import run_interpreted

    run_interpreted(__file__)


def _compile(fn, consts: dict, ptrs: dict, nw: int, ns: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in ptrs or n in ("K", "stride_w", "stride_xm", "stride_om", "stride_o")}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": ns})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    return {m[1]: int(m[2]) for m in re.finditer(r"(REG|STACK):(\d+)", usage)}, sass


def _loop_instructions(sass: str) -> int:
    """Instructions of the innermost (last) backward-branch loop."""
    ins = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m[1], 16), a) for a, t in ins if (m := re.search(r"BRA (?:`\(.*\) )?0x([0-9a-f]+)", t))
             and int(m[1], 16) < a]
    lo, hi = max(loops, key=lambda lh: lh[1] - lh[0])
    return sum(1 for a, _ in ins if lo <= a <= hi)


GEMV_PTRS = {"X": "*bf16", "WQ": "*i32", "S": "*fp16", "Z": "*u8", "B": "*bf16", "OUT": "*bf16", "WS": "*fp32",
             "LOCK": "*i32"}


def test_gemv_compiles_for_sm90_within_its_instruction_budget():
    """Default 4-bit g128 config: the loop handles 128 rows x 32 words = 256 weights per thread; budget 3.6
    instructions per weight (measured 3.1: 1 and-or + 1 FMA each, 2 shifts per 8, x handling shared by
    8 rows). More than that and batch-1 decode would be bound by instruction issue instead of HBM."""
    bn, bkw, _, nw, ns = int_kernels.gemv_config(4, 128, 14336 * 2, 4096, 132)
    consts = {"BITS": 4, "GROUP": 128, "HAS_ZP": True, "HAS_BIAS": False, "EVEN_K": True, "BLOCK_N": bn,
              "BLOCK_KW": bkw, "SPLIT_K": 1}
    use, sass = _compile(int_kernels._gemv_kernel, consts, GEMV_PTRS, nw, ns)
    assert use.get("STACK", 0) == 0, use
    per_weight = _loop_instructions(sass) / (bn * bkw * 8 / (nw * 32))
    assert per_weight <= 3.6, per_weight


@pytest.mark.parametrize("bits,group,split", [(4, 128, 4), (8, 0, 1), (4, 32, 2)])
def test_gemv_variants_compile_without_spills(bits, group, split):
    consts = {"BITS": bits, "GROUP": group, "HAS_ZP": bits == 4, "HAS_BIAS": True, "EVEN_K": False, "BLOCK_N": 128,
              "BLOCK_KW": 32, "SPLIT_K": split}
    use, _ = _compile(int_kernels._gemv_kernel, consts, GEMV_PTRS, 4, 3)
    assert use.get("STACK", 0) == 0, use


@pytest.mark.parametrize("block_m,split,swap", [(16, 4, 0), (16, 4, 1), (64, 1, 1), (128, 2, 0), (256, 2, 0)])
def test_gemm_compiles_for_sm90_without_spills(block_m, split, swap):
    """No spills, and with W as the first operand the MMA reads it from registers (HGMMA's A not in shared memory)."""
    bm, bn, bk, nw, ns, _, _ = int_kernels.gemm_config(4, 128, block_m, 4096, 4096, 132)
    consts = {"BITS": 4, "GROUP": 128, "HAS_ZP": True, "HAS_BIAS": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
              "SPLIT_K": split, "SWAP_AB": swap}
    ptrs = {"X": "*bf16", "WQ": "*i32", "S": "*fp16", "Z": "*u8", "B": "*bf16", "OUT": "*bf16", "WS": "*fp32",
            "LOCK": "*i32"}
    use, sass = _compile(int_kernels._gemm_kernel, consts, ptrs, nw, ns)
    assert use.get("STACK", 0) == 0, use
    if swap:
        assert re.search(r"HGMMA\.64x\d+x16\.F32\.BF16 R\d+, R\d+, gdesc", sass), "W does not go from registers"


keep_tests_for_this_process(globals(), ("test_interpreter_subprocess",
                                         "test_gemv_compiles_for_sm90_within_its_instruction_budget",
                                         "test_gemv_variants_compile_without_spills",
                                         "test_gemm_compiles_for_sm90_without_spills"), INTERPRET)
