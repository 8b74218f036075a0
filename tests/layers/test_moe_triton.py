"""The fused-MoE Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1, in a child
process as ``test_triton_interpret.py`` does): the token→expert alignment's invariants and the fused
expert GEMMs against the torch path, for every block-size bucket; plus the real bf16 kernels compiled
for sm_90 without register spills."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from utils_triton import keep_tests_for_this_process

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if INTERPRET:
    from utils_triton import patch_interpreter

    patch_interpreter()

from slicelm.layers.moe.layer import torch_experts  # noqa: E402
from slicelm.layers.moe.router import select_experts  # noqa: E402


def routed(num_tokens: int, num_experts: int, top_k: int, seed: int, skip: int = 0):
    """Routing of ``num_tokens`` tokens; the last ``skip`` experts get no token."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    logits[:, num_experts - skip:] = -1e9
    return select_experts(logits, top_k, True)


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "block_m"), [(37, 10, 3, 4), (5, 8, 2, 16),
                                                                             (1, 4, 1, 16), (64, 16, 4, 8)])
def test_alignment_invariants(num_tokens, num_experts, top_k, block_m):
    from slicelm.layers.moe.align import moe_align_block_size, padded_sizes

    _, ids = routed(num_tokens, num_experts, top_k, seed=num_tokens, skip=1)
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, block_m, num_experts)
    pairs = num_tokens * top_k
    assert (sorted_ids.numel(), expert_ids.numel()) == padded_sizes(pairs, num_experts, block_m)
    counts = torch.bincount(ids.flatten().long(), minlength=num_experts)
    used = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert int(num_post) == used
    real = sorted_ids[:used]
    assert torch.equal(real[real < pairs].sort().values, torch.arange(pairs, dtype=torch.int32))  # each pair once
    assert torch.all(sorted_ids[used:] == pairs)  # the rest is padding
    flat = ids.flatten()
    for b in range(used // block_m):
        rows = real[b * block_m:(b + 1) * block_m]
        rows = rows[rows < pairs].long()
        assert len(rows) > 0 and torch.all(flat[rows] == expert_ids[b]), b  # one expert per block
    assert torch.all(expert_ids[used // block_m:] == -1)


@pytest.mark.parametrize("num_tokens", [1, 3, 40, 300])  # decode, small, medium and prefill-sized buckets
def test_fused_experts_match_torch_path(num_tokens):
    from slicelm.layers.moe.fused_moe import fused_experts, moe_config

    num_experts, top_k, hidden, inter = 8, 2, 32, 48
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(num_experts, hidden, inter, generator=g) * 0.2
    weights, ids = routed(num_tokens, num_experts, top_k, seed=num_tokens + 1, skip=2)
    ref = torch_experts(x, w13, w2, weights, ids)
    cfg = moe_config(num_tokens, num_experts, top_k)
    out = fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"{cfg}")


def test_fused_experts_fp16_and_strided_hidden():
    from slicelm.layers.moe.fused_moe import MoEConfig, fused_experts

    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 80, generator=g)[:, :64]  # rows strided like a slice of a wider activation
    w13 = torch.randn(6, 64, 64, generator=g) * 0.1
    w2 = torch.randn(6, 64, 32, generator=g) * 0.1
    weights, ids = routed(9, 6, 2, seed=4)
    ref = torch_experts(x.double(), w13.double(), w2.double(), weights.double(), ids)
    cfg = MoEConfig(16, 16, 32, 32, 2, 4, 2)  # K spans several tiles; grouped program order
    out = fused_experts(x.half(), w13.half(), w2.half(), weights, ids, cfg)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-3)


def test_interpreter_subprocess():
    """Parent session: run the tests above in a child process that has TRITON_INTERPRET=1."""
    from utils_triton import run_interpreted

    run_interpreted(__file__, timeout=600)


def test_bf16_moe_kernels_compile_for_sm90_without_spills():
    """Every (block size, warps, stages) bucket of ``moe_config`` compiles for the H200 without spills."""
    from utils_triton import sm90_usage

    from slicelm.layers.moe import align
    from slicelm.layers.moe.fused_moe import _fused_moe_kernel, moe_config

    types = {"weights_ptr": "*fp32", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
             "num_post_padded_ptr": "*i32"}
    for tokens in (8, 256, 1024, 8192):
        cfg = moe_config(tokens, 128, 8)
        for gate_up in (True, False):
            consts = {"A_ROW_DIV": 8 if gate_up else 1, "GATE_UP": gate_up, "BLOCK_M": cfg.block_m,
                      "BLOCK_N": cfg.block_n_gate_up if gate_up else cfg.block_n_down, "BLOCK_K": cfg.block_k,
                      "GROUP_M": cfg.group_m, "DOT_PRECISION": "tf32", "num_warps": cfg.num_warps,
                      "num_stages": cfg.num_stages}
            use = sm90_usage(_fused_moe_kernel, "bf16", consts, types)
            assert use.get("STACK", 0) == 0, (tokens, gate_up, use)
    ints = {n: "*i32" for n in ("topk_ids_ptr", "counts_ptr", "sorted_ids_ptr", "cursor_ptr", "expert_ids_ptr",
                                "num_post_padded_ptr")}
    sm90_usage(align._scan_kernel, "i32", {"BLOCK_M": 16, "E_PAD": 128, "CHUNK": 32}, ints)
    sm90_usage(align._count_kernel, "i32", {"BLOCK": 1024}, ints)
    sm90_usage(align._scatter_kernel, "i32", {"BLOCK": 1024}, ints)



keep_tests_for_this_process(globals(), ("test_interpreter_subprocess",
                                        "test_bf16_moe_kernels_compile_for_sm90_without_spills"), INTERPRET)
