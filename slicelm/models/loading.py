"""Checkpoint tensors -> (slices of) fused parameters, shared by the decoder models.

Names are compared in one *canonical* layout: Hugging Face's unfused Llama names (``q_proj``,
``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``) and per-expert names
(``experts.{e}.gate_proj`` ...). A checkpoint tensor covers one or more canonical names (Phi-3's
fused ``qkv_proj`` covers three, a stacked expert tensor every expert's); what the model expects and
no tensor covered is reported as missing, by name.

A quantized linear (``layers/quantization``) places its checkpoint tensors itself (``qweight``, ``scales``,
``weight_scale_inv`` ...: ``Linear.load_weight``, one output shard at a time), and the KV-cache scales of
fp8 checkpoints (``self_attn.k_scale`` / ``v_scale``, or ``k_proj.output_scale`` / ``v_proj.output_scale``)
go to the attention layer.

Tensors arrive whole or lazy (``TensorSource``: tensor-parallel ranks read only their slices). Every linear
layer, quantized or not, and the vocabulary-parallel embedding and LM head place their tensors themselves
(``layer_target``): a parallel layer cuts this rank's part before reading it. Anything else is replicated and
copied whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from slicelm.layers.linear import Linear
from slicelm.layers.parallel_linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorSource,
    copy_checked,
    materialize,
)
from slicelm.layers.vocab_parallel import VocabParallelEmbedding

# HF sub-module name -> (fused parameter module, output shard)
STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Checkpoint entries that are derived buffers, not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_KV_SCALES = {"k_scale": "k", "v_scale": "v", "k_proj.output_scale": "k", "v_proj.output_scale": "v"}


@dataclass
class Target:
    """Where one checkpoint tensor goes: a parameter or a view of it (``tensor``), or a function that places
    it (``load``), and the canonical names it covers."""

    tensor: torch.Tensor | None
    covers: set[str]
    load: Callable[[TensorSource], None] | None = None


def checkpoint_parameters(model: nn.Module) -> Iterator[str]:
    """Parameter names a checkpoint must provide (a quantized linear's optional tensors, e.g. GPTQ's
    ``g_idx`` without act-order, left out)."""
    optional = {f"{prefix}.{name}" for prefix, m in model.named_modules() if isinstance(m, Linear)
                for name, spec in m.param_specs.items() if not spec.required}
    return (name for name, _ in model.named_parameters() if name not in optional)


def kv_scale_target(model: nn.Module, name: str) -> Target | None:
    """An fp8 checkpoint's KV-cache scale -> its attention layer (None: ``name`` is not one)."""
    suffix = next((s for s in _KV_SCALES if name.endswith(".self_attn." + s)), None)
    if suffix is None:
        return None
    path = name[: -len(suffix) - 1] + ".attn"
    try:
        attn = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"unexpected weight {name!r} (no attention module {path!r})") from None
    which = _KV_SCALES[suffix]
    return Target(None, {name}, lambda t: attn.set_kv_scale(which, float(t.float().reshape(-1).max())))


def layer_target(model: nn.Module, name: str) -> Target | None:
    """Checkpoint tensor ``name`` of a linear layer (quantized or not) or of a vocabulary-parallel embedding /
    LM head, placed by the layer (None: not one). A ``q_proj`` / ``gate_proj`` ... tensor fills its shard of the
    fused layer; a fused checkpoint tensor (Phi-3's ``qkv_proj``) fills every shard. Parallel layers take the
    tensor lazy and read only this rank's part."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    stacked = STACKED.get(parts[-2]) if len(parts) >= 3 else None
    path = ".".join([*parts[:-2], stacked[0]]) if stacked else ".".join(parts[:-1])
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    leaf = parts[-1]
    if isinstance(module, VocabParallelEmbedding):
        return Target(None, {name}, partial(module.load_weight, leaf))
    if not isinstance(module, Linear):
        return None
    if stacked is not None:
        shard, covers = stacked[1], {name}
    else:
        shard, covers = None if len(module.output_sizes) > 1 else 0, set(expand_fused(name))
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        return Target(None, covers, partial(module.load_weight, leaf, shard=shard))
    return Target(None, covers, lambda t: module.load_weight(leaf, materialize(t), shard))


def expand_fused(name: str) -> Iterator[str]:
    """Canonical names of parameter ``name`` (a fused projection expands to its parts)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in FUSED:
        for sub in FUSED[parts[-2]]:
            yield ".".join([*parts[:-2], sub, parts[-1]])
    else:
        yield name


def copy_into(target: Target, name: str, tensor: TensorSource) -> None:
    if target.load is not None:
        target.load(tensor)
        return
    assert target.tensor is not None, name
    copy_checked(target.tensor, materialize(tensor), repr(name))


def check_complete(expected: set[str], loaded: set[str], display=lambda n: n) -> None:
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint is missing weights: {sorted(display(n) for n in missing)}")


def load_all(weights: Iterable[tuple[str, TensorSource]], locate, expected: set[str], display=lambda n: n) -> set[str]:
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
