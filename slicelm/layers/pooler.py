"""Pooling of packed hidden states into one vector per sequence, and the classifier activations.

Packed layout (no padding): ``hidden`` is [T, H], sequence i owns rows ``cu_seqlens[i]:cu_seqlens[i+1]``.

Defaults follow vLLM:
- embedding models (``BertModel`` / ``XLMRobertaModel``): CLS pooling + L2 normalization, unless the
  checkpoint has a sentence-transformers config (``modules.json`` + ``1_Pooling/config.json``), which then
  decides the pooling mode, and normalization is on exactly when a ``Normalize`` module is listed.
  Explicit overrides (``--override-pooler-config`` in vLLM) win over both.
- cross-encoders (task "score"): ``config["sentence_transformers"]["activation_fn"]`` or the legacy
  ``sbert_ce_default_activation_function`` (only ``torch.nn.modules.*`` names are accepted); Identity ->
  none, Sigmoid/Softmax -> "classify" rule; without one: the "classify" rule.
- "classify" rule (vLLM's PoolerClassify): sigmoid when num_labels < 2, else softmax over labels;
  for task "classify" ``problem_type == "regression"`` -> none, ``multi_label_classification`` -> sigmoid.
  (sentence-transformers' CrossEncoder differs only for num_labels > 1 without a configured activation:
  it returns raw logits where vLLM returns softmax.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from slicelm.pooling_params import PoolingParams, apply_dimensions

PoolingType = Literal["MEAN", "CLS", "LAST"]
POOLING_TYPES: tuple[str, ...] = ("MEAN", "CLS", "LAST")
# sentence-transformers pooling mode names -> ours
_ST_MODES: dict[str, str] = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST", "last": "LAST"}


@dataclass(frozen=True)
class PoolingConfig:
    pooling_type: PoolingType = "CLS"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")

    @classmethod
    def from_sentence_transformers(
        cls,
        st_pooling: dict | None,
        pooling_type: str | None = None,
        normalize: bool | None = None,
    ) -> PoolingConfig:
        """``st_pooling``: {"pooling_mode": "mean"|"cls"|"lasttoken", "normalize": bool} (or the raw
        ``1_Pooling/config.json`` flags ``pooling_mode_mean_tokens`` etc.), None when the checkpoint has no
        sentence-transformers config. ``pooling_type`` / ``normalize`` are user overrides."""
        pt, norm = "CLS", True  # vLLM's default for BERT-family embedding models
        if st_pooling is not None:
            mode = st_pooling.get("pooling_mode")
            if mode is None:  # raw 1_Pooling/config.json flags
                for key, val in st_pooling.items():
                    if key.startswith("pooling_mode_") and val is True:
                        mode = (
                            key.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                        )
                        break
            if mode is not None:
                mode = str(mode).lower()
                if mode not in _ST_MODES:
                    raise ValueError(
                        f"pooling_mode {mode!r} is not supported; supported: {sorted(_ST_MODES)}"
                    )
                pt = _ST_MODES[mode]
            norm = bool(st_pooling.get("normalize", False))
        if pooling_type is not None:
            pt = pooling_type.upper()
        if normalize is not None:
            norm = normalize
        return cls(pooling_type=pt, normalize=norm)  # type: ignore[arg-type]


def read_sentence_transformers_pooling(model_dir: str) -> dict | None:
    """Builds the ``st_pooling`` dict from a checkpoint directory (modules.json, <Pooling>/config.json);
    None when there is no sentence-transformers config."""
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_path):
        return None
    with open(modules_path) as f:
        modules = json.load(f)
    out: dict = {"normalize": any(m.get("type", "").endswith("models.Normalize") for m in modules)}
    for m in modules:
        if m.get("type", "").endswith("models.Pooling"):
            cfg_path = os.path.join(model_dir, m.get("path", ""), "config.json")
            if os.path.isfile(cfg_path):
                with open(cfg_path) as f:
                    cfg = json.load(f)
                st = PoolingConfig.from_sentence_transformers({**cfg, "normalize": False})
                out["pooling_mode"] = {"MEAN": "mean", "CLS": "cls", "LAST": "lasttoken"}[st.pooling_type]
    return out


def pool(hidden: Tensor, cu_seqlens: Tensor, cfg: PoolingConfig, normalize: bool | None = None) -> Tensor:
    """hidden [T, H] packed, cu_seqlens int [B+1] -> float32 [B, H]. ``normalize`` overrides cfg.normalize."""
    assert hidden.dim() == 2 and cu_seqlens.dim() == 1, (hidden.shape, cu_seqlens.shape)
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.long)
    if cfg.pooling_type == "CLS":
        out = hidden[cu[:-1]].float()
    elif cfg.pooling_type == "LAST":
        out = hidden[cu[1:] - 1].float()
    else:  # MEAN: segment sum in fp32, no per-sequence loop
        lens = cu[1:] - cu[:-1]
        seq_idx = torch.repeat_interleave(
            torch.arange(lens.numel(), device=hidden.device), lens, output_size=hidden.shape[0]
        )
        out = torch.zeros(lens.numel(), hidden.shape[1], device=hidden.device, dtype=torch.float32)
        out.index_add_(0, seq_idx, hidden.float())
        out = out / lens.clamp(min=1).unsqueeze(1).to(out.dtype)
    if cfg.normalize if normalize is None else normalize:
        out = F.normalize(out, p=2, dim=-1)
    return out


def apply_pooling_params(pooled: Tensor, params: list[PoolingParams], cfg: PoolingConfig) -> list[Tensor]:
    """Per-request post-processing of *unnormalized* pooled embeddings [B, H]
    (from ``pool(..., normalize=False)``): Matryoshka ``dimensions``, then normalization
    (the request's ``normalize``, else ``cfg.normalize``)."""
    assert pooled.shape[0] == len(params), (pooled.shape, len(params))
    if all(p.dimensions is None and p.normalize is None for p in params):  # common case: one batched op
        out = F.normalize(pooled, p=2, dim=-1) if cfg.normalize else pooled
        return list(out.unbind(0))
    return [
        apply_dimensions(pooled[i], p.dimensions, cfg.normalize if p.normalize is None else p.normalize)
        for i, p in enumerate(params)
    ]


# ---------------------------------------------------------------------------------------------- activations


def _classify(logits: Tensor, num_labels: int) -> Tensor:
    return torch.sigmoid(logits) if num_labels < 2 else torch.softmax(logits, dim=-1)


def resolve_classifier_activation(config: dict, task: str = "score") -> Callable[[Tensor], Tensor]:
    """The activation applied to classifier logits [B, num_labels] for ``task`` ("score" | "classify")."""
    num_labels = num_labels_of(config)
    if task == "classify":
        problem_type = config.get("problem_type") or ""
        if problem_type == "regression":
            return lambda x: x
        if problem_type == "multi_label_classification":
            return torch.sigmoid
        return lambda x: _classify(x, num_labels)
    if task != "score":
        raise ValueError(f"task must be 'score' or 'classify', got {task!r}")
    st = config.get("sentence_transformers") or {}
    name = st.get("activation_fn") if isinstance(st, dict) else None
    if name is None:
        name = config.get("sbert_ce_default_activation_function")
    if name is None:
        return lambda x: _classify(x, num_labels)
    if not name.startswith("torch.nn.modules."):
        raise ValueError(
            f"activation_fn {name!r} is not allowed: only torch.nn.modules.* activations are loaded"
        )
    fn_cls = getattr(torch.nn, name.rsplit(".", 1)[-1], None)
    if fn_cls is None:
        raise ValueError(f"activation_fn {name!r} is not a torch.nn module")
    if fn_cls is torch.nn.Identity:
        return lambda x: x
    if fn_cls in (torch.nn.Sigmoid, torch.nn.Softmax):
        return lambda x: _classify(x, num_labels)
    return fn_cls()


def num_labels_of(config: dict) -> int:
    """HF configs store ``id2label`` (num_labels is derived from it); transformers' default is 2."""
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))
