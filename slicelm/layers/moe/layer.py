"""``FusedMoE``: the experts of one sparse MLP block, stacked as ``w13 [E, 2I, H]`` (gate rows, then up
rows) and ``w2 [E, H, I]``; checkpoints' per-expert tensors are copied into their slices at load.

On CUDA the step runs the Triton path (alignment + two fused GEMMs, ``fused_moe.py``: no host
syncs, so CUDA graphs capture it); elsewhere the plain torch path loops over the experts the step's
tokens hit, rounding as transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.layers.moe.router import select_experts


def torch_experts(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Reference path: per hit expert, gather its rows, SiLU-gated MLP, scale, add back ([T, H])."""
    out = torch.zeros_like(hidden)
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1).long()
    for expert in torch.unique(flat_ids).tolist():
        pairs = (flat_ids == expert).nonzero().squeeze(1)
        tokens = pairs // topk_ids.shape[1]
        gate_up = F.linear(hidden[tokens], w13[expert])
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = F.linear(act, w2[expert]) * topk_weights.reshape(-1)[pairs, None]
        out.index_add_(0, tokens, down.to(out.dtype))
    return out


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], router_logits [T, E] -> [T, H]."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        if hidden.is_cuda:
            from slicelm.layers.moe.fused_moe import fused_experts

            return fused_experts(hidden, self.w13_weight, self.w2_weight, weights, ids)
        return torch_experts(hidden, self.w13_weight, self.w2_weight, weights, ids)

    def expert_slice(self, expert: int, proj: str) -> torch.Tensor:
        """The part of a stacked parameter holding ``proj`` ("gate", "up" or "down") of one expert."""
        inter = self.intermediate_size
        if proj == "gate":
            return self.w13_weight.data[expert, :inter]
        if proj == "up":
            return self.w13_weight.data[expert, inter:]
        if proj == "down":
            return self.w2_weight.data[expert]
        raise ValueError(f"unknown expert projection {proj!r}")
