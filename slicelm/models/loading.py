"""Checkpoint tensors -> (slices of) fused parameters, shared by the decoder models.

Names are compared in one *canonical* layout: Hugging Face's unfused Llama names (``q_proj``,
``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``) and per-expert names
(``experts.{e}.gate_proj`` ...). A checkpoint tensor covers one or more canonical names (Phi-3's
fused ``qkv_proj`` covers three, a stacked expert tensor every expert's); what the model expects and
no tensor covered is reported as missing, by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

# HF sub-module name -> (fused parameter module, shard id)
STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Checkpoint entries that are derived buffers, not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@dataclass
class Target:
    """Where one checkpoint tensor goes: a parameter or a view of it, and the canonical names it covers."""

    tensor: torch.Tensor
    covers: set[str]


def expand_fused(name: str) -> Iterator[str]:
    """Canonical names of parameter ``name`` (a fused projection expands to its parts)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in FUSED:
        for sub in FUSED[parts[-2]]:
            yield ".".join([*parts[:-2], sub, parts[-1]])
    else:
        yield name


def copy_into(target: Target, name: str, tensor: torch.Tensor) -> None:
    if tuple(target.tensor.shape) != tuple(tensor.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.tensor.shape)}")
    target.tensor.copy_(tensor.to(dtype=target.tensor.dtype, device=target.tensor.device))


def check_complete(expected: set[str], loaded: set[str], display=lambda n: n) -> None:
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint is missing weights: {sorted(display(n) for n in missing)}")


def load_all(weights: Iterable[tuple[str, torch.Tensor]], locate, expected: set[str], display=lambda n: n) -> set[str]:
    """Copy every (name, tensor) into ``locate(name)`` (None: skip it) and check nothing expected is missing."""
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            target = locate(name)
            if target is None:
                continue
            copy_into(target, name, tensor)
            loaded |= target.covers
    check_complete(expected, loaded, display)
    return loaded
