"""Sparse mixture-of-experts decoders on the Llama skeleton: Qwen3-MoE and Mixtral.

Attention is Qwen3's (qk-norm) or Mistral's (sliding window if configured); the MLP of a sparse layer is
a router (``gate``, a linear layer to the expert logits) plus ``FusedMoE`` (``layers/moe``). Qwen3-MoE
keeps dense MLPs on ``mlp_only_layers`` and off the ``decoder_sparse_step`` grid.

Checkpoints hold one tensor per expert and projection (``mlp.experts.{e}.gate_proj``; Mixtral's
``block_sparse_moe.experts.{e}.w1/w3/w2``) or, as transformers 5 keeps them in memory, one stacked
tensor per projection (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]);
both are copied into the stacked parameters at load.

Quantized checkpoints: attention, dense MLPs and the router follow the checkpoint's ``quant_config``; the
experts stay 16-bit, so a checkpoint (or ``--quantization fp8``) that quantizes them is refused at build.

Tensor parallelism: the router is replicated, the experts split along their intermediate features
(``FusedMoE``: one all-reduce per sparse block), attention and dense MLPs as in Llama.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slicelm.layers.attention_metadata import AttentionBackend
from slicelm.layers.linear import Linear
from slicelm.layers.moe.layer import FusedMoE
from slicelm.layers.quantization import QuantConfig, QuantizationError, get_linear_method
from slicelm.models.llama import LlamaArgs, LlamaForCausalLM, LlamaMLP, required
from slicelm.models.loading import Target, checkpoint_parameters, expand_fused

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_STACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(\.weight)?$")
# Mixtral's checkpoint names -> the canonical (Qwen-MoE) ones
_MIXTRAL_NAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                  (".w2.", ".down_proj."))


@dataclass(frozen=True)
class MoEArgs:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    renormalize: bool
    sparse_layers: frozenset[int]

    @classmethod
    def from_config(cls, config: dict[str, Any], family: str, num_layers: int) -> MoEArgs:
        # Qwen3-MoE's config.json says num_experts, transformers 5 writes num_local_experts (Mixtral's name)
        key = "num_local_experts" if config.get("num_experts") is None else "num_experts"
        num_experts = int(required(config, key))
        if family == "mixtral":
            return cls(num_experts, int(config.get("num_experts_per_tok") or 2),
                       int(required(config, "intermediate_size")), True, frozenset(range(num_layers)))
        step = int(config.get("decoder_sparse_step") or 1)
        dense = set(config.get("mlp_only_layers") or [])
        sparse = frozenset(i for i in range(num_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0)
        return cls(num_experts, int(required(config, "num_experts_per_tok")),
                   int(required(config, "moe_intermediate_size")), bool(config.get("norm_topk_prob", False)), sparse)


def check_experts_unquantized(quant_config: QuantConfig | None, experts: str) -> None:
    """Quantized experts (packed or fp8 weights in the fused MoE kernels) are not implemented: refuse them."""
    expert = f"{experts}.0.gate_proj"
    if quant_config is not None and get_linear_method(quant_config, expert).quantized:
        raise QuantizationError(
            f"{quant_config.describe()} quantizes the MoE experts ({expert} ...); slicelm runs MoE experts in "
            "16 bits only: serve a checkpoint that leaves them unquantized (modules_to_not_convert / ignore)")


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, moe: MoEArgs, quant_config: QuantConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        check_experts_unquantized(quant_config, f"{prefix}.experts")
        self.gate = Linear(hidden_size, moe.num_experts, bias=False, quant_config=quant_config,
                           prefix=f"{prefix}.gate")
        self.experts = FusedMoE(moe.num_experts, moe.top_k, hidden_size, moe.intermediate_size, moe.renormalize)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, self.gate(hidden))


class SparseMoeForCausalLM(LlamaForCausalLM):
    """``Qwen3MoeForCausalLM`` and ``MixtralForCausalLM``."""

    @classmethod
    def make_args(cls, config: dict[str, Any]) -> LlamaArgs:
        args = LlamaArgs.from_config(config)
        if args.family not in ("qwen3_moe", "mixtral"):
            raise ValueError(f"config of family {args.family!r} is not a Qwen3-MoE / Mixtral model")
        return args

    def make_model(self, args: LlamaArgs, config: dict[str, Any], backend: AttentionBackend | None) -> nn.Module:
        self.moe = MoEArgs.from_config(config, args.family, args.num_layers)
        return super().make_model(args, config, backend)

    def make_mlp(self, args: LlamaArgs, config: dict[str, Any], layer_idx: int) -> nn.Module:
        prefix = f"model.layers.{layer_idx}.mlp"
        if layer_idx in self.moe.sparse_layers:
            return SparseMoeBlock(args.hidden_size, self.moe, self.quant_config, prefix)
        return LlamaMLP(args.hidden_size, args.intermediate_size, quant_config=self.quant_config, prefix=prefix)

    def canonical_name(self, name: str) -> str:
        if self.args.family == "mixtral":
            for old, new in _MIXTRAL_NAMES:
                name = name.replace(old, new)
        return name

    def checkpoint_name(self, canonical: str) -> str:
        """The name a checkpoint of this family uses (for error messages)."""
        if self.args.family == "mixtral":
            for old, new in _MIXTRAL_NAMES:
                canonical = canonical.replace(new, old)
        return canonical

    def _expert_names(self, experts: str, projs: tuple[str, ...]) -> set[str]:
        return {f"{experts}.{e}.{p}_proj.weight" for e in range(self.moe.num_experts) for p in projs}

    def expected_weights(self) -> set[str]:
        names = set()
        for name in checkpoint_parameters(self):
            experts, _, leaf = name.rpartition(".")
            if leaf == "w13_weight":
                names |= self._expert_names(experts, ("gate", "up"))
            elif leaf == "w2_weight":
                names |= self._expert_names(experts, ("down",))
            else:
                names.update(expand_fused(name))
        return names

    def locate_weight(self, name: str, params: dict[str, nn.Parameter]) -> Target | None:
        name = self.canonical_name(name)
        m = _EXPERT.match(name) or _STACKED_EXPERTS.match(name)
        if m is None:
            return super().locate_weight(name, params)
        try:
            experts = self.get_submodule(m[1])
        except AttributeError:
            experts = None
        if not isinstance(experts, FusedMoE):
            raise ValueError(f"unexpected weight {self.checkpoint_name(name)!r}: that layer has no experts")
        if m.re is _STACKED_EXPERTS:
            projs = ("gate", "up") if m[2] == "gate_up_proj" else ("down",)
            return Target(None, self._expert_names(m[1], projs), lambda t: experts.load_stacked(m[2], t))
        if int(m[2]) >= self.moe.num_experts:
            raise ValueError(f"unexpected weight {name!r}: the model has {self.moe.num_experts} experts")
        return Target(None, {name}, lambda t: experts.load_expert(int(m[2]), m[3], t))
