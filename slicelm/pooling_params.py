"""Per-request parameters of pooling (embedding / score / classify) requests, after vLLM's ``PoolingParams``.

Plain data: importable from anywhere. Validation happens in ``__post_init__`` (ValueError naming the field);
checks that need the model (``dimensions`` vs. hidden size) happen in ``verify``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PoolingTask = Literal["embed", "score", "classify"]
POOLING_TASKS: tuple[str, ...] = ("embed", "score", "classify")


@dataclass
class PoolingParams:
    """
    dimensions: Matryoshka truncation of an embedding to its first ``dimensions`` values (embed only).
    normalize: L2-normalize the embedding (embed only); None = the model's default (PoolingConfig.normalize).
    use_activation: apply the cross-encoder / classifier activation (score, classify); None = True.
    truncate_prompt_tokens: keep at most this many prompt tokens (-1 = the model's max length); the engine
        truncates, the model never sees more than this.
    task: "embed" (/v1/embeddings), "score" (/score, /rerank: cross-encoder pairs), "classify".
    """

    dimensions: int | None = None
    normalize: bool | None = None
    use_activation: bool | None = None
    truncate_prompt_tokens: int | None = None
    task: PoolingTask = "embed"

    def __post_init__(self) -> None:
        if self.task not in POOLING_TASKS:
            raise ValueError(f"task must be one of {POOLING_TASKS}, got {self.task!r}")
        if self.dimensions is not None:
            if isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int):
                raise ValueError(f"dimensions must be an integer, got {self.dimensions!r}")
            if self.dimensions < 1:
                raise ValueError(f"dimensions must be >= 1, got {self.dimensions}")
            if self.task != "embed":
                raise ValueError(f"dimensions is only supported for task 'embed', not {self.task!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool or None, got {self.normalize!r}")
        if self.use_activation is not None and not isinstance(self.use_activation, bool):
            raise ValueError(f"use_activation must be a bool or None, got {self.use_activation!r}")
        if self.truncate_prompt_tokens is not None:
            t = self.truncate_prompt_tokens
            if isinstance(t, bool) or not isinstance(t, int) or (t < 1 and t != -1):
                raise ValueError(f"truncate_prompt_tokens must be >= 1 or -1, got {t!r}")

    def verify(self, hidden_size: int, max_model_len: int | None = None) -> None:
        """Checks that need the model: ``dimensions`` <= hidden size, truncation <= max length."""
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise ValueError(
                f"dimensions must be <= the model's embedding size {hidden_size}, got {self.dimensions}"
            )
        if (
            max_model_len is not None
            and self.truncate_prompt_tokens is not None
            and self.truncate_prompt_tokens > max_model_len
        ):
            raise ValueError(
                f"truncate_prompt_tokens must be <= max_model_len {max_model_len}, "
                f"got {self.truncate_prompt_tokens}"
            )


def apply_dimensions(emb: Tensor, dims: int | None, normalize: bool) -> Tensor:
    """Matryoshka: keep the first ``dims`` values of each embedding ([..., D]), then L2-normalize if asked."""
    if dims is not None:
        if dims < 1 or dims > emb.shape[-1]:
            raise ValueError(f"dimensions must be in [1, {emb.shape[-1]}], got {dims}")
        emb = emb[..., :dims]
    if normalize:
        emb = F.normalize(emb.float() if emb.dtype != torch.float64 else emb, p=2, dim=-1)
    return emb
