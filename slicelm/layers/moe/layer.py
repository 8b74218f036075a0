"""``FusedMoE``: the experts of one sparse MLP block, stacked as ``w13 [E, 2I, H]`` (gate rows, then up
rows) and ``w2 [E, H, I]``; checkpoints' per-expert tensors are copied into their slices at load.

On CUDA the step runs the Triton path (alignment + two fused GEMMs, ``fused_moe.py``: no host
syncs, so CUDA graphs capture it); elsewhere the plain torch path loops over the experts the step's
tokens hit, rounding as transformers does.

Tensor parallelism splits every expert's intermediate features (vLLM's default for MoE under TP): rank r
holds rows ``[r I/tp, (r + 1) I/tp)`` of each expert's gate and up and those columns of its down, routes every
token itself (the router is replicated) and adds its partial sums to the other ranks' with one all-reduce
per block. Checkpoint tensors (per expert or stacked) are cut to this rank's part as they load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slicelm.distributed.parallel_state import TPGroup, get_tp_group
from slicelm.layers.moe.router import select_experts
from slicelm.layers.parallel_linear import Part, TensorSource, copy_checked, divide, materialize


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
                 renormalize: bool, *, tp: TPGroup | None = None, prefix: str = "") -> None:
        super().__init__()
        self.tp = tp or get_tp_group()
        self.prefix = prefix
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        local = divide(intermediate_size, self.tp.world_size, f"{prefix} expert intermediate size")
        self.part = Part(self.tp.rank * local, local)
        # intermediate_size is this rank's part of the checkpoint's full_intermediate_size
        self.hidden_size, self.intermediate_size, self.full_intermediate_size = hidden_size, local, intermediate_size
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, local))

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], router_logits [T, E] -> [T, H]."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        if hidden.is_cuda:
            from slicelm.layers.moe.fused_moe import fused_experts

            out = fused_experts(hidden, self.w13_weight, self.w2_weight, weights, ids)
        else:
            out = torch_experts(hidden, self.w13_weight, self.w2_weight, weights, ids)
        return self.tp.all_reduce(out)

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

    def load_expert(self, expert: int, proj: str, tensor: TensorSource) -> None:
        """One expert's checkpoint tensor (gate / up ``[I, H]``, down ``[H, I]``): this rank's features of it."""
        full, h = self.full_intermediate_size, self.hidden_size
        dim, shape = (1, (h, full)) if proj == "down" else (0, (full, h))
        name = f"{self.prefix}.{expert}.{proj}_proj.weight"
        if tuple(tensor.shape) != shape:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        local = materialize(tensor.narrow(dim, self.part.start, self.part.length))
        copy_checked(self.expert_slice(expert, proj), local, repr(name))

    def load_stacked(self, proj: str, tensor: TensorSource) -> None:
        """Every expert's ``gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows) or ``down_proj`` ``[E, H, I]``
        in one tensor (transformers 5's layout): this rank's features of each."""
        e, full, h, part = self.num_experts, self.full_intermediate_size, self.hidden_size, self.part
        gate_up = proj == "gate_up_proj"
        shape = (e, 2 * full, h) if gate_up else (e, h, full)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"weight {self.prefix}.{proj!r} has shape {tuple(tensor.shape)}, expected {shape}")
        if not gate_up:
            copy_checked(self.w2_weight.data, materialize(tensor.narrow(2, part.start, part.length)), proj)
            return
        for i in range(2):  # gate, then up
            rows = materialize(tensor.narrow(1, i * full + part.start, part.length))
            copy_checked(self.w13_weight.data[:, i * part.length:(i + 1) * part.length], rows, proj)
