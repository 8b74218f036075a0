"""Fused expert GEMMs over token blocks aligned by expert (``align.py``), vLLM's ``fused_moe`` pattern.

One kernel, two uses. Each program takes ``BLOCK_M`` sorted (token, slot) rows of one expert and
``BLOCK_N`` output columns, and streams that expert's weight tiles along K:

* gate/up (``GATE_UP``): rows gather the token's hidden state; two accumulators hold the gate and up
  columns ``n`` and ``I + n`` of ``w13 [E, 2I, H]``; the epilogue writes ``silu(gate) * up`` [T*k, I],
  rounded where the torch path rounds (model dtype after each op).
* down: rows read that activation, multiply ``w2 [E, H, I]``, scale by the routing weight (float32)
  and write [T*k, H]; the caller sums the k slots of each token.

Block sizes (``moe_config``) come from the expected rows per expert, ``T * top_k / E``: decode steps
have few (one ``BLOCK_M = 16`` block per expert, long ``BLOCK_K`` tiles and 4 stages to keep many
weight bytes in flight: the step is bound by reading the experts' weights), prefills many (64/128-row
blocks grouped by ``GROUP_M`` so blocks sharing an expert's weight tile run together and hit L2).
The choices follow vLLM's tuned table for E=128, N=768 on the H200, halving ``BLOCK_N`` for the
gate/up kernel whose two accumulators double the columns per program;
``benchmarks/moe.py --sweep`` times the alternatives on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slicelm.layers.moe.align import moe_align_block_size


@dataclass(frozen=True)
class MoEConfig:
    block_m: int
    block_n_gate_up: int
    block_n_down: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def moe_config(num_tokens: int, num_experts: int, top_k: int) -> MoEConfig:
    """Block sizes for a step of ``num_tokens`` tokens (see the module doc for the reasoning)."""
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 16:
        return MoEConfig(16, 64, 128, 128, 1, 4, 4)
    if rows_per_expert <= 48:
        return MoEConfig(32, 64, 128, 128, 8, 4, 3)
    if rows_per_expert <= 128:
        return MoEConfig(64, 64, 128, 64, 8, 4, 3)
    return MoEConfig(128, 64, 128, 64, 8, 8, 3)


# The step's pair counts change every step: unspecialized, so no variant is compiled mid-run.
@triton.jit(do_not_specialize=["num_pairs", "num_padded"])
def _fused_moe_kernel(
    a_ptr, w_ptr, out_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
    N, K, num_pairs, num_padded,
    stride_am, stride_we, stride_wn, stride_om,
    A_ROW_DIV: tl.constexpr, GATE_UP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_ids_ptr + offs_m)
    row_mask = rows < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // A_ROW_DIV).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if GATE_UP:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dt = out_ptr.dtype.element_ty
    x = acc.to(dt).to(tl.float32)
    if GATE_UP:
        silu = (x / (1.0 + tl.exp(-x))).to(dt).to(tl.float32)
        x = silu * acc_up.to(dt).to(tl.float32)
    else:
        x = x * tl.load(weights_ptr + rows, mask=row_mask, other=0.0)[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, x.to(dt), mask=row_mask[:, None] & n_mask[None, :])


def _launch(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, sorted_ids: torch.Tensor,
            expert_ids: torch.Tensor, num_post_padded: torch.Tensor, top_k: int, gate_up: bool,
            cfg: MoEConfig) -> None:
    n = w.shape[1] // 2 if gate_up else w.shape[1]
    k = w.shape[2]
    block_n = cfg.block_n_gate_up if gate_up else cfg.block_n_down
    grid = (triton.cdiv(sorted_ids.numel(), cfg.block_m) * triton.cdiv(n, block_n),)
    _fused_moe_kernel[grid](
        a, w, out, weights, sorted_ids, expert_ids, num_post_padded,
        n, k, out.shape[0], sorted_ids.numel(),
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        A_ROW_DIV=top_k, GATE_UP=gate_up, BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def fused_experts(
    hidden: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]: gate rows then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # float32 [T, k]
    topk_ids: torch.Tensor,  # int32 [T, k]
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, j]: [T, H]."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    assert w13.shape[2] == hidden_size and w2.shape == (num_experts, hidden_size, two_i // 2), (w13.shape, w2.shape)
    assert hidden.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1
    if num_tokens == 0:
        return torch.empty_like(hidden)
    cfg = config or moe_config(num_tokens, num_experts, top_k)
    sorted_ids, expert_ids, num_post_padded = moe_align_block_size(topk_ids.contiguous(), cfg.block_m, num_experts)
    act = torch.empty((num_tokens * top_k, two_i // 2), dtype=hidden.dtype, device=hidden.device)
    weights = topk_weights.to(torch.float32).contiguous()
    _launch(hidden, w13, act, weights, sorted_ids, expert_ids, num_post_padded, top_k, True, cfg)
    out = torch.empty((num_tokens * top_k, hidden_size), dtype=hidden.dtype, device=hidden.device)
    _launch(act, w2, out, weights, sorted_ids, expert_ids, num_post_padded, 1, False, cfg)
    return out.view(num_tokens, top_k, hidden_size).sum(dim=1)
