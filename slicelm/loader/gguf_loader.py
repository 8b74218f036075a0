"""GGUF files: metadata -> HF config dict, tensors -> dequantized float32 tensors under HF names.

llama.cpp's `convert_hf_to_gguf.py` permutes the rows of `attn_q`/`attn_k` for its rotary layout
(pairs interleaved within a head); `unpermute_qk` undoes that like transformers' GGUF loader does.
For Gemma 3 it does not permute, but stores every RMSNorm weight as ``1 + w`` (llama.cpp's norms
multiply by the weight, Gemma's by one plus it): the loader subtracts the one again. Gemma 3's
metadata lacks what llama.cpp hard-codes (local rope base 10k, five sliding layers of six, the
attention scale): `_gemma3_config` fills it in.
GGUF stores dimensions innermost-first; the reader's numpy arrays are already in HF [out, in] order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slicelm.loader.errors import CorruptModelFileError

# general.architecture -> HF architecture class name
ARCHITECTURES: dict[str, str] = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}

_LAYER_TENSORS: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# where an architecture's tensor names differ from llama's
_ARCH_LAYER_TENSORS: dict[str, dict[str, str]] = {
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    },
}
_PERMUTED_QK = ("llama",)  # architectures whose q/k rows llama.cpp permutes
_NORM_PLUS_ONE = ("gemma3",)  # architectures whose norm weights llama.cpp stores as 1 + w
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """HF parameter name of GGUF tensor `name`, or None for tensors HF models do not have."""
    m = _LAYER_RE.match(name)
    if m is not None:
        layer, part, kind = m.groups()
        hf = _ARCH_LAYER_TENSORS.get(arch, {}).get(part) or _LAYER_TENSORS.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"
    base, _, kind = name.rpartition(".")
    hf = _GLOBAL_TENSORS.get(base)
    return None if hf is None or kind not in ("weight", "bias") else f"{hf}.{kind}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (`reshape(h, 2, d/2).swapaxes(1, 2)`)."""
    rows = weight.shape[0]
    assert rows % (2 * num_heads) == 0, f"{rows} rows do not split into {num_heads} heads of pairs"
    w = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


class GGUFModel:
    """One GGUF file, read lazily with `gguf.GGUFReader` (memory mapped)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError, struct/numpy errors, ... on bad files
            raise CorruptModelFileError(f"cannot read GGUF file {self.path}: {type(e).__name__}: {e}") from e
        self.arch: str = self.get("general.architecture")
        if self.arch is None:
            raise CorruptModelFileError(f"GGUF file {self.path} has no general.architecture metadata")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value.tolist() if isinstance(value, np.ndarray) else value

    def arch_get(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    @cached_property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    @cached_property
    def config(self) -> dict[str, Any]:
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"GGUF file {self.path}: general.architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        num_heads = int(self._required("attention.head_count"))
        hidden = int(self._required("embedding_length"))
        head_dim = int(self.arch_get("attention.key_length", hidden // num_heads))
        tokens = self.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens) if tokens else self.arch_get("vocab_size")
        names = set(self.tensor_names)
        config: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "hidden_size": hidden,
            "intermediate_size": int(self._required("feed_forward_length")),
            "num_hidden_layers": int(self._required("block_count")),
            "num_attention_heads": num_heads,
            "num_key_value_heads": int(self.arch_get("attention.head_count_kv", num_heads)),
            "head_dim": head_dim,
            "rms_norm_eps": float(self.arch_get("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self.arch_get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.arch_get("context_length", 2048)),
            "vocab_size": int(vocab_size) if vocab_size is not None else None,
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            "mlp_bias": "blk.0.ffn_up.bias" in names,
            "hidden_act": "silu",
            "torch_dtype": self._torch_dtype(),
        }
        if config["vocab_size"] is None:
            raise CorruptModelFileError(
                f"GGUF file {self.path} has neither tokenizer.ggml.tokens nor {self.arch}.vocab_size"
            )
        scaling_type = self.arch_get("rope.scaling.type")
        if scaling_type not in (None, "none"):
            config["rope_scaling"] = {
                "rope_type": scaling_type,
                "factor": float(self.arch_get("rope.scaling.factor", 1.0)),
            }
            original = self.arch_get("rope.scaling.original_context_length")
            if original is not None:
                config["rope_scaling"]["original_max_position_embeddings"] = int(original)
        for key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            value = self.get(f"tokenizer.ggml.{gguf_key}_token_id")
            if value is not None:
                config[key] = int(value)
        if self.arch == "gemma3":
            self._gemma3_config(config)
        return config

    def _gemma3_config(self, config: dict[str, Any]) -> None:
        """What llama.cpp's gemma3 graph hard-codes, in transformers' Gemma3TextConfig terms."""
        del config["hidden_act"]
        config.update(
            model_type="gemma3_text",
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=int(self.arch_get("attention.sliding_window", 4096)),
            sliding_window_pattern=6,
            rope_local_base_freq=10000.0,
            tie_word_embeddings=True,
            # llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(hidden / heads)
            query_pre_attn_scalar=(config["hidden_size"] // config["num_attention_heads"]
                                   if config["num_hidden_layers"] == 62 else config["head_dim"]),
        )

    @property
    def generation_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    def _required(self, key: str) -> Any:
        value = self.arch_get(key)
        if value is None:
            raise CorruptModelFileError(f"GGUF file {self.path} lacks metadata {self.arch}.{key}")
        return value

    def _torch_dtype(self) -> str:
        types = {t.tensor_type.name for t in self.reader.tensors if len(t.shape) > 1}
        if types and types <= {"F32"}:
            return "float32"
        if types and types <= {"F16"}:
            return "float16"
        return "bfloat16"  # BF16 or quantized weights: originals are almost always bf16

    def num_weights(self) -> int:
        return sum(gguf_to_hf_name(n, self.arch) is not None for n in self.tensor_names)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor in HF shape) for every tensor the HF model has."""
        from gguf.quants import dequantize

        config = self.config
        for tensor in self.reader.tensors:
            hf_name = gguf_to_hf_name(tensor.name, self.arch)
            if hf_name is None:
                continue
            try:
                array = dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as e:
                raise ValueError(
                    f"GGUF file {self.path}: tensor {tensor.name} has unsupported type "
                    f"{tensor.tensor_type.name}"
                ) from e
            except Exception as e:
                raise CorruptModelFileError(
                    f"GGUF file {self.path}: cannot read tensor {tensor.name}: {type(e).__name__}: {e}"
                ) from e
            expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            weight = torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).reshape(expected)
            if self.arch in _PERMUTED_QK and ".attn_q." in tensor.name:
                weight = unpermute_qk(weight, config["num_attention_heads"])
            elif self.arch in _PERMUTED_QK and ".attn_k." in tensor.name:
                weight = unpermute_qk(weight, config["num_key_value_heads"])
            elif self.arch in _NORM_PLUS_ONE and tensor.name.endswith("norm.weight"):
                weight = weight - 1.0
            yield hf_name, weight

    def tokenizer_metadata(self) -> dict[str, Any]:
        """All `tokenizer.*` metadata, keys without the `tokenizer.` prefix."""
        fields = self.reader.fields
        return {k.removeprefix("tokenizer."): self.get(k) for k in fields if k.startswith("tokenizer.")}
