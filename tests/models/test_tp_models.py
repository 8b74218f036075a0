"""Tensor-parallel MoE, Gemma and Phi-3 decoders: two gloo ranks (spawned once for the module, ``utils_tp``) each
build their shard from a real safetensors checkpoint, read lazily, and run prefills, prefill chunks next to
decode rows, and decodes through the paged cache; every rank's logits (the gathered vocabulary) must be
transformers' in float32.

- Qwen3-MoE in the Hub's per-expert layout: experts split along their intermediate features (32 -> 16 per rank),
  the router replicated, dense ``mlp_only_layers`` and off-grid layers next to sparse ones, sliding windows.
- Mixtral in transformers 5's stacked layout (``experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]).
- Gemma 3: qk-norm, two rope tables, 1 + w norms, the scaled embedding (vocabulary-parallel) and tied head.
- Gemma 2: attention and final-logit soft-capping (the final cap applied to the gathered logits).
- Phi-3: fused ``qkv_proj`` / ``gate_up_proj`` checkpoint tensors cut per shard, then per rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import utils_parity
from safetensors.torch import save_file
from test_gemma_parity import CASES as GEMMA_CASES
from test_gemma_parity import SMALL as GEMMA_SMALL
from test_llama_parity import CASES as LLAMA_CASES
from test_llama_parity import SMALL as LLAMA_SMALL
from test_moe_parity import CASES as MOE_CASES
from test_moe_parity import SMALL as MOE_SMALL
from utils_parity import hf_logits, make_tokens
from utils_tp import ScheduleJob, TPRanks

VOCAB = 512
# case -> (config class, config, checkpoint layout, weight std)
CASES: dict[str, tuple[str, dict, str, float]] = {
    "qwen3_moe_hub": (*MOE_CASES["qwen3_moe_all"][:1], {**MOE_SMALL, **MOE_CASES["qwen3_moe_all"][1]}, "hub", 0.08),
    "mixtral_stacked": (*MOE_CASES["mixtral_window"][:1], {**MOE_SMALL, **MOE_CASES["mixtral_window"][1]},
                        "stacked", 0.08),
    "gemma3": (*GEMMA_CASES["gemma3_two_ropes"][:1], {**GEMMA_SMALL, **GEMMA_CASES["gemma3_two_ropes"][1]},
               "hub", 0.1),
    "gemma2_softcap": (*GEMMA_CASES["gemma2_softcap"][:1], {**GEMMA_SMALL, **GEMMA_CASES["gemma2_softcap"][1]},
                       "hub", 0.1),
    "phi3_fused": (*LLAMA_CASES["phi3_longrope_window"][:1],
                   {**LLAMA_SMALL, **LLAMA_CASES["phi3_longrope_window"][1]}, "hub", 0.08),
}
# prompts, then chunks / prefix continuations next to decode rows, then decodes
LENS = [30, 9, 44, 17]
SCHEDULE = [[20, 5, 14, 13], [7, 1, 27, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


@pytest.fixture(scope="module")
def ranks():
    pair = TPRanks()
    yield pair
    pair.close()


def write_checkpoint(case: str, path: Path) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Saves the case's random model; returns the token sequences and transformers' logits for them."""
    cls_name, config, layout, std = CASES[case]
    hf, _ = utils_parity.build_hf(cls_name, config, std=std)
    if layout == "stacked":  # the tensors as transformers 5 holds them in memory
        hf.config.architectures = [type(hf).__name__]
        hf.config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / "model.safetensors"))
    else:
        hf.save_pretrained(path)
    seqs = make_tokens(LENS, seed=1, vocab=VOCAB)
    return seqs, hf_logits(hf, seqs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_shards_give_transformers_logits(case: str, ranks: TPRanks, tmp_path: Path) -> None:
    seqs, refs = write_checkpoint(case, tmp_path)
    ranks.run(ScheduleJob(str(tmp_path), seqs, refs, SCHEDULE))
